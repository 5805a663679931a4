"""The C++ CPU kernels (fusednorm::forward/backward on CPU) against the eager reference.

Every comparison is against the fp64 reference: fp64 kernels to ~1e-10, other dtypes within
2x the eager reference's own error in that dtype (conftest.check_against_reference).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusednorm
from fusednorm import activations, ops, reference
from conftest import ACTIVATIONS, ODD_SHAPES, check_against_reference, make_inputs, to_layout

pytestmark = pytest.mark.skipif(
    not ops.extension_has_kernel("cpu"),
    reason="the C++ extension fusednorm._C is not built (pip install --no-build-isolation -e .)")

LAYOUTS = {"nchw": False, "channels_last": True}
MODES = {"pn+proxy_params": (True, True), "pn": (True, False), "no_pn": (False, False)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_activations_and_modes(activation, mode, layout):
    proxy, proxy_params = MODES[mode]
    check_against_reference("cpu", (2, 12, 5, 7), 3, activation=activation, proxy=proxy,
                            proxy_params=proxy_params, channels_last=LAYOUTS[layout])


SHAPES = {
    **ODD_SHAPES,
    # N*G = 1: the passes run one after another over chunks/rows; S > 4096: several chunks.
    "one_group_long": ((1, 4, 70, 70), 1),
    # channels-last with several row tasks per sample and a C that is no multiple of a vector.
    "many_rows": ((2, 20, 120, 120), 5),
    "many_groups": ((5, 64, 3, 3), 32),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("proxy", [True, False], ids=["pn", "no_pn"])
@pytest.mark.parametrize("case", SHAPES)
def test_shapes(case, proxy, layout):
    shape, groups = SHAPES[case]
    check_against_reference("cpu", shape, groups, activation="silu", proxy=proxy,
                            channels_last=LAYOUTS[layout])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ["relu", "gelu", ("leaky_relu", 0.1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision(dtype, activation, layout):
    check_against_reference("cpu", (2, 24, 9, 9), 4, activation=activation, dtype=dtype,
                            channels_last=LAYOUTS[layout])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mixed_precision_fp32_params(dtype, layout):
    """Half/bfloat16 activations with fp32 parameters: y and dx in the input's dtype, parameter
    gradients in fp32."""
    check_against_reference("cpu", (2, 16, 6, 6), 4, activation="silu", dtype=dtype,
                            param_dtype=torch.float32, channels_last=LAYOUTS[layout])


@pytest.mark.parametrize("activation,proxy,channels_last",
                         [("relu", True, False), ("silu", True, True), ("gelu", True, False),
                          (("leaky_relu", 0.1), True, True), ("gelu_tanh", False, False),
                          ("identity", False, True)], ids=str)
def test_gradcheck_fp64(activation, proxy, channels_last):
    x, params = make_inputs((2, 4, 3, 2), proxy_params=proxy, channels_last=channels_last)
    fn = fusednorm.group_norm_proxy_act if proxy else fusednorm.group_norm_act

    def op(x, *ps):
        return fn(x, 2, *ps, activation=activation, backend="cpu")

    assert torch.autograd.gradcheck(op, (x, *params.values()))


def test_proxy_statistics_at_initialisation():
    """pn-math.md's table: with gamma = 1, beta = 0 the output is s * (relu(xhat) - m), so the
    kernel's proxy mean and scale can be read off a constant-free input."""
    x = torch.randn(4, 8, 16, 16, dtype=torch.float64)
    out = fusednorm.group_norm_proxy_act(x, 2, backend="cpu")
    xhat = torch.nn.functional.group_norm(x, 2, eps=1e-5)
    torch.testing.assert_close(out, 1.648373 * (torch.relu(xhat) - 0.398451), rtol=0, atol=2e-5)


@pytest.mark.parametrize("shape,groups", [((2, 16, 24, 24), 4), ((1, 8, 40, 40), 1),
                                          ((2, 12, 5, 6, 7), 3)], ids=["4d", "one_group", "3d"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_offset_data_fp32_matches_fp64(shape, groups, layout):
    """1e4 + randn in fp32: the statistics must not cancel; what is left is the input's own fp32
    rounding (ulp ~1e-3 at 1e4) passing through the normalisation."""
    x = 1e4 + torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = to_layout(x, LAYOUTS[layout])
    x.requires_grad_()
    out = fusednorm.group_norm_proxy_act(x, groups, activation="silu", backend="cpu")
    x64 = x.detach().double().requires_grad_()
    exact = reference.group_norm_proxy_act(x64, groups, activation="silu")
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-3)
    grad = torch.randn_like(exact)
    (dx,) = torch.autograd.grad(out, x, grad.float())
    (dx_exact,) = torch.autograd.grad(exact, x64, grad)
    torch.testing.assert_close(dx.double(), dx_exact, rtol=0, atol=2e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_constant_group_gives_finite_output_and_gradients(layout):
    x = torch.randn(2, 8, 5, 5)
    x[0, :4] = 3.0  # group (n=0, g=0) is constant: variance 0
    x = to_layout(x, LAYOUTS[layout]).requires_grad_()
    out = fusednorm.group_norm_proxy_act(x, 2, backend="cpu")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference.group_norm_proxy_act(x.detach(), 2),
                               rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("activation", ["relu", "silu", ("leaky_relu", 0.1)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_in_gives_nan_out(layout, activation):
    x = torch.randn(2, 8, 5, 5)
    x[1, 5, 2, 2] = float("nan")  # group (n=1, g=1)
    x = to_layout(x, LAYOUTS[layout])
    for fn in (fusednorm.group_norm_proxy_act, fusednorm.group_norm_act):
        out = fn(x, 2, activation=activation, backend="cpu")
        assert torch.isnan(out[1, 4:]).all(), "every element of the NaN's group must be NaN"
        assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, :4]).all()


def _grads(x, params, groups, grad_out):
    out = fusednorm.group_norm_proxy_act(x, groups, **params, backend="cpu")
    return (out, *torch.autograd.grad(out, [x, *params.values()], grad_out))


@pytest.mark.parametrize("shape,groups", [((4, 16, 20, 20), 4), ((1, 8, 70, 70), 1)],
                         ids=["group_per_task", "split_passes"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bitwise_deterministic_and_thread_count_independent(shape, groups, layout):
    x, params = make_inputs(shape, dtype=torch.float32, channels_last=LAYOUTS[layout])
    grad_out = to_layout(torch.randn(shape), LAYOUTS[layout])
    first, second = _grads(x, params, groups, grad_out), _grads(x, params, groups, grad_out)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _grads(x, params, groups, grad_out)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


def test_non_dense_input_and_grad_layouts():
    """A strided view (neither contiguous nor channels-last) is computed on a copy; a gradient
    in another layout than x is accepted."""
    base = torch.randn(2, 8, 6, 10, dtype=torch.float64)
    x = base[..., ::2].requires_grad_()
    y = fusednorm.group_norm_proxy_act(x, 4, backend="cpu")
    assert y.is_contiguous()
    y_ref = reference.group_norm_proxy_act(x, 4)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y).to(memory_format=torch.channels_last)
    torch.testing.assert_close(torch.autograd.grad(y, x, grad)[0],
                               torch.autograd.grad(y_ref, x, grad)[0])


def _raw_forward_args(x, params, proxy, groups=2, activation=activations.SILU):
    return (x, params["weight"], params["bias"], params.get("proxy_bias"),
            params.get("proxy_weight"), groups, activation, 0.01, 1e-5, 0.03, 16, proxy)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 4), (2, 4, 3, 2, 2)], ids=["no_spatial", "3d"])
def test_opcheck(shape, dtype):
    x, params = make_inputs(shape, dtype=dtype, param_dtype=torch.float32, channels_last=True)
    args = _raw_forward_args(x, params, True)
    torch.library.opcheck(torch.ops.fusednorm.forward.default, args)
    _, mean, rstd = torch.ops.fusednorm.forward(*args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:5]]
    backward_args = (torch.randn_like(x.detach()), *detached, mean, rstd, 2, activations.SILU,
                     0.01, 0.03, 16, True)
    torch.library.opcheck(torch.ops.fusednorm.backward.default, backward_args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_raw_op_outputs(dtype):
    """Dtypes, layouts, no aliasing, and zero proxy gradients when PN is off or they are absent."""
    x, params = make_inputs((2, 6, 3, 4), dtype=dtype, param_dtype=torch.float32,
                            proxy_params=False, channels_last=True)
    x, params = x.detach(), {k: v.detach() for k, v in params.items()}
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for proxy in (True, False):
        y, mean, rstd = torch.ops.fusednorm.forward(*_raw_forward_args(x, params, proxy, 3))
        assert y.dtype == dtype and y.stride() == torch.empty_like(x).stride()
        assert mean.shape == rstd.shape == (2, 3) and mean.dtype == rstd.dtype == stats_dtype
        outs = torch.ops.fusednorm.backward(
            torch.randn_like(x), x, params["weight"], params["bias"], None, None, mean, rstd, 3,
            activations.SILU, 0.01, 0.03, 16, proxy)
        dx, dweight, dbias, dproxy_bias, dproxy_weight = outs
        assert dx.dtype == dtype and dx.stride() == x.stride()
        assert all(t.dtype == torch.float32 and t.shape == (6,) for t in outs[1:])
        assert torch.count_nonzero(dproxy_bias) == 0 and torch.count_nonzero(dproxy_weight) == 0
        pointers = [t.data_ptr() for t in (y, mean, rstd, *outs)]
        assert len(set(pointers)) == len(pointers)
        assert not {x.data_ptr(), *(p.data_ptr() for p in params.values())} & set(pointers)


def test_raw_op_rejects_bad_arguments():
    x = torch.randn(2, 8, 3, 3)
    w, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match="not divisible by num_groups=3"):
        torch.ops.fusednorm.forward(x, w, b, None, None, 3, 1, 0.0, 1e-5, 0.03, 16, True)
    with pytest.raises(RuntimeError, match="unknown activation id 9"):
        torch.ops.fusednorm.forward(x, w, b, None, None, 2, 9, 0.0, 1e-5, 0.03, 16, True)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(C,\)"):
        torch.ops.fusednorm.forward(x, torch.ones(4), b, None, None, 2, 1, 0.0, 1e-5, 0.03, 16,
                                    True)
    _, mean, rstd = torch.ops.fusednorm.forward(x, w, b, None, None, 2, 1, 0.0, 1e-5, 0.03, 16,
                                                True)
    with pytest.raises(RuntimeError, match=r"mean and rstd must have shape \(N, G\)"):
        torch.ops.fusednorm.backward(x, x, w, b, None, None, mean[:1], rstd, 2, 1, 0.0, 0.03, 16,
                                     True)


@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (2, 8, 0)], ids=["N=0", "S=0"])
def test_empty_input(shape):
    x = torch.randn(shape)
    w, b = torch.ones(8), torch.zeros(8)
    y, mean, rstd = torch.ops.fusednorm.forward(x, w, b, None, None, 2, 1, 0.0, 1e-5, 0.03, 16,
                                                True)
    assert y.shape == x.shape and mean.shape == (shape[0], 2)
    dx, dw, *_ = torch.ops.fusednorm.backward(x, x, w, b, None, None, mean, rstd, 2, 1, 0.0, 0.03,
                                              16, True)
    assert dx.shape == x.shape and torch.count_nonzero(dw) == 0


def test_saves_only_input_and_group_statistics():
    """Memory kept for the backward: x itself, (N, G) statistics and the (C,) parameters."""
    x, params = make_inputs((4, 16, 12, 12), dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fusednorm.group_norm_proxy_act(x, 4, **params, backend="cpu")
    assert any(t.data_ptr() == x.data_ptr() for t in saved)
    activation_bytes = sum(t.numel() * t.element_size() for t in saved if t.dim() != 1)
    assert activation_bytes <= x.numel() * x.element_size() + 2 * 4 * 4 * 4


def test_auto_backend_picks_cpu_kernel():
    assert fusednorm.select_backend("auto", torch.randn(2, 4)) == "cpu"


SUBPROCESS_CHECK = textwrap.dedent("""
    import sys, torch, fusednorm
    from fusednorm import _C
    from conftest import check_against_reference
    assert _C.cpu_capability() == sys.argv[1], (_C.cpu_capability(), sys.argv[1])
    for channels_last in (False, True):
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            check_against_reference("cpu", (2, 20, 9, 7), 5, activation="gelu", dtype=dtype,
                                    channels_last=channels_last)
            check_against_reference("cpu", (1, 4, 70, 70), 1, activation="relu", dtype=dtype,
                                    proxy=False, channels_last=channels_last)
""")


def test_every_built_instruction_set():
    """Each copy of the kernels (DEFAULT, and AVX2/AVX512 where built and supported), chosen
    with ATen's ATEN_CPU_CAPABILITY, against the reference: CI machines differ in what they use."""
    levels = ["DEFAULT", "AVX2", "AVX512"]
    best = fusednorm._C.cpu_capability()
    for level in levels[:levels.index(best)]:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=level.lower())
        result = subprocess.run([sys.executable, "-c", SUBPROCESS_CHECK, level], env=env,
                                cwd=os.path.dirname(__file__), capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{level} kernels:\n{result.stderr[-3000:]}"
