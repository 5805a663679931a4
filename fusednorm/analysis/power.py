"""The power decomposition of activations (pn-math.md, last section; the paper's Eq. 5)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..models.norms import BatchNormProxyAct
from ..modules import GroupNormAct, GroupNormProxyAct

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


@contextlib.contextmanager
def record_power(model: nn.Module, types=NORM_TYPES):
    """Collect the power decomposition of the output of every normalization layer of ``model``.

    Yields a list that each forward pass extends with ``(name, PowerDecomposition)`` in call
    order (depth order for a feed-forward net). Norm modules inside another hooked norm module
    (the BatchNorm inside a BatchNormProxyAct) are skipped: the outer module's output is the
    layer's. The hooks are removed on exit.
    """
    records = []
    handles = []
    hooked = []
    for name, module in model.named_modules():
        if isinstance(module, types) and not any(name.startswith(h + ".") or h == "" for h in hooked):
            hooked.append(name)
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: records.append((name, power_decomposition(out)))))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
