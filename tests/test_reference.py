"""The eager reference against docs/pn-math.md written out by hand, and against F.group_norm."""
import pytest
import torch
import torch.nn.functional as F

from fusednorm import reference
from fusednorm.activations import parse_activation
from fusednorm.proxy import proxy_samples, proxy_stats
from conftest import ACTIVATIONS, make_inputs, run_forward_backward


def pn_math_forward_backward(x, groups, weight, bias, proxy_bias, proxy_weight, grad_out,
                             activation, eps=1e-5, proxy_eps=0.03, num_samples=200):
    """docs/pn-math.md's forward and closed-form backward, no autograd."""
    act, slope = parse_activation(activation)
    n, c = x.shape[:2]
    xs = x.reshape(n, c, -1)
    g = grad_out.reshape(n, c, -1)
    grouped = x.reshape(n, groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    rstd = ((grouped - mean).square().mean(-1, keepdim=True) + eps).rsqrt()
    xhat = ((grouped - mean) * rstd).reshape_as(xs)
    rstd_c = rstd.repeat_interleave(c // groups, dim=1)
    z = weight[:, None] * xhat + bias[:, None]
    a = act.value(z, slope)
    u = proxy_samples(num_samples, dtype=x.dtype)
    proxy_x = proxy_bias[:, None] + (1 + proxy_weight[:, None]) * u
    p = weight[:, None] * proxy_x + bias[:, None]
    big_p = act.value(p, slope)
    m = big_p.mean(1)
    v = (big_p - m[:, None]).square().mean(1)
    s = (v + proxy_eps).rsqrt()
    y = s[:, None] * (a - m[:, None])

    g_z = s[:, None] * g * act.derivative(z, slope)
    sum_a, sum_b = g_z.sum(-1), (g_z * xhat).sum(-1)
    sum_d, sum_e = g.sum(-1).sum(0), (g * a).sum(-1).sum(0)
    group_a = (weight * sum_a).reshape(n, groups, -1).sum(-1).repeat_interleave(c // groups, 1)
    group_b = (weight * sum_b).reshape(n, groups, -1).sum(-1).repeat_interleave(c // groups, 1)
    count = xs.shape[-1] * (c // groups)
    dx = rstd_c * (weight[:, None] * g_z - group_a[..., None] / count
                   - xhat * group_b[..., None] / count)
    d_m = -s * sum_d
    d_v = -0.5 * s**3 * (sum_e - m * sum_d)
    h = act.derivative(p, slope) * (d_m[:, None] + 2 * d_v[:, None] * (big_p - m[:, None])) / num_samples
    grads = dict(x=dx.reshape(x.shape), weight=sum_b.sum(0) + (h * proxy_x).sum(1),
                 bias=sum_a.sum(0) + h.sum(1), proxy_bias=weight * h.sum(1),
                 proxy_weight=weight * (h * u).sum(1))
    return y.reshape(x.shape), grads


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("shape,groups", [((3, 12, 5, 4), 3), ((2, 6), 1), ((2, 4, 3, 2, 2), 4)])
def test_reference_matches_pn_math(activation, shape, groups):
    x, params = make_inputs(shape)
    grad_out = torch.randn(shape, dtype=torch.float64)
    out, grads = run_forward_backward(
        lambda x, **p: reference.group_norm_proxy_act(x, groups, **p, activation=activation),
        x, params, grad_out)
    detached = {k: v.detach() for k, v in params.items()}
    expected_out, expected_grads = pn_math_forward_backward(
        x.detach(), groups, **detached, grad_out=grad_out, activation=activation)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-10, atol=1e-12,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("activation,module", [("relu", torch.nn.ReLU()), ("silu", torch.nn.SiLU()),
                                               ("gelu", torch.nn.GELU()),
                                               ("gelu_tanh", torch.nn.GELU(approximate="tanh")),
                                               (("leaky_relu", 0.2), torch.nn.LeakyReLU(0.2)),
                                               ("identity", torch.nn.Identity())], ids=str)
def test_group_norm_act_matches_native(activation, module):
    x, params = make_inputs((3, 12, 5, 4), proxy_params=False)
    grad_out = torch.randn_like(x)
    out, grads = run_forward_backward(
        lambda x, **p: reference.group_norm_act(x, 4, **p, activation=activation), x, params, grad_out)
    native, native_grads = run_forward_backward(
        lambda x, weight, bias: module(F.group_norm(x, 4, weight, bias, 1e-5)), x, params, grad_out)
    torch.testing.assert_close(out, native)
    for name in grads:
        torch.testing.assert_close(grads[name], native_grads[name])


def test_activation_derivatives_match_autograd():
    z = torch.linspace(-6, 6, 1001, dtype=torch.float64, requires_grad=True)
    for name in ACTIVATIONS:
        act, slope = parse_activation(name)
        (grad,) = torch.autograd.grad(act.value(z, slope).sum(), z)
        torch.testing.assert_close(act.derivative(z.detach(), slope), grad, msg=str(name))


@pytest.mark.parametrize("activation,m,v,s", [("relu", 0.398451, 0.338035, 1.648373),
                                              ("silu", 0.206048, 0.310004, 1.714977),
                                              ("swish", 0.206048, 0.310004, 1.714977)])
def test_proxy_stats_at_init_match_pn_math_table(activation, m, v, s):
    act, slope = parse_activation(activation)
    ones, zeros = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    mean, var, scale = proxy_stats(ones, zeros, None, None, act, slope, 200, 0.03)
    for got, want in ((mean, m), (var, v), (scale, s)):
        torch.testing.assert_close(got, torch.full_like(got, want), rtol=0, atol=1e-6)


def test_proxy_samples_are_midpoint_quantiles():
    u = proxy_samples(200, dtype=torch.float64)
    normal = torch.distributions.Normal(0.0, 1.0)
    expected = (torch.arange(200, dtype=torch.float64) + 0.5) / 200
    torch.testing.assert_close(normal.cdf(u), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(u, -u.flip(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("proxy", [True, False])
def test_gradcheck_reference(proxy):
    x, params = make_inputs((2, 6, 3, 2), proxy_params=proxy)
    fn = reference.group_norm_proxy_act if proxy else reference.group_norm_act
    assert torch.autograd.gradcheck(lambda x, *p: fn(x, 3, *p, activation="silu"),
                                    (x, *params.values()))


def test_upcast_computes_in_fp32():
    x, params = make_inputs((2, 8, 16, 16), dtype=torch.float16, proxy_params=False)
    x64 = x.detach().double()
    exact = reference.group_norm_proxy_act(x64, 4, *(p.detach().double() for p in params.values()))
    upcast = reference.group_norm_proxy_act(x, 4, **params, upcast=True)
    plain = reference.group_norm_proxy_act(x, 4, **params)
    assert upcast.dtype == plain.dtype == torch.float16
    assert (upcast.double() - exact).abs().max() <= (plain.double() - exact).abs().max()


@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (2, 6, 3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("proxy", [True, False], ids=["pn", "no_pn"])
def test_channels_last_in_channels_last_out(shape, proxy):
    """The documented contract holds for the reference too (it is what backend "auto" runs
    without the extension): output and dx keep a channels-last input's strides, same values."""
    fn = reference.group_norm_proxy_act if proxy else reference.group_norm_act
    x, params = make_inputs(shape, channels_last=True, proxy_params=proxy)
    assert not x.is_contiguous()
    grad_out = torch.randn(shape, dtype=torch.float64).movedim(1, -1).contiguous().movedim(-1, 1)
    out, grads = run_forward_backward(lambda x, **p: fn(x, 3, **p), x, params, grad_out)
    assert out.stride() == x.stride() and grads["x"].stride() == x.stride()
    x_contiguous = x.detach().contiguous().requires_grad_()
    expected, expected_grads = run_forward_backward(lambda x, **p: fn(x, 3, **p), x_contiguous,
                                                    params, grad_out.contiguous())
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-12, atol=1e-12,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
