"""Proxy samples and the eager proxy statistics (docs/pn-math.md, steps 4-5)."""
from __future__ import annotations

import functools
import math

import torch

from .activations import Activation


@functools.lru_cache(maxsize=64)
def _samples(num_samples: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    k = torch.arange(num_samples, dtype=torch.float64)
    u = math.sqrt(2.0) * torch.erfinv(2.0 * (k + 0.5) / num_samples - 1.0)
    return u.to(dtype=dtype, device=device)


def proxy_samples(num_samples: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """u_k = Phi^-1((k + 0.5) / K), k = 0..K-1: midpoint quantiles of N(0, 1), computed in fp64.

    Cached per (K, dtype, device): the same constants are reused, never copied again. Treat the
    returned tensor as read-only."""
    if num_samples < 2:
        raise ValueError(f"num_proxy_samples must be >= 2, got {num_samples}")
    return _samples(int(num_samples), dtype, torch.device(device if device is not None else "cpu"))


def proxy_stats(weight, bias, proxy_bias, proxy_weight, act: Activation, slope: float,
                num_samples: int, proxy_eps: float):
    """Per-channel proxy mean m, variance v and scale s = 1/sqrt(v + proxy_eps), differentiable.

    X_ck = proxy_bias_c + (1 + proxy_weight_c) * u_k;  P_ck = act(weight_c * X_ck + bias_c).
    Computed in the dtype of ``weight`` (callers upcast when they want fp32 statistics).
    """
    u = proxy_samples(num_samples, dtype=weight.dtype, device=weight.device)
    proxy_x = u.expand(weight.shape[0], -1)
    if proxy_weight is not None:
        proxy_x = (1 + proxy_weight)[:, None] * proxy_x
    if proxy_bias is not None:
        proxy_x = proxy_bias[:, None] + proxy_x
    p = act.value(weight[:, None] * proxy_x + bias[:, None], slope)
    m = p.mean(dim=1)
    v = (p - m[:, None]).square().mean(dim=1)
    return m, v, torch.rsqrt(v + proxy_eps)
