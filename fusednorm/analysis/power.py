"""The power decomposition of activations (docs/pn-math.md, last section; the paper's Eq. 5), taken
where the paper takes it: at the output of each normalization step, before affine and activation."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import BatchNormProxyAct, GroupNormAct, GroupNormProxyAct

TERMS = ("(E_n mu_c)^2", "Var_n mu_c", "(E_n sigma_c)^2", "Var_n sigma_c")
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
              GroupNormProxyAct, GroupNormAct, BatchNormProxyAct)


@dataclass(frozen=True)
class PowerDecomposition:
    """``per_channel``: (C, 4) terms of each channel's power P_c, in the order of :data:`TERMS`;
    ``terms``: (4,) the terms averaged over channels divided by ``power``, summing to 1;
    ``power``: P averaged over channels."""
    per_channel: torch.Tensor
    terms: torch.Tensor
    power: float


def power_decomposition(y: torch.Tensor) -> PowerDecomposition:
    """P_c(y) = (E_n mu_c)^2 + Var_n mu_c + (E_n sigma_c)^2 + Var_n sigma_c for y of shape
    (N, C, *spatial), mu_c / sigma_c the mean / standard deviation of channel c of one instance
    over its spatial positions (population statistics, so the identity is exact). Computed in
    float64. All-zero activations give NaN normalized terms."""
    if y.dim() < 2:
        raise ValueError(f"expected activations of shape (N, C, *spatial), got {tuple(y.shape)}")
    flat = y.detach().to(torch.float64).reshape(y.shape[0], y.shape[1], -1)
    mu = flat.mean(dim=2)
    sigma = flat.var(dim=2, unbiased=False).sqrt()
    per_channel = torch.stack([mu.mean(0).square(), mu.var(0, unbiased=False),
                               sigma.mean(0).square(), sigma.var(0, unbiased=False)], dim=1)
    power = flat.square().mean(dim=(0, 2)).mean()
    return PowerDecomposition(per_channel, per_channel.mean(0) / power, power.item())


def normalized_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``module``'s normalization step makes of its input ``x``, before the affine transform
    and the activation: the paper's y^l (its Eq. 2-5), which fused modules never materialize.
    Uses the module's own groups, eps and, as its forward would, batch statistics in training
    mode (or without running statistics) and running statistics otherwise."""
    if isinstance(module, BatchNormProxyAct):
        return _batch_norm(module.norm, x.reshape(x.shape[0], x.shape[1], -1)).view(x.shape)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _batch_norm(module, x)
    if isinstance(module, (nn.GroupNorm, GroupNormProxyAct, GroupNormAct)):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        use_input_stats = module.training or not module.track_running_stats
        return F.instance_norm(x, module.running_mean, module.running_var, None, None,
                               use_input_stats, 0.0, module.eps)
    raise TypeError(f"no normalization step known for {type(module).__name__}")


def _batch_norm(module, x):
    batch_stats = module.training or module.running_mean is None
    return F.batch_norm(x, None if batch_stats else module.running_mean,
                        None if batch_stats else module.running_var, None, None, batch_stats,
                        0.0, module.eps)


@contextlib.contextmanager
def record_power(model: nn.Module, types=NORM_TYPES):
    """Collect the power decomposition of the normalized tensor (before affine and activation)
    of every normalization layer of ``model``: :func:`normalized_input` of the layer's input,
    computed in a forward pre-hook, so fused modules (GroupNormProxyAct) are measured at the same
    point as nn.BatchNorm2d and nn.GroupNorm.

    Yields a list that each forward pass extends with ``(name, PowerDecomposition)`` in call
    order (depth order for a feed-forward net). Norm modules inside another hooked norm module
    (the BatchNorm inside a BatchNormProxyAct) are skipped: the outer module is the layer. The
    hooks are removed on exit.
    """
    records = []
    handles = []
    hooked = []

    def record(name, module, args):
        with torch.no_grad():
            records.append((name, power_decomposition(normalized_input(module, args[0]))))

    for name, module in model.named_modules():
        if isinstance(module, types) and not any(name.startswith(h + ".") or h == "" for h in hooked):
            hooked.append(name)
            handles.append(module.register_forward_pre_hook(
                lambda module, args, name=name: record(name, module, args)))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
