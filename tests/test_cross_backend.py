"""The fused backends agree with each other and with the eager reference on the same inputs.

On a CPU-only machine: the Triton kernels in the interpreter (TRITON_INTERPRET=1) and the C++ CPU
kernel, both on CPU tensors. With a GPU: Triton and the CUDA kernel on CUDA tensors.
"""
import pytest
import torch

import fusednorm
from fusednorm import activations, ops
from conftest import (ACTIVATIONS, assert_within_reference_error, fp64_copy, make_inputs,
                      reference_fn, run_forward_backward, to_layout, triton_device)

MODES = {"pn+proxy_params": (True, True), "pn": (True, False), "no_pn": (False, False)}
LAYOUTS = {"nchw": False, "channels_last": True}


def _backends():
    """(device, the two fused backends to compare there); skips when one cannot run."""
    device = triton_device()
    other = "cuda" if device == "cuda" else "cpu"
    if not ops.extension_has_kernel(other):
        pytest.skip(f"the C++ extension has no {other} kernel here "
                    f"(build: pip install --no-build-isolation -e .)")
    return device, ("triton", other)


def _run(backend, x, params, groups, grad_out, activation, proxy):
    fn = fusednorm.group_norm_proxy_act if proxy else fusednorm.group_norm_act
    return run_forward_backward(
        lambda x, **p: fn(x, groups, **p, activation=activation, backend=backend),
        x, params, grad_out)


def _agree(shape, groups, *, activation, proxy, proxy_params, channels_last, dtype,
           param_dtype=None):
    device, backends = _backends()
    x, params = make_inputs(shape, dtype=dtype, param_dtype=param_dtype, device=device,
                            proxy_params=proxy and proxy_params, channels_last=channels_last)
    grad_out = to_layout(torch.randn(shape, generator=torch.Generator().manual_seed(1),
                                     dtype=torch.float64), channels_last).to(device, dtype)
    results = {b: _run(b, x, params, groups, grad_out, activation, proxy) for b in backends}
    x64, params64 = fp64_copy(x, params)
    ref_out, ref_grads = run_forward_backward(
        lambda x, **p: reference_fn(proxy)(x, groups, **p, activation=activation),
        x64, params64, grad_out.double())
    (out_a, grads_a), (out_b, grads_b) = results.values()
    if dtype == torch.float64:
        for out, grads in results.values():
            torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
            for name, grad in grads.items():
                torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-11)
        return
    # Lower precision: each backend within 2x the eager reference's own error in this dtype, and
    # the two backends as close to each other as that allows.
    eager = reference_fn(proxy)
    lowp_out, lowp_grads = run_forward_backward(
        lambda x, **p: eager(x, groups, **p, activation=activation),
        x.detach().clone().requires_grad_(),
        {k: v.detach().clone().requires_grad_() for k, v in params.items()}, grad_out)
    for backend, (out, grads) in results.items():
        assert_within_reference_error(out, lowp_out, ref_out, f"{backend} output")
        for name, grad in grads.items():
            assert_within_reference_error(grad, lowp_grads[name], ref_grads[name],
                                          f"{backend} grad of {name}")
    scale = max(1.0, ref_out.abs().max().item())
    tolerance = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype] * scale
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=tolerance)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_backends_agree_fp64(activation, mode, layout):
    proxy, proxy_params = MODES[mode]
    _agree((2, 12, 5, 7), 3, activation=activation, proxy=proxy, proxy_params=proxy_params,
           channels_last=LAYOUTS[layout], dtype=torch.float64)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,groups", [((2, 16, 9, 9), 4), ((3, 10), 5), ((2, 8, 3, 4, 5), 2),
                                          ((1, 6, 40, 40), 1)],
                         ids=["2d", "no_spatial", "3d", "one_group"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_backends_agree_fp32(activation, shape, groups, layout):
    _agree(shape, groups, activation=activation, proxy=True, proxy_params=True,
           channels_last=LAYOUTS[layout], dtype=torch.float32)


def test_backends_agree_fp16_with_fp32_params():
    """The interpreter has no bfloat16; fp16 activations with fp32 parameters cover the
    low-precision loads and stores."""
    _agree((2, 16, 6, 6), 4, activation="gelu", proxy=True, proxy_params=True,
           channels_last=False, dtype=torch.float16, param_dtype=torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_raw_ops_agree(layout):
    """The custom ops themselves: (y, mean, rstd) and the backward's outputs, op against op."""
    device, (_, other) = _backends()
    x, params = make_inputs((2, 8, 6, 5), device=device, channels_last=LAYOUTS[layout])
    x, params = x.detach(), {k: v.detach() for k, v in params.items()}
    args = (x, params["weight"], params["bias"], params["proxy_bias"], params["proxy_weight"], 4,
            activations.GELU, 0.01, 1e-5, 0.03, 50, True)
    forward_a = torch.ops.fusednorm_triton.forward(*args)
    forward_b = torch.ops.fusednorm.forward(*args)
    for a, b in zip(forward_a, forward_b):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
    grad_out = torch.randn_like(x)
    backward_args = (grad_out, *args[:5], forward_b[1], forward_b[2], 4, activations.GELU, 0.01,
                     0.03, 50, True)
    for a, b in zip(torch.ops.fusednorm_triton.backward(*backward_args),
                    torch.ops.fusednorm.backward(*backward_args)):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
