"""fusednorm: fused GroupNorm/LayerNorm + activation + Proxy Normalization for PyTorch."""
from . import reference
from .activations import ACTIVATIONS
from .functional import BACKENDS, group_norm_act, group_norm_proxy_act, select_backend
from .info import info
from .modules import GroupNormAct, GroupNormProxyAct
from . import analysis, models
from .convert import convert

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "BACKENDS", "GroupNormAct", "GroupNormProxyAct", "analysis", "convert",
    "group_norm_act", "group_norm_proxy_act", "info", "models", "reference", "select_backend",
]
