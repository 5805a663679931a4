"""Argument checks shared by the public functional API and the eager reference."""
from __future__ import annotations

import math
import numbers

import torch

from .activations import Activation, parse_activation

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_args(input, num_groups, params: dict, *, activation, eps, proxy_eps=None,
               num_proxy_samples=None) -> tuple[Activation, float]:
    """Validate the operator's arguments; raise a clear error naming the problem.

    ``params`` maps each parameter's name to a tensor or None. Returns (activation, slope).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(
            f"input must have shape (N, C, *spatial) with at least 2 dims, got shape {tuple(input.shape)}"
        )
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input dtype must be one of float16/bfloat16/float32/float64, got {input.dtype}")
    if not _is_int(num_groups) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    channels = input.shape[1]
    if channels % num_groups != 0:
        raise ValueError(
            f"number of channels C={channels} is not divisible by num_groups={num_groups}"
        )
    device = None
    for name, p in params.items():
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
        if p.dim() != 1 or p.shape[0] != channels:
            raise ValueError(f"{name} must have shape (C,) = ({channels},), got {tuple(p.shape)}")
        if p.dtype is not input.dtype and p.dtype is not torch.float32:
            raise TypeError(
                f"{name} dtype {p.dtype} does not match input dtype {input.dtype}; parameters must "
                f"have the input's dtype or float32 (mixed precision)"
            )
        device = input.device if device is None else device
        if p.device != device:
            raise ValueError(f"{name} is on {p.device} but input is on {input.device}")
    _check_nonneg("eps", eps)
    if proxy_eps is not None:
        _check_nonneg("proxy_eps", proxy_eps)
    if num_proxy_samples is not None and (not _is_int(num_proxy_samples) or num_proxy_samples < 2):
        raise ValueError(f"num_proxy_samples must be an int >= 2, got {num_proxy_samples!r}")
    return parse_activation(activation)


# The checks run on every call of the functional API, where a training step's caches are cold
# (each Python operation is a few cache misses): the common types are tested first by identity,
# the abstract number types (a numpy integer, a Fraction) only after.
def _is_int(value) -> bool:
    if type(value) is int:
        return True
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def _check_nonneg(name, value):
    if type(value) is float:
        if not value >= 0 or value == math.inf:  # NaN fails the first test
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        return
    if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
