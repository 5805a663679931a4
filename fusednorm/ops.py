"""torch.library custom ops: schemas, fake implementations and autograd, in one place.

Every fused backend implements the same pair of ops:

  forward(x, weight, bias, proxy_bias?, proxy_weight?, num_groups, activation, slope, eps,
          proxy_eps, num_proxy_samples, proxy) -> (y, mean, rstd)
  backward(grad_out, x, weight, bias, proxy_bias?, proxy_weight?, mean, rstd, num_groups,
           activation, slope, proxy_eps, num_proxy_samples, proxy)
          -> (dx, dweight, dbias, dproxy_bias, dproxy_weight)

``activation`` is an id of :mod:`fusednorm.activations`; mean/rstd are the per-(n, g) group
statistics, (N, G) in fp32 (fp64 for fp64 input), the only thing the forward saves besides x.
y and dx have x's dtype and memory format; parameter gradients have their parameter's dtype.
The extension's pair also takes an optional last argument ``proxy_stats``: the (2, C) proxy
mean and scale of ``fusednorm::proxy_statistics``, which its autograd computes once per training
step for both directions (each op computes them itself when it is None).

- ``fusednorm_triton::forward/backward``: the Triton kernels, defined here with custom_op.
- ``fusednorm::forward/backward``: the C++/CUDA extension; schemas declared in C++
  (``csrc/fusednorm.cpp``), autograd in C++ (``csrc/autograd.cpp``: the same saved tensors and
  backward call as here), fake kernels registered here when it is built.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from .layout import accumulation_dtype, dense_layout
from .proxy import proxy_samples

try:
    from .kernels import group_norm_proxy_act as _triton_kernels
except ImportError as error:  # triton is not installed
    _triton_kernels = None
    TRITON_IMPORT_ERROR: Optional[ImportError] = error
else:
    TRITON_IMPORT_ERROR = None


def _import_extension() -> Optional[ImportError]:
    """Imports fusednorm._C (which registers fusednorm::forward/backward through TORCH_LIBRARY);
    the error says why it is missing. A plain ``from . import _C`` without the library file
    blames "a partially initialized module (most likely due to a circular import)"."""
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return ImportError(
            f"no compiled extension (_C*.so) in {os.path.dirname(__file__)}: this install built "
            "none (torch was not importable at build time, or FUSEDNORM_NO_EXTENSION=1 was set)")
    try:
        importlib.import_module(f"{__package__}._C")
    except ImportError as error:  # e.g. built against another torch: undefined symbols
        return ImportError(f"fusednorm._C is there but does not load ({error}); rebuild it "
                           "against the installed torch")
    return None


EXTENSION_IMPORT_ERROR: Optional[ImportError] = _import_extension()


# ----------------------------------------------------------------------------------------------
# Triton ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fusednorm_triton::forward", mutates_args=())
def triton_forward(x: Tensor, weight: Tensor, bias: Tensor, proxy_bias: Optional[Tensor],
                   proxy_weight: Optional[Tensor], num_groups: int, activation: int, slope: float,
                   eps: float, proxy_eps: float, num_proxy_samples: int,
                   proxy: bool) -> tuple[Tensor, Tensor, Tensor]:
    samples = proxy_samples(num_proxy_samples, dtype=accumulation_dtype(x.dtype), device=x.device)
    return _triton_kernels.forward(x, weight, bias, proxy_bias, proxy_weight, samples, num_groups,
                                   activation, slope, eps, proxy_eps, proxy)


@torch.library.custom_op("fusednorm_triton::backward", mutates_args=())
def triton_backward(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor,
                    proxy_bias: Optional[Tensor], proxy_weight: Optional[Tensor], mean: Tensor,
                    rstd: Tensor, num_groups: int, activation: int, slope: float, proxy_eps: float,
                    num_proxy_samples: int,
                    proxy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    samples = proxy_samples(num_proxy_samples, dtype=accumulation_dtype(x.dtype), device=x.device)
    return _triton_kernels.backward(grad_out, x, weight, bias, proxy_bias, proxy_weight, samples,
                                    mean, rstd, num_groups, activation, slope, proxy_eps, proxy)


# ----------------------------------------------------------------------------------------------
# Fake implementations, shared by every backend's pair of ops, and the Triton ops' autograd
# (the extension's is the same in C++: csrc/autograd.cpp)
# ----------------------------------------------------------------------------------------------
def _forward_fake(x, weight, bias, proxy_bias, proxy_weight, num_groups, activation, slope, eps,
                  proxy_eps, num_proxy_samples, proxy, proxy_stats=None):
    y = torch.empty_like(dense_layout(x))
    mean = x.new_empty((x.shape[0], num_groups), dtype=accumulation_dtype(x.dtype))
    return y, mean, torch.empty_like(mean)


def _backward_fake(grad_out, x, weight, bias, proxy_bias, proxy_weight, mean, rstd, num_groups,
                   activation, slope, proxy_eps, num_proxy_samples, proxy, proxy_stats=None):
    dx = torch.empty_like(dense_layout(x))
    dproxy_bias = torch.empty_like(proxy_bias if proxy_bias is not None else weight)
    dproxy_weight = torch.empty_like(proxy_weight if proxy_weight is not None else weight)
    return dx, torch.empty_like(weight), torch.empty_like(bias), dproxy_bias, dproxy_weight


def _proxy_statistics_fake(x, weight, bias, proxy_bias, proxy_weight, activation, slope,
                           proxy_eps, num_proxy_samples):
    return weight.new_empty((2, x.shape[1]), dtype=accumulation_dtype(x.dtype))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, proxy_bias, proxy_weight, num_groups, activation, slope, eps, proxy_eps,
     num_proxy_samples, proxy) = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, proxy_bias, proxy_weight, mean, rstd)
    ctx.config = (num_groups, activation, slope, proxy_eps, num_proxy_samples, proxy)


def _autograd_backward(backward_op):
    def backward(ctx, grad_y, grad_mean, grad_rstd):
        x, weight, bias, proxy_bias, proxy_weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias, dproxy_bias, dproxy_weight = backward_op(
            grad_y, x, weight, bias, proxy_bias, proxy_weight, mean, rstd, *ctx.config)
        return (dx, dweight, dbias,
                dproxy_bias if proxy_bias is not None else None,
                dproxy_weight if proxy_weight is not None else None,
                None, None, None, None, None, None, None)
    return backward


def _register_triton() -> None:
    triton_forward.register_fake(_forward_fake)
    triton_backward.register_fake(_backward_fake)
    triton_forward.register_autograd(_autograd_backward(triton_backward),
                                     setup_context=_setup_context)


def _register_extension() -> None:
    # Autograd of fusednorm::forward is registered in C++ (csrc/autograd.cpp): a Python
    # autograd.Function costs ~0.1 ms per training step on CPU.
    torch.library.register_fake("fusednorm::forward")(_forward_fake)
    torch.library.register_fake("fusednorm::backward")(_backward_fake)
    torch.library.register_fake("fusednorm::proxy_statistics")(_proxy_statistics_fake)


def _extension_kernels() -> dict:
    """{"cpu": bool, "cuda": bool}: the device kernels the extension registered when imported,
    looked up once here (torch.compile cannot trace the dispatcher query)."""
    if EXTENSION_IMPORT_ERROR is not None:
        return {"cpu": False, "cuda": False}
    return {device: torch._C._dispatch_has_kernel_for_dispatch_key("fusednorm::forward", key)
            for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


_register_triton()
if EXTENSION_IMPORT_ERROR is None:
    _register_extension()
_EXTENSION_KERNELS = _extension_kernels()


# ----------------------------------------------------------------------------------------------
# What is available, for the dispatcher in functional.py
# ----------------------------------------------------------------------------------------------
def triton_available() -> bool:
    return _triton_kernels is not None


def extension_has_kernel(device_type: str) -> bool:
    """Whether the C++ extension is built with a kernel for ``device_type`` ("cpu" or "cuda")."""
    return _EXTENSION_KERNELS[device_type]


def forward_op(backend: str):
    """The forward custom op of a fused backend ("triton", "cpu" or "cuda")."""
    if backend == "triton":
        return torch.ops.fusednorm_triton.forward
    return torch.ops.fusednorm.forward


def backward_op(backend: str):
    """The backward custom op of a fused backend ("triton", "cpu" or "cuda")."""
    if backend == "triton":
        return torch.ops.fusednorm_triton.backward
    return torch.ops.fusednorm.backward
