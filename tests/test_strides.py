"""Any strides in, the reference's answer out: x, parameters and grad_output as views that are
neither contiguous nor channels-last, for every fused backend."""
import pytest
import torch

import fusednorm
from conftest import fp64_copy, run_forward_backward


def _strided_params(channels, device, proxy_params, seed=0):
    """Parameters that are every other element of a longer tensor: stride 2, not contiguous."""
    gen = torch.Generator().manual_seed(seed)

    def strided(loc):
        full = loc + 0.3 * torch.randn(2 * channels, generator=gen, dtype=torch.float64)
        view = full.to(device)[::2]
        assert not view.is_contiguous()
        return view.detach().requires_grad_()

    params = dict(weight=strided(1.0), bias=strided(0.0))
    if proxy_params:
        params.update(proxy_bias=strided(0.0), proxy_weight=strided(0.0))
    return params


def _check(backend, x, params, groups, grad_out, proxy=True):
    fused = fusednorm.group_norm_proxy_act if proxy else fusednorm.group_norm_act
    eager = fusednorm.reference.group_norm_proxy_act if proxy else fusednorm.reference.group_norm_act
    out, grads = run_forward_backward(
        lambda x, **p: fused(x, groups, **p, activation="silu", backend=backend),
        x, params, grad_out)
    x64, params64 = fp64_copy(x, params)
    ref_out, ref_grads = run_forward_backward(
        lambda x, **p: eager(x, groups, **p, activation="silu"), x64, params64, grad_out.double())
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-9,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("proxy,proxy_params", [(True, True), (True, False), (False, False)],
                         ids=["pn+proxy_params", "pn", "no_pn"])
def test_strided_parameters(fused_backend, proxy, proxy_params):
    backend, device = fused_backend
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64, device=device, requires_grad=True)
    params = _strided_params(12, device, proxy_params)
    _check(backend, x, params, 3, torch.randn_like(x), proxy=proxy)


def test_channel_sliced_input(fused_backend):
    """Every other channel of a larger tensor: a view that is neither contiguous nor
    channels-last."""
    backend, device = fused_backend
    base = torch.randn(2, 16, 6, 5, dtype=torch.float64, device=device)
    x = base[:, ::2].detach().requires_grad_()
    params = _strided_params(8, device, proxy_params=True)
    _check(backend, x, params, 4, torch.randn(x.shape, dtype=torch.float64, device=device))


@pytest.mark.parametrize("perm", [(0, 1, 3, 2), (0, 3, 1, 2), (2, 3, 0, 1)], ids=str)
def test_permuted_input_and_grad(fused_backend, perm):
    """x and grad_output as permuted views of contiguous tensors (each its own permutation)."""
    backend, device = fused_backend
    shape = (3, 8, 4, 5)
    storage_shape = [shape[perm.index(i)] for i in range(4)]
    x = torch.randn(storage_shape, dtype=torch.float64, device=device).permute(*perm)
    assert x.shape == shape
    x = x.detach().requires_grad_()
    grad_out = torch.randn(shape[::-1], dtype=torch.float64, device=device).permute(3, 2, 1, 0)
    _check(backend, x, _strided_params(8, device, proxy_params=True), 2, grad_out)


def test_expanded_grad_output(fused_backend):
    """The gradient of y.sum() reaches the backward as a stride-0 expanded tensor."""
    backend, device = fused_backend
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    grad_out = torch.ones((), dtype=torch.float64, device=device).expand(x.shape)
    assert grad_out.stride() == (0, 0, 0, 0)
    _check(backend, x, _strided_params(8, device, proxy_params=True), 4, grad_out)
