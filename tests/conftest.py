"""Shared fixtures, input builders and per-dtype tolerances."""
from __future__ import annotations

import os

import pytest
import torch

from fusednorm import reference

# A low-precision kernel may err at most about 2x what the eager reference itself errs in that
# dtype (both against an fp64 reference), plus a floor in units of the dtype's resolution so that
# an exact-by-luck reference does not demand bit-equality.
REF_ERROR_FACTOR = 2.0
ERROR_FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ACTIVATIONS = ["relu", "silu", "gelu", "gelu_tanh", ("leaky_relu", 0.2), "identity"]
# The odd shapes every backend is checked on: (shape, num_groups). Each backend's test file adds
# the shapes that reach its own split or tiling paths.
ODD_SHAPES = {
    "no_spatial": ((4, 12), 3),
    "S=1": ((3, 8, 1, 1), 4),
    "S=49": ((2, 6, 7, 7), 2),
    "C=12,G=4": ((2, 12, 4, 4), 4),
    "C=15,G=5": ((2, 15, 4, 4), 5),
    "C=30,G=5": ((2, 30, 3, 5), 5),
    "G=1": ((3, 10, 4, 3), 1),
    "G=C": ((2, 7, 5, 3), 7),
    "N=1": ((1, 8, 6, 6), 2),
    "1d": ((2, 8, 11), 4),
    "3d": ((2, 8, 3, 4, 5), 2),
}


def triton_device() -> str:
    """Where the Triton kernels run in this session: CUDA when present, else the interpreter on
    CPU. Skips (with the reason) when neither is possible."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("the Triton backend needs a CUDA device or TRITON_INTERPRET=1 (the interpreter)")


def requires_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Channels-last for any rank: (N, C, *spatial) stored as (N, *spatial, C)."""
    if channels_last and x.dim() > 2:
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x.contiguous()


def make_inputs(shape, *, dtype=torch.float64, param_dtype=None, device="cpu", proxy_params=True,
                channels_last=False, seed=0):
    """Random x (N, C, *spatial) and non-trivial parameters, all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype
    channels = shape[1]

    def param(loc, scale):
        value = loc + scale * torch.randn(channels, generator=gen, dtype=torch.float64)
        return value.to(device=device, dtype=param_dtype).requires_grad_()

    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    x = to_layout(x, channels_last).requires_grad_()
    params = dict(weight=param(1.0, 0.3), bias=param(0.0, 0.3))
    if proxy_params:
        params.update(proxy_bias=param(0.0, 0.2), proxy_weight=param(0.0, 0.2))
    return x, params


def run_forward_backward(fn, x, params, grad_out, **kwargs):
    """Output and the gradients of x and of each parameter, for sum(out * grad_out)."""
    out = fn(x, **params, **kwargs)
    inputs = [x, *params.values()]
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, dict(zip(["x", *params], grads))


def fp64_copy(x, params):
    x64 = x.detach().double().requires_grad_()
    return x64, {k: v.detach().double().requires_grad_() for k, v in params.items()}


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().amax().item() if actual.numel() else 0.0


def assert_within_reference_error(actual, lowp_reference, fp64_reference, name=""):
    """|actual - fp64| <= 2 * |eager reference in actual's dtype - fp64| + floor * scale."""
    dtype = actual.dtype
    scale = max(1.0, max_error(fp64_reference, torch.zeros_like(fp64_reference)))
    kernel_error = max_error(actual, fp64_reference)
    reference_error = max_error(lowp_reference, fp64_reference)
    bound = REF_ERROR_FACTOR * reference_error + ERROR_FLOOR[dtype] * scale
    assert kernel_error <= bound, (
        f"{name}: kernel error {kernel_error:.3e} vs fp64 exceeds {bound:.3e} "
        f"(eager {dtype} reference error {reference_error:.3e}, scale {scale:.3g})")


def reference_fn(proxy: bool):
    return reference.group_norm_proxy_act if proxy else reference.group_norm_act


def check_against_reference(backend, shape, num_groups, *, activation="relu", proxy=True,
                            proxy_params=True, channels_last=False, dtype=torch.float64,
                            param_dtype=None, device="cpu", seed=0):
    """Run ``backend`` and the eager reference on the same inputs; compare the output and every
    gradient. fp64 must agree to ~1e-10; other dtypes within 2x the eager reference's own error
    in that dtype, both against the fp64 reference."""
    import fusednorm

    x, params = make_inputs(shape, dtype=dtype, param_dtype=param_dtype, device=device,
                            proxy_params=proxy and proxy_params, channels_last=channels_last,
                            seed=seed)
    fused = fusednorm.group_norm_proxy_act if proxy else fusednorm.group_norm_act
    eager = reference_fn(proxy)
    grad_out = to_layout(torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1),
                                     dtype=torch.float64), channels_last).to(device, dtype)
    out, grads = run_forward_backward(
        lambda x, **p: fused(x, num_groups, **p, activation=activation, backend=backend),
        x, params, grad_out)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.stride() == x.stride(), "output must keep the input's memory format"
    assert grads["x"].stride() == x.stride(), "dx must keep the input's memory format"
    for name, p in params.items():
        assert grads[name].dtype == p.dtype, f"d{name} must have {name}'s dtype"

    x64, params64 = fp64_copy(x, params)
    ref_out, ref_grads = run_forward_backward(
        lambda x, **p: eager(x, num_groups, **p, activation=activation),
        x64, params64, grad_out.double())
    if dtype == torch.float64 and (param_dtype in (None, torch.float64)):
        torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-9,
                                       msg=lambda m, name=name: f"grad of {name}: {m}")
        return
    lowp_out, lowp_grads = run_forward_backward(
        lambda x, **p: eager(x, num_groups, **p, activation=activation),
        *_detached_copy(x, params), grad_out)
    assert_within_reference_error(out, lowp_out, ref_out, "output")
    for name in grads:
        assert_within_reference_error(grads[name], lowp_grads[name], ref_grads[name],
                                      f"grad of {name}")


def _detached_copy(x, params):
    return (x.detach().clone().requires_grad_(),
            {k: v.detach().clone().requires_grad_() for k, v in params.items()})


FUSED_BACKENDS = ["triton", "cpu", "cuda"]


@pytest.fixture(params=FUSED_BACKENDS)
def fused_backend(request):
    """(backend, device) for each fused backend that can run here; skips the others, saying why."""
    return _runnable_backend(request.param)


@pytest.fixture(params=["reference", *FUSED_BACKENDS])
def any_backend(request):
    """(backend, device) for every backend, the eager reference included (what "auto" runs
    without the extension); skips the fused ones that cannot run here, saying why."""
    if request.param == "reference":
        return "reference", "cpu"
    return _runnable_backend(request.param)


@pytest.fixture(params=["cpu", "cuda"])
def extension_backend(request):
    """(backend, device) of the C++ extension's kernels (the ops that also take proxy_stats)."""
    return _runnable_backend(request.param)


def _runnable_backend(name):
    from fusednorm import ops

    if name == "triton":
        return name, triton_device()
    if name == "cuda":
        requires_cuda()
    if not ops.extension_has_kernel(name):
        pytest.skip(f"the C++ extension has no {name} kernel here "
                    f"(build: pip install --no-build-isolation -e .)")
    return name, name
