"""What belongs to the CUDA kernels of the C++ extension alone: shapes that reach their split
reductions, CUDA-sized tiles in every dtype, agreement with the Triton kernels, streams, 64-bit
indexing. The op itself is checked for every backend in test_group_norm_proxy_act.py. Every test
skips without a CUDA device or without the extension's CUDA kernels (built only against a CUDA
build of torch, with nvcc)."""
import pytest
import torch

import fusednorm
from fusednorm import activations, ops, reference
from conftest import (assert_within_reference_error, check_against_reference, make_inputs,
                      run_forward_backward, to_layout)

LAYOUTS = {"nchw": False, "channels_last": True}


@pytest.fixture(autouse=True)
def _cuda_kernel():
    """Skips (at test time, so that collection never touches a GPU) when the kernel cannot run."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not ops.extension_has_kernel("cuda"):
        pytest.skip("the C++ extension is built without CUDA kernels (needs a CUDA build of "
                    "torch and nvcc; pip install --no-build-isolation -e .)")


SHAPES = {
    # Few groups / rows: the statistics and the partial sums are split over several blocks.
    "split_group": ((1, 64, 96, 96), 1),
    "split_rows": ((2, 40, 100, 100), 5),
    "many_groups": ((64, 128, 7, 7), 32),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("proxy", [True, False], ids=["pn", "no_pn"])
@pytest.mark.parametrize("case", SHAPES)
def test_split_shapes(case, proxy, layout):
    shape, groups = SHAPES[case]
    check_against_reference("cuda", shape, groups, activation="silu", proxy=proxy,
                            channels_last=LAYOUTS[layout], device="cuda")


@pytest.mark.parametrize("proxy", [True, False], ids=["pn", "no_pn"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("param_dtype", [None, torch.float32], ids=["same_params", "fp32_params"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_tiles_every_dtype(dtype, param_dtype, layout, proxy):
    for shape, groups in [((4, 64, 28, 28), 8), ((1, 256, 56, 56), 1), ((8, 96, 7, 7), 32)]:
        check_against_reference("cuda", shape, groups, activation="relu", proxy=proxy,
                                dtype=dtype, param_dtype=param_dtype,
                                channels_last=LAYOUTS[layout], device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu_tanh"])
def test_cuda_and_triton_agree(activation, layout, dtype):
    """Both fused GPU backends on the same inputs, each within the reference's own error."""
    shape, groups = (4, 64, 20, 20), 8
    x, params = make_inputs(shape, dtype=dtype, param_dtype=torch.float32, device="cuda",
                            channels_last=LAYOUTS[layout])
    grad_out = to_layout(torch.randn(shape, device="cuda", dtype=dtype), LAYOUTS[layout])
    results = {
        backend: run_forward_backward(
            lambda x, **p: fusednorm.group_norm_proxy_act(x, groups, **p, activation=activation,
                                                          backend=backend),
            x, params, grad_out)
        for backend in ("cuda", "triton")}
    x64 = x.detach().double().requires_grad_()
    params64 = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    ref_out, ref_grads = run_forward_backward(
        lambda x, **p: reference.group_norm_proxy_act(x, groups, **p, activation=activation),
        x64, params64, grad_out.double())
    lowp_out, lowp_grads = run_forward_backward(
        lambda x, **p: reference.group_norm_proxy_act(x, groups, **p, activation=activation),
        x.detach().clone().requires_grad_(),
        {k: v.detach().clone().requires_grad_() for k, v in params.items()}, grad_out)
    for backend, (out, grads) in results.items():
        assert_within_reference_error(out, lowp_out, ref_out, f"{backend} output")
        for name in grads:
            assert_within_reference_error(grads[name], lowp_grads[name], ref_grads[name],
                                          f"{backend} grad of {name}")
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(results["cuda"][0], results["triton"][0], rtol=0,
                               atol=tolerance * max(1.0, ref_out.abs().max().item()))


@pytest.mark.parametrize("shape,groups", [((1, 32, 128, 128), 1)], ids=["split"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_backward_is_bitwise_deterministic(shape, groups, layout):
    x, params = make_inputs(shape, dtype=torch.float32, device="cuda",
                            channels_last=LAYOUTS[layout])
    grad_out = torch.randn_like(x)

    def grads():
        out = fusednorm.group_norm_proxy_act(x, groups, **params, backend="cuda")
        return torch.autograd.grad(out, [x, *params.values()], grad_out)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_runs_on_the_current_stream_and_device():
    x, params = make_inputs((2, 8, 6, 6), dtype=torch.float32, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = fusednorm.group_norm_proxy_act(x, 2, **params, backend="cuda")
    stream.synchronize()
    torch.testing.assert_close(out, reference.group_norm_proxy_act(x, 2, **params),
                               rtol=1e-5, atol=1e-5)


def test_64bit_indexing():
    """More than 2^31 elements: the int64 index path. A pattern repeated along S has the
    statistics of one period, so the output is the reference's on one period, tiled, and the
    parameter gradients are the period's times the number of repeats."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    period, repeats, groups = 64, 2**25 + 1, 2
    shape = (2, 16, period)
    x_small, params = make_inputs(shape, dtype=torch.float32, device="cuda")
    params = {k: v.detach() for k, v in params.items()}
    g_small = torch.randn(shape, device="cuda")
    x = x_small.detach().to(torch.bfloat16).repeat(1, 1, repeats)
    assert x.numel() > 2**31
    g = g_small.to(torch.bfloat16).repeat(1, 1, repeats)
    args = (params["weight"], params["bias"], params["proxy_bias"], params["proxy_weight"],
            groups, activations.RELU, 0.0, 1e-5, 0.03, 200, True)
    y, mean, rstd = torch.ops.fusednorm.forward(x, *args)
    dx, *param_grads = torch.ops.fusednorm.backward(g, x, *args[:4], mean, rstd, *args[4:6],
                                                    0.0, 0.03, 200, True)
    x_ref = x[..., :period].float().requires_grad_()
    ref_params = {k: v.clone().requires_grad_() for k, v in params.items()}
    y_ref, ref_grads = run_forward_backward(
        lambda x, **p: reference.group_norm_proxy_act(x, groups, **p, activation="relu"),
        x_ref, ref_params, g[..., :period].float())
    for part in (slice(0, period), slice(-period, None)):
        torch.testing.assert_close(y[..., part].float(), y_ref, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(dx[..., part].float(), ref_grads["x"], rtol=2e-2, atol=2e-2)
    for got, name in zip(param_grads, ["weight", "bias", "proxy_bias", "proxy_weight"]):
        torch.testing.assert_close(got / repeats, ref_grads[name], rtol=2e-2, atol=2e-2)
