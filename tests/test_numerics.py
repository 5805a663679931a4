"""Numerical robustness of every fused backend: offset data, constant groups, NaN, determinism."""
import pytest
import torch

import fusednorm
from fusednorm import reference
from conftest import make_inputs


def _params(channels, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    return dict(weight=(1 + 0.3 * torch.randn(channels, generator=gen)).to(device, dtype),
                bias=(0.3 * torch.randn(channels, generator=gen)).to(device, dtype))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_offset_data_fp32_matches_fp64(fused_backend, channels_last):
    """1e4 + randn in fp32: the statistics must not cancel catastrophically. The only error left
    is the input's own fp32 rounding around 1e4 (ulp ~1e-3) passing through the normalisation."""
    backend, device = fused_backend
    gen = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(2, 16, 24, 24, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x = x.to(device)
    params = _params(16, device)
    out = fusednorm.group_norm_proxy_act(x, 4, **params, backend=backend)
    exact = reference.group_norm_proxy_act(x.double(), 4, **{k: v.double() for k, v in params.items()})
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-3)
    # The naive one-pass variance E[x^2] - E[x]^2 in fp32 is far off here: the check has teeth.
    grouped = x.reshape(2, 4, -1)
    naive_var = (grouped * grouped).mean(-1) - grouped.mean(-1) ** 2
    assert (naive_var - grouped.double().var(-1, unbiased=False)).abs().max() > 0.1


def test_constant_group_gives_finite_output(fused_backend):
    backend, device = fused_backend
    x = torch.randn(2, 8, 5, 5, device=device)
    x[0, :4] = 3.0  # group (n=0, g=0) is constant: variance 0, xhat = 0
    params = _params(8, device)
    x.requires_grad_()
    out = fusednorm.group_norm_proxy_act(x, 2, **params, backend=backend)
    assert torch.isfinite(out).all()
    expected = reference.group_norm_proxy_act(x.detach(), 2, **params)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.isfinite(grad).all()


def test_nan_in_gives_nan_out(fused_backend):
    backend, device = fused_backend
    x = torch.randn(2, 8, 5, 5, device=device)
    x[1, 5, 2, 2] = float("nan")  # group (n=1, g=1)
    for proxy in (True, False):
        fn = fusednorm.group_norm_proxy_act if proxy else fusednorm.group_norm_act
        out = fn(x, 2, **_params(8, device), activation="relu", backend=backend)
        assert torch.isnan(out[1, 4:]).all(), "every element of the NaN's group must be NaN"
        assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, :4]).all()


def test_large_finite_input_gives_finite_output(fused_backend):
    backend, device = fused_backend
    x = 1e15 * torch.randn(2, 8, 6, 6, device=device)
    out = fusednorm.group_norm_proxy_act(x, 2, **_params(8, device), backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference.group_norm_proxy_act(x.double(), 2, **{
        k: v.double() for k, v in _params(8, device).items()}).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_backward_is_bitwise_deterministic(fused_backend, channels_last):
    backend, device = fused_backend
    x, params = make_inputs((4, 16, 20, 20), dtype=torch.float32, device=device,
                            channels_last=channels_last)
    grad_out = torch.randn_like(x)

    def grads():
        out = fusednorm.group_norm_proxy_act(x, 4, **params, backend=backend)
        return torch.autograd.grad(out, [x, *params.values()], grad_out)

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
