"""The one activation table shared by every backend.

Each activation has a stable integer id (passed to the Triton kernels and the C++/CUDA
extension as ``activation``) and an eager value/derivative pair used by the reference and by
the small per-channel proxy computations. Kernels implement the same formulas; the ids here
are the contract (``csrc/activations.h`` and ``kernels/activations.py`` mirror them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

IDENTITY, RELU, SILU, GELU, GELU_TANH, LEAKY_RELU = range(6)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715


def _identity(z, slope):
    return z


def _identity_grad(z, slope):
    return torch.ones_like(z)


def _relu(z, slope):
    return torch.relu(z)


def _relu_grad(z, slope):
    return (z > 0).to(z.dtype)


def _silu(z, slope):
    return z * torch.sigmoid(z)


def _silu_grad(z, slope):
    sig = torch.sigmoid(z)
    return sig * (1 + z * (1 - sig))


def _gelu(z, slope):
    return 0.5 * z * (1 + torch.erf(z * _INV_SQRT_2))


def _gelu_grad(z, slope):
    cdf = 0.5 * (1 + torch.erf(z * _INV_SQRT_2))
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return cdf + z * pdf


def _gelu_tanh(z, slope):
    inner = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z)
    return 0.5 * z * (1 + torch.tanh(inner))


def _gelu_tanh_grad(z, slope):
    inner = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z)
    t = torch.tanh(inner)
    d_inner = _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_C * z * z)
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * d_inner


def _leaky_relu(z, slope):
    return torch.where(z > 0, z, z * slope)


def _leaky_relu_grad(z, slope):
    return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))


@dataclass(frozen=True)
class Activation:
    name: str
    id: int
    value: Callable[[torch.Tensor, float], torch.Tensor]
    derivative: Callable[[torch.Tensor, float], torch.Tensor]


_TABLE = {
    "identity": Activation("identity", IDENTITY, _identity, _identity_grad),
    "relu": Activation("relu", RELU, _relu, _relu_grad),
    "silu": Activation("silu", SILU, _silu, _silu_grad),
    "gelu": Activation("gelu", GELU, _gelu, _gelu_grad),
    "gelu_tanh": Activation("gelu_tanh", GELU_TANH, _gelu_tanh, _gelu_tanh_grad),
    "leaky_relu": Activation("leaky_relu", LEAKY_RELU, _leaky_relu, _leaky_relu_grad),
}
_ALIASES = {"swish": "silu", "none": "identity", "linear": "identity"}

ACTIVATIONS = tuple(_TABLE)
DEFAULT_LEAKY_SLOPE = 0.01


def parse_activation(activation) -> tuple[Activation, float]:
    """Resolve ``activation`` to (table entry, slope).

    Accepts a name ("relu", "silu"/"swish", "gelu", "gelu_tanh", "leaky_relu", "identity") or a
    ``(name, slope)`` pair for leaky_relu, e.g. ``("leaky_relu", 0.2)``. The slope is ignored by
    every other activation.
    """
    slope = DEFAULT_LEAKY_SLOPE
    if isinstance(activation, (tuple, list)):
        if len(activation) != 2:
            raise ValueError(f"activation as a pair must be (name, slope), got {activation!r}")
        activation, slope = activation
        slope = float(slope)
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a name (str), got {type(activation).__name__}")
    key = _ALIASES.get(activation.lower(), activation.lower())
    if key not in _TABLE:
        raise ValueError(
            f"unknown activation {activation!r}; expected one of {sorted(_TABLE) + sorted(_ALIASES)}"
        )
    if not math.isfinite(slope):
        raise ValueError(f"leaky_relu slope must be finite, got {slope}")
    return _TABLE[key], slope


def by_id(activation_id: int) -> Activation:
    for act in _TABLE.values():
        if act.id == activation_id:
            return act
    raise ValueError(f"unknown activation id {activation_id}")
