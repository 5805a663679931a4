"""Conversion rule for timm's fused norm-activation modules (timm.layers.norm_act, timm 1.0).

``BatchNormAct2d``/``SyncBatchNormAct`` subclass nn.BatchNorm2d/nn.SyncBatchNorm and
``GroupNormAct``/``GroupNorm1Act`` subclass nn.GroupNorm; each computes
``act(drop(norm(x)))`` in one forward with ``drop`` and ``act`` submodules. Seen as plain norms,
their activation would be lost; this rule reads them by those attributes, so timm is not imported.
"""
from __future__ import annotations

from torch import nn


def norm_act_rule(module, context):
    """A timm norm-act module -> one fused module (BN: GroupNormProxyAct or GroupNormAct with
    convert's settings; GN: GroupNormAct). With a drop layer (DropBlock) between norm and act, or
    an activation fusednorm lacks, BN becomes ``nn.Sequential(GroupNorm, drop, act)`` and a GN
    stays; with ``apply_act=False`` (``act`` is nn.Identity) it is a plain norm."""
    drop, act = getattr(module, "drop", nn.Identity()), getattr(module, "act", nn.Identity())
    if isinstance(act, nn.Identity) and isinstance(drop, nn.Identity):
        return context.leave(module, "", "no activation (apply_act=False)")
    if not isinstance(drop, nn.Identity):
        reason = f"{type(drop).__name__} between the norm and the activation"
    elif context.activation_of(act) is None:
        reason = f"activation {type(act).__name__} is not one fusednorm has"
    else:
        return context.fuse(module, "", act, absorbed="act")
    left = context.leave(module, "", reason)
    return module if left is module else nn.Sequential(left, drop, act)
