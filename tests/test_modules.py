"""nn.Module wrappers: parameters, defaults, train/eval equality, the backend switch."""
import pytest
import torch
import torch.nn.functional as F

import fusednorm
from fusednorm import reference
from conftest import triton_device


def test_group_norm_proxy_act_parameters_and_init():
    module = fusednorm.GroupNormProxyAct(4, 12, activation="silu")
    names = dict(module.named_parameters())
    assert set(names) == {"weight", "bias", "proxy_bias", "proxy_weight"}
    torch.testing.assert_close(module.weight.detach(), torch.ones(12))
    for name in ("bias", "proxy_bias", "proxy_weight"):
        torch.testing.assert_close(names[name].detach(), torch.zeros(12))
    assert "proxy_affine=True" in repr(module)


def test_group_norm_proxy_act_without_proxy_affine():
    module = fusednorm.GroupNormProxyAct(1, 6, proxy_affine=False)
    assert module.proxy_bias is None and module.proxy_weight is None
    assert set(dict(module.named_parameters())) == {"weight", "bias"}


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_module_matches_functional_reference_and_train_equals_eval(backend):
    device = triton_device() if backend == "triton" else "cpu"
    module = fusednorm.GroupNormProxyAct(2, 8, activation="relu", backend=backend).to(device)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 8, 5, 5, device=device)
    out_train = module(x)
    module.eval()
    out_eval = module(x)
    torch.testing.assert_close(out_train, out_eval, rtol=0, atol=0)
    expected = reference.group_norm_proxy_act(x, 2, module.weight, module.bias, module.proxy_bias,
                                              module.proxy_weight, activation="relu")
    torch.testing.assert_close(out_train, expected, rtol=1e-5, atol=1e-5)
    out_train.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_act_equals_native_group_norm_silu(affine):
    device = triton_device()
    module = fusednorm.GroupNormAct(4, 16, activation="silu", affine=affine, backend="triton").to(device)
    native = torch.nn.GroupNorm(4, 16, affine=affine).to(device)
    if affine:
        with torch.no_grad():
            module.weight.normal_(1, 0.2)
            module.bias.normal_(0, 0.2)
            native.weight.copy_(module.weight)
            native.bias.copy_(module.bias)
    x = torch.randn(2, 16, 7, 7, device=device)
    torch.testing.assert_close(module(x), F.silu(native(x)), rtol=1e-5, atol=1e-5)


def test_module_state_dict_round_trip():
    source = fusednorm.GroupNormProxyAct(2, 4)
    with torch.no_grad():
        source.proxy_bias.fill_(0.3)
    target = fusednorm.GroupNormProxyAct(2, 4)
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target.proxy_bias.detach(), torch.full((4,), 0.3))


def test_module_dtype_and_device_arguments():
    module = fusednorm.GroupNormAct(2, 4, dtype=torch.float64)
    assert module.weight.dtype == torch.float64
    out = module(torch.randn(2, 4, 3, dtype=torch.float64))
    assert out.dtype == torch.float64
