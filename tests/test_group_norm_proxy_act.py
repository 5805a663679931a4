"""The fused Triton kernels against the eager reference (interpreter on CPU, or CUDA)."""
import pytest
import torch

import fusednorm
from fusednorm.kernels import group_norm_proxy_act as kernels
from conftest import ACTIVATIONS, ODD_SHAPES, check_against_reference, make_inputs, triton_device

PROXY_MODES = {"pn+proxy_params": (True, True), "pn": (True, False), "no_pn": (False, False)}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mode", PROXY_MODES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_activations_and_modes(activation, mode, channels_last):
    proxy, proxy_params = PROXY_MODES[mode]
    check_against_reference("triton", (2, 12, 5, 7), 3, activation=activation, proxy=proxy,
                            proxy_params=proxy_params, channels_last=channels_last,
                            device=triton_device())


SHAPES = {
    **ODD_SHAPES,
    "split_reduction": ((1, 8, 64, 64), 1),  # N*G=1: the group is reduced by several programs
    "many_groups": ((5, 64, 3, 3), 32),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("proxy", [True, False], ids=["pn", "no_pn"])
@pytest.mark.parametrize("case", SHAPES)
def test_shapes(case, proxy, channels_last):
    shape, groups = SHAPES[case]
    check_against_reference("triton", shape, groups, activation="silu", proxy=proxy,
                            channels_last=channels_last, device=triton_device())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_low_precision(dtype, activation, channels_last):
    check_against_reference("triton", (2, 16, 9, 9), 4, activation=activation, dtype=dtype,
                            channels_last=channels_last, device=triton_device())


def test_mixed_precision_fp32_params_fp16_input():
    """fp16 activations with fp32 parameters (autocast-style): output and dx in fp16, parameter
    gradients in fp32."""
    check_against_reference("triton", (2, 16, 6, 6), 4, activation="silu", dtype=torch.float16,
                            param_dtype=torch.float32, device=triton_device())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("proxy", [True, False], ids=["pn", "no_pn"])
def test_cuda_dtypes(dtype, channels_last, proxy):
    """On a CUDA device: every dtype (bf16 only here: the interpreter gets bf16 wrong) and both
    memory formats, on shapes large enough for the real tile sizes and split paths."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (bf16 is not supported by the Triton interpreter)")
    for shape, groups in [((4, 64, 28, 28), 8), ((1, 256, 56, 56), 1), ((8, 96, 7, 7), 32)]:
        check_against_reference("triton", shape, groups, activation="relu", proxy=proxy,
                                dtype=dtype, param_dtype=torch.float32,
                                channels_last=channels_last, device="cuda")


@pytest.mark.parametrize("activation,proxy", [("relu", True), ("silu", True),
                                              (("leaky_relu", 0.1), True), ("gelu_tanh", False)],
                         ids=str)
def test_gradcheck_fp64(activation, proxy):
    device = triton_device()
    x, params = make_inputs((2, 4, 3), device=device, proxy_params=proxy)
    fn = fusednorm.group_norm_proxy_act if proxy else fusednorm.group_norm_act

    def op(x, *ps):
        return fn(x, 2, *ps, activation=activation, backend="triton")

    assert torch.autograd.gradcheck(op, (x, *params.values()), fast_mode=True)


def test_split_and_unsplit_statistics_agree():
    """The same group reduced by one program (N*G large) and by several (N*G = 1)."""
    device = triton_device()
    x, params = make_inputs((8, 4, 64, 48), dtype=torch.float32, device=device)
    batched = fusednorm.group_norm_proxy_act(x, 1, **params, backend="triton")
    single = torch.cat([fusednorm.group_norm_proxy_act(x[i:i + 1], 1, **params, backend="triton")
                        for i in range(x.shape[0])])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_non_dense_input_is_handled():
    """A strided view that is neither contiguous nor channels-last: computed on a copy, output
    contiguous, gradients still right."""
    device = triton_device()
    base = torch.randn(2, 8, 6, 10, dtype=torch.float64, device=device)
    x = base[..., ::2].requires_grad_()
    y = fusednorm.group_norm_proxy_act(x, 4, backend="triton")
    y_ref = fusednorm.reference.group_norm_proxy_act(x, 4)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])


@pytest.mark.parametrize("activation,m,s", [("relu", 0.398451, 1.648373),
                                            ("silu", 0.206048, 1.714977)])
def test_proxy_statistics_at_init_match_pn_math_table(fused_backend, activation, m, s):
    """With xhat = -1 and +1 (one group of two elements, eps = 0) the fused output is
    y = s * (act(+-1) - m), which gives back the kernel's proxy m and s (pn-math.md table)."""
    backend, device = fused_backend
    x = torch.tensor([[[-1.0], [1.0]]], dtype=torch.float64, device=device).reshape(1, 1, 2)
    y = fusednorm.group_norm_proxy_act(x, 1, activation=activation, eps=0.0, backend=backend)
    y_minus, y_plus = y.flatten().tolist()
    act_minus, act_plus = (0.0, 1.0) if activation == "relu" else (-0.2689414213699951, 0.7310585786300049)
    scale = (y_plus - y_minus) / (act_plus - act_minus)
    assert scale == pytest.approx(s, abs=1e-6)
    assert act_plus - y_plus / scale == pytest.approx(m, abs=1e-6)


def test_absent_proxy_params_get_zero_gradients_from_the_raw_op():
    device = triton_device()
    x, params = make_inputs((2, 4, 3), device=device, proxy_params=False)
    args = (x.detach(), params["weight"].detach(), params["bias"].detach(), None, None, 2, 1, 0.01,
            1e-5, 0.03, 16, True)
    _, mean, rstd = torch.ops.fusednorm_triton.forward(*args)
    grads = torch.ops.fusednorm_triton.backward(torch.ones_like(x), *args[:5], mean, rstd,
                                                2, 1, 0.01, 0.03, 16, True)
    assert torch.equal(grads[3], torch.zeros_like(grads[3]))
    assert torch.equal(grads[4], torch.zeros_like(grads[4]))


@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
def test_empty_batch(backend):
    device = triton_device() if backend == "triton" else "cpu"
    x = torch.randn(0, 8, 4, 4, device=device, requires_grad=True)
    y = fusednorm.group_norm_proxy_act(x, 2, backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_tensor_on_a_device_that_is_not_current():
    """Triton launches on the current CUDA device: the launchers make x's device current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    x, params = make_inputs((2, 8, 5, 5), dtype=torch.float32, device="cuda:1")
    assert torch.cuda.current_device() == 0
    y = fusednorm.group_norm_proxy_act(x, 4, **params, backend="triton")
    y.backward(torch.ones_like(y))
    ref = fusednorm.reference.group_norm_proxy_act(x.detach().cpu(), 4,
                                                   **{k: v.detach().cpu() for k, v in params.items()})
    torch.testing.assert_close(y.cpu(), ref.float(), rtol=1e-4, atol=1e-4)
    assert x.grad.device == x.device and torch.isfinite(x.grad).all()


PATH_SHAPES = {
    **ODD_SHAPES,
    "large_groups": ((3, 16, 9, 10), 2),  # over the interpreter's resident limit
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("proxy", [True, False], ids=["pn", "no_pn"])
@pytest.mark.parametrize("case", PATH_SHAPES)
@pytest.mark.parametrize("path", kernels.PATHS)
def test_every_path(path, case, proxy, channels_last, monkeypatch):
    """Each path of the launch rule forced through $FUSEDNORM_TRITON_PATH (the knob the
    benchmark uses), on every odd shape; resident refuses a group it cannot hold, saying so."""
    monkeypatch.setenv(kernels.PATH_ENV, path)
    shape, groups = PATH_SHAPES[case]
    device = triton_device()
    traits = kernels.device_traits(torch.device(device))
    spatial = torch.Size(shape[2:]).numel()
    if path == "resident" and kernels._group_tile(shape[1] // groups, spatial, traits) is None:
        x = torch.randn(shape, device=device)
        with pytest.raises(ValueError, match="does not fit one program"):
            fusednorm.group_norm_proxy_act(x, groups, backend="triton")
        return
    check_against_reference("triton", shape, groups, activation="gelu", proxy=proxy,
                            channels_last=channels_last, device=device)


@pytest.mark.parametrize("path", kernels.PATHS)
def test_backward_is_bitwise_deterministic(path, monkeypatch):
    monkeypatch.setenv(kernels.PATH_ENV, path)
    shape = (2, 8, 6, 5) if path == "resident" else (3, 16, 9, 10)
    x, params = make_inputs(shape, dtype=torch.float32, device=triton_device())
    grad_out = torch.randn_like(x)
    runs = [torch.autograd.grad(fusednorm.group_norm_proxy_act(x, 2, **params, backend="triton"),
                                [x, *params.values()], grad_out) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_unknown_path_is_an_error(monkeypatch):
    monkeypatch.setenv(kernels.PATH_ENV, "fastest")
    x = torch.randn(2, 4, 3, device=triton_device())
    with pytest.raises(ValueError, match="FUSEDNORM_TRITON_PATH"):
        fusednorm.group_norm_proxy_act(x, 2, backend="triton")
