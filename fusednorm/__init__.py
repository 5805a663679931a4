"""fusednorm: fused GroupNorm/LayerNorm + activation + Proxy Normalization for PyTorch."""
from . import reference
from .activations import ACTIVATIONS
from .functional import BACKENDS, group_norm_act, group_norm_proxy_act, select_backend
from .info import info
from .modules import GroupNormAct, GroupNormProxyAct
from .convert import convert

__version__ = "0.1.0"


def __getattr__(name):
    # The analysis tools and the model zoo are imported on first use, not with every import.
    if name in ("analysis", "models"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ACTIVATIONS", "BACKENDS", "GroupNormAct", "GroupNormProxyAct", "analysis", "convert",
    "group_norm_act", "group_norm_proxy_act", "info", "models", "reference", "select_backend",
]
