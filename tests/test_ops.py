"""torch.library registration: opcheck of the custom ops, torch.compile(fullgraph=True)."""
import pytest
import torch

import fusednorm
from fusednorm import activations, ops, reference
from fusednorm.proxy import proxy_stats
from conftest import make_inputs, triton_device


def _forward_args(x, params, proxy, activation=activations.SILU):
    return (x, params["weight"], params["bias"], params.get("proxy_bias"),
            params.get("proxy_weight"), 2, activation, 0.01, 1e-5, 0.03, 16, proxy)


@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (2, 4), (2, 4, 3, 2, 2)],
                         ids=["4d", "no_spatial", "3d"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("proxy,proxy_params", [(True, True), (True, False), (False, False)],
                         ids=["pn+proxy_params", "pn", "no_pn"])
def test_opcheck_forward_and_backward(fused_backend, proxy, proxy_params, channels_last, shape):
    backend, device = fused_backend
    x, params = make_inputs(shape, dtype=torch.float32, device=device,
                            proxy_params=proxy_params, channels_last=channels_last)
    args = _forward_args(x, params, proxy)
    torch.library.opcheck(ops.forward_op(backend).default, args)
    _, mean, rstd = ops.forward_op(backend)(*args)
    grad_out = torch.randn_like(x)
    backward_args = (grad_out, x.detach(), *(a.detach() if isinstance(a, torch.Tensor) else a
                                             for a in args[1:5]),
                     mean, rstd, 2, activations.SILU, 0.01, 0.03, 16, proxy)
    torch.library.opcheck(ops.backward_op(backend).default, backward_args)


def test_saves_only_input_and_group_statistics(fused_backend):
    """Activation memory kept for backward: x itself plus (N, G) statistics, the parameters and
    (the extension) the (2, C) proxy statistics."""
    backend, device = fused_backend
    x, params = make_inputs((4, 16, 12, 12), dtype=torch.float32, device=device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fusednorm.group_norm_proxy_act(x, 4, **params, backend=backend)
    activation_bytes = sum(t.numel() * t.element_size() for t in saved if t.dim() != 1)
    assert any(t is x or t.data_ptr() == x.data_ptr() for t in saved)
    assert activation_bytes <= x.numel() * x.element_size() + 2 * 4 * 4 * 4 + 2 * 16 * 4


def test_autograd_of_the_op(fused_backend):
    """The op's autograd (C++ for the extension, Python for Triton): mean/rstd never require
    grad, no graph under no_grad, and gradients only for the inputs that require them, equal to
    those of the same call with every input requiring grad."""
    backend, device = fused_backend
    x, params = make_inputs((2, 8, 5, 3), dtype=torch.float32, device=device)
    args = _forward_args(x, params, True)
    with torch.no_grad():
        assert not any(t.requires_grad for t in ops.forward_op(backend)(*args))
    y, mean, rstd = ops.forward_op(backend)(*args)
    assert y.requires_grad and not mean.requires_grad and not rstd.requires_grad
    grad_y = torch.randn_like(y)
    full = torch.autograd.grad(y, [x, *(params[k] for k in ("weight", "bias", "proxy_bias",
                                                             "proxy_weight"))], grad_y)
    x_only = x.detach().requires_grad_()
    frozen = {k: v.detach() for k, v in params.items()}
    y_x, _, _ = ops.forward_op(backend)(*_forward_args(x_only, frozen, True))
    (dx,) = torch.autograd.grad(y_x, [x_only], grad_y)
    torch.testing.assert_close(dx, full[0], rtol=0, atol=0)
    bias_only = params["bias"].detach().requires_grad_()
    y_b, _, _ = ops.forward_op(backend)(*_forward_args(x.detach(), dict(frozen, bias=bias_only),
                                                       True))
    (dbias,) = torch.autograd.grad(y_b, [bias_only], grad_y)
    torch.testing.assert_close(dbias, full[2], rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_opcheck_proxy_statistics_and_given_stats(extension_backend, channels_last):
    """fusednorm::proxy_statistics, and forward/backward given its result (what the extension's
    autograd does once per step): opcheck, the reference's m and s, and bit-equal outputs to
    the calls that compute the statistics themselves."""
    backend, device = extension_backend
    x, params = make_inputs((2, 4, 3, 5), dtype=torch.float32, device=device,
                            channels_last=channels_last)
    args = _forward_args(x, params, True)
    param_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a
                       for a in (x, *args[1:5], activations.SILU, 0.01, 0.03, 16))
    torch.library.opcheck(torch.ops.fusednorm.proxy_statistics.default, param_args)
    stats = torch.ops.fusednorm.proxy_statistics(*param_args)
    m, _, s = proxy_stats(*(params[k].detach().double() for k in ("weight", "bias", "proxy_bias",
                                                                  "proxy_weight")),
                          activations.parse_activation("silu")[0], 0.01, 16, 0.03)
    torch.testing.assert_close(stats, torch.stack([m, s]).float(), rtol=1e-5, atol=1e-6)

    torch.library.opcheck(torch.ops.fusednorm.forward.default, (*args, stats))
    y, mean, rstd = torch.ops.fusednorm.forward(*(a.detach() if isinstance(a, torch.Tensor)
                                                  else a for a in args), stats)
    for got, want in zip((y, mean, rstd), torch.ops.fusednorm.forward(*args)):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    backward_args = (torch.randn_like(x), x.detach(), *(a.detach() for a in args[1:5]), mean,
                     rstd, 2, activations.SILU, 0.01, 0.03, 16, True)
    torch.library.opcheck(torch.ops.fusednorm.backward.default, (*backward_args, stats))
    for got, want in zip(torch.ops.fusednorm.backward(*backward_args, stats),
                         torch.ops.fusednorm.backward(*backward_args)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_given_proxy_stats_are_checked(extension_backend):
    backend, device = extension_backend
    x, params = make_inputs((2, 4, 3, 5), dtype=torch.float32, device=device)
    args = _forward_args(x, params, True)
    with torch.no_grad():
        stats = torch.ops.fusednorm.proxy_statistics(x, *args[1:5], activations.SILU, 0.01, 0.03,
                                                     16)
    with pytest.raises(RuntimeError, match=r"proxy_stats must have shape \(2, C\) = \(2, 4\)"):
        torch.ops.fusednorm.forward(*args, stats[:, :3])
    with pytest.raises(RuntimeError, match="proxy_stats must be Float for Float input"):
        torch.ops.fusednorm.forward(*args, stats.double())
    with pytest.raises(RuntimeError, match="proxy_stats is a constant of the call"):
        torch.ops.fusednorm.forward(*args, stats.detach().requires_grad_())
    with pytest.raises(RuntimeError, match="proxy_statistics is not differentiable"):
        torch.ops.fusednorm.proxy_statistics(x, *args[1:5], activations.SILU, 0.01, 0.03, 16)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="proxy_statistics: unknown activation id 9"):
            torch.ops.fusednorm.proxy_statistics(x, *args[1:5], 9, 0.01, 0.03, 16)
        with pytest.raises(RuntimeError, match="num_proxy_samples must be >= 2"):
            torch.ops.fusednorm.proxy_statistics(x, *args[1:5], activations.SILU, 0.01, 0.03, 1)
        with pytest.raises(RuntimeError, match=r"proxy_statistics: bias must have shape \(C,\)"):
            torch.ops.fusednorm.proxy_statistics(x, args[1], args[2][:3], None, None,
                                                 activations.SILU, 0.01, 0.03, 16)


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_compile_fullgraph_functional(backend):
    device = triton_device() if backend == "triton" else "cpu"
    x, params = make_inputs((2, 8, 6, 6), dtype=torch.float32, device=device)
    torch._dynamo.reset()

    def fn(x, weight, bias, proxy_bias, proxy_weight):
        return fusednorm.group_norm_proxy_act(x, 4, weight, bias, proxy_bias, proxy_weight,
                                              activation="silu", backend=backend) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, **params)
    expected = reference.group_norm_proxy_act(x, 4, **params, activation="silu") * 2
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), [x, *params.values()])
    expected_grads = torch.autograd.grad(expected.sum(), [x, *params.values()])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_model_with_inductor():
    """A small conv net with the fused modules, compiled whole by inductor (no graph breaks)."""
    device = triton_device()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        fusednorm.GroupNormProxyAct(4, 8, activation="relu", backend="triton"),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        fusednorm.GroupNormAct(2, 8, activation="silu", backend="triton"),
    ).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, p in zip(eager_grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-4)
