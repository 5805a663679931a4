"""Reference models with a choice of normalization (BN, GN, LN, IN, and their +PN forms)."""
from ..modules import BatchNormProxyAct
from .norms import NORMS, group_count, norm_act
from .resnet_v2 import ResNetV2, resnet_v2

__all__ = ["NORMS", "BatchNormProxyAct", "ResNetV2", "group_count",
           "norm_act", "resnet_v2"]
