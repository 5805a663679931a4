"""The one activation table shared by every backend.

Each activation has a stable integer id (passed to the Triton kernels and the C++/CUDA
extension as ``activation``), an eager value/derivative pair used by the reference and by the
small per-channel proxy computations, and its native torch forms (the nn.Module and the function
that models, model conversion and benchmarks use). Kernels implement the same formulas; the ids
here are the contract: ``kernels/activations.py`` imports them, ``csrc/activations.h`` repeats
them and ``tests/test_activations.py`` checks that both agree with this table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

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
    value: Callable[[torch.Tensor, float], torch.Tensor]       # eager formula, (z, slope)
    derivative: Callable[[torch.Tensor, float], torch.Tensor]  # its derivative, (z, slope)
    native: Callable[[torch.Tensor, float], torch.Tensor]      # torch's own op, (z, slope)
    module: Callable[[float], nn.Module]                       # torch's nn.Module, (slope)


_TABLE = {
    "identity": Activation("identity", IDENTITY, _identity, _identity_grad,
                           lambda z, slope: z, lambda slope: nn.Identity()),
    "relu": Activation("relu", RELU, _relu, _relu_grad,
                       lambda z, slope: F.relu(z), lambda slope: nn.ReLU()),
    "silu": Activation("silu", SILU, _silu, _silu_grad,
                       lambda z, slope: F.silu(z), lambda slope: nn.SiLU()),
    "gelu": Activation("gelu", GELU, _gelu, _gelu_grad,
                       lambda z, slope: F.gelu(z), lambda slope: nn.GELU()),
    "gelu_tanh": Activation("gelu_tanh", GELU_TANH, _gelu_tanh, _gelu_tanh_grad,
                            lambda z, slope: F.gelu(z, approximate="tanh"),
                            lambda slope: nn.GELU(approximate="tanh")),
    "leaky_relu": Activation("leaky_relu", LEAKY_RELU, _leaky_relu, _leaky_relu_grad,
                             F.leaky_relu, nn.LeakyReLU),
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
    entry = _TABLE.get(activation) if type(activation) is str else None
    if entry is not None:  # the common case first: this runs on every call
        return entry, DEFAULT_LEAKY_SLOPE
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


def activation_module(activation) -> nn.Module:
    """torch's nn.Module for an activation spec (a name or ("leaky_relu", slope))."""
    act, slope = parse_activation(activation)
    return act.module(slope)


def native_activation(activation) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch's own function for an activation spec, as a one-argument callable."""
    act, slope = parse_activation(activation)
    return lambda z: act.native(z, slope)


def activation_of_module(module: nn.Module):
    """The activation spec that ``module`` computes when it is one of torch's activation modules
    of the table (the inverse of :func:`activation_module`), else None."""
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if isinstance(module, nn.LeakyReLU):
        return ("leaky_relu", module.negative_slope)
    for module_type, name in ((nn.ReLU, "relu"), (nn.SiLU, "silu")):
        if isinstance(module, module_type):
            return name
    return None
