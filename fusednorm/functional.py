"""Public functional API: argument checks, then the one place that picks the backend."""
from __future__ import annotations

import os
import warnings

import torch

from . import ops, reference
from .checks import check_args

BACKENDS = ("auto", "triton", "reference", "cpu", "cuda")
BACKEND_ENV = "FUSEDNORM_BACKEND"
NO_EXTENSION_ENV = "FUSEDNORM_NO_EXTENSION"
BUILD_COMMAND = "pip install --no-build-isolation -e .  (from the fusednorm checkout)"
_warned_fallback: set = set()


def group_norm_proxy_act(input, num_groups, weight=None, bias=None, proxy_bias=None,
                         proxy_weight=None, *, activation="relu", eps=1e-5, proxy_eps=0.03,
                         num_proxy_samples=200, backend=None):
    """Fused GroupNorm -> affine (weight, bias) -> activation -> Proxy Normalization.

    ``input`` is (N, C, *spatial) with 0-3 spatial dims, contiguous or channels-last; the output
    has the input's shape, dtype and memory format. ``weight``/``bias`` (gamma/beta, default 1/0)
    and ``proxy_bias``/``proxy_weight`` (beta~/gamma~, default 0) are (C,) tensors in the input's
    dtype or float32; statistics accumulate in float32 (float64 for float64 input).
    ``activation`` is a name from :data:`fusednorm.activations.ACTIVATIONS` (alias "swish"),
    or ``("leaky_relu", slope)``. ``backend`` overrides ``$FUSEDNORM_BACKEND`` (default "auto").
    """
    act, slope = check_args(
        input, num_groups,
        dict(weight=weight, bias=bias, proxy_bias=proxy_bias, proxy_weight=proxy_weight),
        activation=activation, eps=eps, proxy_eps=proxy_eps, num_proxy_samples=num_proxy_samples)
    name = select_backend(backend, input)
    if name == "reference":
        return reference.group_norm_proxy_act(
            input, num_groups, weight, bias, proxy_bias, proxy_weight, activation=activation,
            eps=eps, proxy_eps=proxy_eps, num_proxy_samples=num_proxy_samples, upcast=True)
    weight, bias = _materialize_affine(input, weight, bias)
    y, _, _ = ops.forward_op(name)(input, weight, bias, proxy_bias, proxy_weight, num_groups,
                                   act.id, slope, float(eps), float(proxy_eps),
                                   int(num_proxy_samples), True)
    return y


def group_norm_act(input, num_groups, weight=None, bias=None, *, activation="relu", eps=1e-5,
                   backend=None):
    """Fused ``act(F.group_norm(input, num_groups, weight, bias, eps))``: the same kernels with
    Proxy Normalization off (e.g. GroupNorm + SiLU in diffusion U-Nets)."""
    act, slope = check_args(input, num_groups, dict(weight=weight, bias=bias),
                            activation=activation, eps=eps)
    name = select_backend(backend, input)
    if name == "reference":
        return reference.group_norm_act(input, num_groups, weight, bias, activation=activation,
                                        eps=eps, upcast=True)
    weight, bias = _materialize_affine(input, weight, bias)
    y, _, _ = ops.forward_op(name)(input, weight, bias, None, None, num_groups, act.id, slope,
                                   float(eps), 0.0, 2, False)
    return y


def select_backend(backend, input: torch.Tensor) -> str:
    """Resolve ``backend`` (or ``$FUSEDNORM_BACKEND``, or "auto") to the backend that runs.

    "auto": for CUDA tensors the Triton kernels (or the CUDA extension when Triton is missing),
    for CPU tensors the C++ CPU kernel when built, else the eager reference. An explicit fused
    backend that cannot run on this input raises an error that says why.
    """
    requested = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    if requested != "auto":
        requested = str(requested).lower()
        if requested not in BACKENDS:
            source = "backend" if backend is not None else f"${BACKEND_ENV}"
            raise ValueError(f"unknown {source} {requested!r}; expected one of {BACKENDS}")
    if requested == "auto":  # is_cuda/is_cpu: no torch.device object per call
        if input.is_cuda:
            # Triton stays the CUDA default until GPU benchmarks compare it with the CUDA kernel.
            if ops.triton_available():
                return "triton"
            if ops.extension_has_kernel("cuda"):
                return "cuda"
            _warn_fallback("cuda", "neither triton nor the extension's CUDA kernels are there")
            return "reference"
        if input.is_cpu:
            if ops.extension_has_kernel("cpu"):
                return "cpu"
            _warn_fallback("cpu", "the C++ extension fusednorm._C is not built")
        return "reference"
    device = input.device.type
    if requested == "triton":
        if not ops.triton_available():
            raise RuntimeError(f"backend 'triton' needs the triton package: {ops.TRITON_IMPORT_ERROR}")
        if device != "cuda" and not (device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError(f"backend 'triton' runs on CUDA tensors (or on CPU tensors with "
                             f"TRITON_INTERPRET=1), got a {device} tensor")
    if requested in ("cpu", "cuda"):
        if not ops.extension_has_kernel(requested):
            raise RuntimeError(
                f"backend {requested!r} needs the compiled extension with a {requested.upper()} "
                f"kernel, which is not built ({ops.EXTENSION_IMPORT_ERROR or 'built without it'}); "
                f"build it with `{BUILD_COMMAND}` (CUDA needs a CUDA build of torch and nvcc)")
        if device != requested:
            raise ValueError(f"backend {requested!r} got a {device} tensor")
    return requested


def _warn_fallback(device: str, missing: str) -> None:
    """Once per device type: "auto" runs the eager reference (several times slower) because a
    fused backend is missing. Quiet for installs made without the extension on purpose."""
    if device in _warned_fallback or os.environ.get(NO_EXTENSION_ENV, "") not in ("", "0"):
        return
    _warned_fallback.add(device)
    build = (f"build it with `{BUILD_COMMAND}`" if device == "cpu" else
             "install triton, or build the extension against a CUDA build of torch with nvcc: "
             f"`{BUILD_COMMAND}`")
    warnings.warn(f"fusednorm: {missing}, so backend 'auto' runs the eager reference on {device} "
                  f"tensors, several times slower than the fused kernels; {build}, or set "
                  f"{NO_EXTENSION_ENV}=1 to silence this. `python -m fusednorm` shows what is "
                  f"installed.", RuntimeWarning, stacklevel=4)


def _materialize_affine(input, weight, bias):
    """The kernels always read gamma and beta: stand in ones/zeros for absent ones."""
    if weight is not None and bias is not None:
        return weight, bias
    dtype = next((p.dtype for p in (weight, bias) if p is not None), input.dtype)
    if weight is None:
        weight = torch.ones(input.shape[1], dtype=dtype, device=input.device)
    if bias is None:
        bias = torch.zeros(input.shape[1], dtype=dtype, device=input.device)
    return weight, bias
