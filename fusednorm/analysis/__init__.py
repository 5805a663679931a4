"""The paper's analysis framework: power decomposition, hooks, and the random-network experiment.

``python -m fusednorm.analysis`` draws the power plots (needs matplotlib, imported only there)."""
from .power import NORM_TYPES, TERMS, PowerDecomposition, power_decomposition, record_power
from .random_net import PAPER_NORMS, power_profile, random_inputs, random_net

__all__ = ["NORM_TYPES", "PAPER_NORMS", "TERMS", "PowerDecomposition", "power_decomposition",
           "power_profile", "random_inputs", "random_net", "record_power"]
