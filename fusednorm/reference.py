"""The eager oracle: plain PyTorch, differentiable by autograd, no kernels.

Same signatures as :mod:`fusednorm.functional` plus ``upcast``: with ``upcast=True`` the math
runs in float32 (float64 stays float64) and the result is cast back to the input's dtype; without
it the math runs in the input's dtype, which is what an eager user of that dtype gets.
"""
from __future__ import annotations

import math

import torch

from .checks import check_args
from .proxy import proxy_stats


def group_norm_proxy_act(input, num_groups, weight=None, bias=None, proxy_bias=None,
                         proxy_weight=None, *, activation="relu", eps=1e-5, proxy_eps=0.03,
                         num_proxy_samples=200, upcast=False):
    """GroupNorm (no affine) -> weight/bias -> activation -> proxy normalization (docs/pn-math.md)."""
    act, slope = check_args(
        input, num_groups,
        dict(weight=weight, bias=bias, proxy_bias=proxy_bias, proxy_weight=proxy_weight),
        activation=activation, eps=eps, proxy_eps=proxy_eps, num_proxy_samples=num_proxy_samples)
    a, weight, bias, dtype = _norm_affine_act(input, num_groups, weight, bias, act, slope, eps, upcast)
    pb = None if proxy_bias is None else proxy_bias.to(dtype)
    pw = None if proxy_weight is None else proxy_weight.to(dtype)
    m, _, s = proxy_stats(weight, bias, pb, pw, act, slope, num_proxy_samples, proxy_eps)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    return (s.view(shape) * (a - m.view(shape))).to(input.dtype)


def group_norm_act(input, num_groups, weight=None, bias=None, *, activation="relu", eps=1e-5,
                   upcast=False):
    """act(group_norm(input, num_groups, weight, bias, eps)), written out in eager ops."""
    act, slope = check_args(input, num_groups, dict(weight=weight, bias=bias),
                            activation=activation, eps=eps)
    a, _, _, _ = _norm_affine_act(input, num_groups, weight, bias, act, slope, eps, upcast)
    return a.to(input.dtype)


def _norm_affine_act(input, num_groups, weight, bias, act, slope, eps, upcast):
    """Returns (a, weight, bias, compute dtype) with a = act(weight * xhat + bias), weight/bias
    materialized (ones/zeros when None) in the compute dtype."""
    dtype = None
    x = input
    if upcast and input.dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
        x = input.float()
    n, c = x.shape[:2]
    spatial = math.prod(x.shape[2:])
    channels_last = _is_channels_last(x)
    if channels_last:
        # Group the (N, *spatial, C) rows as they lie in memory, so that the output and, through
        # autograd, dx come back channels-last like every fused backend's (the documented contract).
        rows = x.movedim(1, -1)
        grouped = rows.reshape(n, spatial, num_groups, c // num_groups)
        dims = (1, 3)
    else:
        grouped = x.reshape(n, num_groups, (c // num_groups) * spatial)
        dims = (2,)
    mean = grouped.mean(dim=dims, keepdim=True)
    var = (grouped - mean).square().mean(dim=dims, keepdim=True)
    xhat = (grouped - mean) * torch.rsqrt(var + eps)
    if channels_last:
        xhat = xhat.reshape(rows.shape).movedim(-1, 1)
    else:
        xhat = xhat.reshape(x.shape)
    pdtype = dtype or torch.promote_types(x.dtype, _param_dtype(weight, bias, x.dtype))
    weight = torch.ones(c, dtype=pdtype, device=x.device) if weight is None else weight.to(pdtype)
    bias = torch.zeros(c, dtype=pdtype, device=x.device) if bias is None else bias.to(pdtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    a = act.value(weight.view(shape) * xhat + bias.view(shape), slope)
    return a, weight, bias, pdtype


def _param_dtype(weight, bias, default):
    for p in (weight, bias):
        if p is not None:
            return p.dtype
    return default


def _is_channels_last(x):
    """(N, C, *spatial) stored as (N, *spatial, C), and not also contiguous (C = 1 or no spatial
    extent: both layouts are the same there)."""
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()
