"""The fused op against the eager reference, for every fused backend that runs here (the
``fused_backend`` fixture: Triton under the interpreter or on CUDA, the C++ CPU kernels, the
CUDA kernels): activations and PN modes, odd shapes, dtypes, gradcheck, layouts, the raw ops'
outputs. Paths and machinery of one backend are tested in that backend's file."""
import pytest
import torch

import fusednorm
from fusednorm import activations, ops, reference
from conftest import ACTIVATIONS, ODD_SHAPES, check_against_reference, make_inputs

LAYOUTS = {"nchw": False, "channels_last": True}
MODES = {"pn+proxy_params": (True, True), "pn": (True, False), "no_pn": (False, False)}


def skip_bf16_in_the_interpreter(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 wrongly; bf16 Triton runs on CUDA")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_activations_and_modes(fused_backend, activation, mode, layout):
    backend, device = fused_backend
    proxy, proxy_params = MODES[mode]
    check_against_reference(backend, (2, 12, 5, 7), 3, activation=activation, proxy=proxy,
                            proxy_params=proxy_params, channels_last=LAYOUTS[layout],
                            device=device)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("proxy", [True, False], ids=["pn", "no_pn"])
@pytest.mark.parametrize("case", ODD_SHAPES)
def test_odd_shapes(fused_backend, case, proxy, layout):
    backend, device = fused_backend
    shape, groups = ODD_SHAPES[case]
    check_against_reference(backend, shape, groups, activation="silu", proxy=proxy,
                            channels_last=LAYOUTS[layout], device=device)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ["relu", "silu", ("leaky_relu", 0.1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision(fused_backend, dtype, activation, layout):
    backend, device = fused_backend
    skip_bf16_in_the_interpreter(backend, device, dtype)
    check_against_reference(backend, (2, 24, 9, 9), 4, activation=activation, dtype=dtype,
                            channels_last=LAYOUTS[layout], device=device)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mixed_precision_fp32_params(fused_backend, dtype, layout):
    """Half/bfloat16 activations with fp32 parameters (autocast-style): y and dx in the input's
    dtype, parameter gradients in fp32."""
    backend, device = fused_backend
    skip_bf16_in_the_interpreter(backend, device, dtype)
    check_against_reference(backend, (2, 16, 6, 6), 4, activation="silu", dtype=dtype,
                            param_dtype=torch.float32, channels_last=LAYOUTS[layout],
                            device=device)


@pytest.mark.parametrize("activation,proxy,channels_last",
                         [("relu", True, False), ("silu", True, True), ("gelu", True, False),
                          (("leaky_relu", 0.1), True, True), ("gelu_tanh", False, False),
                          ("identity", False, True)], ids=str)
def test_gradcheck_fp64(fused_backend, activation, proxy, channels_last):
    backend, device = fused_backend
    x, params = make_inputs((2, 4, 3, 2), device=device, proxy_params=proxy,
                            channels_last=channels_last)
    fn = fusednorm.group_norm_proxy_act if proxy else fusednorm.group_norm_act

    def op(x, *ps):
        return fn(x, 2, *ps, activation=activation, backend=backend)

    assert torch.autograd.gradcheck(op, (x, *params.values()), fast_mode=backend == "triton")


@pytest.mark.parametrize("activation,m,s", [("relu", 0.398451, 1.648373),
                                            ("silu", 0.206048, 1.714977)])
def test_proxy_statistics_at_init_match_the_table(fused_backend, activation, m, s):
    """With xhat = -1 and +1 (one group of two elements, eps = 0) the fused output is
    y = s * (act(+-1) - m), which gives back the kernel's proxy m and s (docs/pn-math.md table)."""
    backend, device = fused_backend
    x = torch.tensor([-1.0, 1.0], dtype=torch.float64, device=device).reshape(1, 1, 2)
    y = fusednorm.group_norm_proxy_act(x, 1, activation=activation, eps=0.0, backend=backend)
    y_minus, y_plus = y.flatten().tolist()
    act_minus, act_plus = (0.0, 1.0) if activation == "relu" else (-0.2689414213699951, 0.7310585786300049)
    scale = (y_plus - y_minus) / (act_plus - act_minus)
    assert scale == pytest.approx(s, abs=1e-6)
    assert act_plus - y_plus / scale == pytest.approx(m, abs=1e-6)


def test_non_dense_input_and_grad_layouts(fused_backend):
    """A strided view (neither contiguous nor channels-last) is computed on a copy and gives a
    contiguous output; a gradient in another layout than x is accepted."""
    backend, device = fused_backend
    base = torch.randn(2, 8, 6, 10, dtype=torch.float64, device=device)
    x = base[..., ::2].requires_grad_()
    y = fusednorm.group_norm_proxy_act(x, 4, backend=backend)
    assert y.is_contiguous()
    y_ref = reference.group_norm_proxy_act(x, 4)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y).to(memory_format=torch.channels_last)
    torch.testing.assert_close(torch.autograd.grad(y, x, grad)[0],
                               torch.autograd.grad(y_ref, x, grad)[0])


def _raw_forward_args(x, params, proxy, groups):
    return (x, params["weight"], params["bias"], params.get("proxy_bias"),
            params.get("proxy_weight"), groups, activations.SILU, 0.01, 1e-5, 0.03, 16, proxy)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_raw_op_outputs(fused_backend, dtype):
    """The op pair itself: dtypes and layouts of every output, no aliasing, and zero proxy
    gradients when PN is off or the proxy parameters are absent."""
    backend, device = fused_backend
    x, params = make_inputs((2, 6, 3, 4), dtype=dtype, param_dtype=torch.float32, device=device,
                            proxy_params=False, channels_last=True)
    x, params = x.detach(), {k: v.detach() for k, v in params.items()}
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    forward, backward = ops.forward_op(backend), ops.backward_op(backend)
    for proxy in (True, False):
        y, mean, rstd = forward(*_raw_forward_args(x, params, proxy, 3))
        assert y.dtype == dtype and y.stride() == torch.empty_like(x).stride()
        assert mean.shape == rstd.shape == (2, 3) and mean.dtype == rstd.dtype == stats_dtype
        outs = backward(torch.randn_like(x), x, params["weight"], params["bias"], None, None,
                        mean, rstd, 3, activations.SILU, 0.01, 0.03, 16, proxy)
        dx, dweight, dbias, dproxy_bias, dproxy_weight = outs
        assert dx.dtype == dtype and dx.stride() == x.stride()
        assert all(t.dtype == torch.float32 and t.shape == (6,) for t in outs[1:])
        assert torch.count_nonzero(dproxy_bias) == 0 and torch.count_nonzero(dproxy_weight) == 0
        pointers = [t.data_ptr() for t in (y, mean, rstd, *outs)]
        assert len(set(pointers)) == len(pointers)
        assert not {x.data_ptr(), *(p.data_ptr() for p in params.values())} & set(pointers)
