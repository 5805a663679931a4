"""The paper's analysis framework: power decomposition, hooks, and the random-network experiment.

``python -m fusednorm.analysis`` draws the power plots (needs matplotlib, imported only there)."""
from .power import (NORM_TYPES, TERMS, PowerDecomposition, normalized_input, power_decomposition,
                    record_power)
from .random_net import (PAPER_NORMS, natural_inputs, power_profile, random_inputs, random_net,
                         resnet_power_profile)

__all__ = ["NORM_TYPES", "PAPER_NORMS", "TERMS", "PowerDecomposition", "normalized_input",
           "power_decomposition",
           "natural_inputs", "power_profile", "random_inputs", "random_net", "record_power",
           "resnet_power_profile"]
