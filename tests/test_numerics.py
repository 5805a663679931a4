"""Numerical robustness of every fused backend: offset data, constant groups, NaN, large values,
determinism, empty inputs."""
import pytest
import torch

import fusednorm
from fusednorm import reference
from conftest import assert_within_reference_error, make_inputs, to_layout


def _params(channels, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    return dict(weight=(1 + 0.3 * torch.randn(channels, generator=gen)).to(device, dtype),
                bias=(0.3 * torch.randn(channels, generator=gen)).to(device, dtype))


def _assert_silu_fp32_matches_fp64(x, groups, backend, atol):
    """GN+PN with SiLU of fp32 x (a leaf on the backend's device) against the fp64 reference:
    the output and dx, each within atol."""
    x.requires_grad_()
    params = _params(x.shape[1], x.device)
    out = fusednorm.group_norm_proxy_act(x, groups, **params, activation="silu", backend=backend)
    x64 = x.detach().double().requires_grad_()
    exact = reference.group_norm_proxy_act(x64, groups, activation="silu",
                                           **{k: v.double() for k, v in params.items()})
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=atol)
    grad = torch.randn_like(exact)
    (dx,) = torch.autograd.grad(out, x, grad.float())
    (dx_exact,) = torch.autograd.grad(exact, x64, grad)
    torch.testing.assert_close(dx.double(), dx_exact, rtol=0, atol=atol)


@pytest.mark.parametrize("shape,groups", [((2, 16, 24, 24), 4), ((1, 8, 70, 70), 1),
                                          ((2, 12, 5, 6, 7), 3)], ids=["4d", "one_group", "3d"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_offset_data_fp32_matches_fp64(fused_backend, shape, groups, channels_last):
    """1e4 + randn in fp32: the statistics must not cancel catastrophically. The only error left
    is the input's own fp32 rounding around 1e4 (half an ulp, 5e-4) passing through the
    normalisation, amplified by gamma * s * act' (up to ~3 here): 4e-3 in the output and in dx."""
    backend, device = fused_backend
    gen = torch.Generator().manual_seed(0)
    x = to_layout(1e4 + torch.randn(shape, generator=gen), channels_last).to(device)
    _assert_silu_fp32_matches_fp64(x, groups, backend, atol=4e-3)
    # The naive one-pass variance E[x^2] - E[x]^2 in fp32 is far off here: the check has teeth.
    grouped = x.detach().reshape(shape[0], groups, -1)
    naive_var = (grouped * grouped).mean(-1) - grouped.mean(-1) ** 2
    assert (naive_var - grouped.double().var(-1, unbiased=False)).abs().max() > 0.1


@pytest.mark.parametrize("pattern", ["band", "stripe"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_steps_in_the_data_match_fp64(fused_backend, pattern, channels_last):
    """randn plus a step of 100 on a band of image rows (h < 4) or a stripe of columns (w < 4),
    1/16 of each channel: the first values of a CPU statistics chunk (NCHW: its first vector, 16
    or 8 values, of a 4096-element channel) or block (channels-last: 4 rows of 64 or 256)
    are in the step, ~15/16 of the step away from its mean, where the one-pass sums about them
    would lose digits ((sum d)^2 / n is 15/16 of sum d^2, over the 0.9 of kOnePassLimit in
    csrc/cpu/forward.cpp) and the kernel sums again about the chunk's mean. fp32 against fp64."""
    backend, device = fused_backend
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 64, 64, generator=gen)
    if pattern == "band":
        x[:, :, :4] += 100
    else:
        x[..., :4] += 100
    _assert_silu_fp32_matches_fp64(to_layout(x, channels_last).to(device), 2, backend, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_constant_group_gives_finite_output(fused_backend, channels_last):
    backend, device = fused_backend
    x = torch.randn(2, 8, 5, 5)
    x[0, :4] = 3.0  # group (n=0, g=0) is constant: variance 0, xhat = 0
    x = to_layout(x, channels_last).to(device)
    params = _params(8, device)
    x.requires_grad_()
    out = fusednorm.group_norm_proxy_act(x, 2, **params, backend=backend)
    assert torch.isfinite(out).all()
    expected = reference.group_norm_proxy_act(x.detach(), 2, **params)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("activation", ["relu", "silu", ("leaky_relu", 0.1)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_nan_in_gives_nan_out(fused_backend, channels_last, activation):
    backend, device = fused_backend
    x = torch.randn(2, 8, 5, 5)
    x[1, 5, 2, 2] = float("nan")  # group (n=1, g=1)
    x = to_layout(x, channels_last).to(device)
    for proxy in (True, False):
        fn = fusednorm.group_norm_proxy_act if proxy else fusednorm.group_norm_act
        out = fn(x, 2, **_params(8, device), activation=activation, backend=backend)
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


@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (2, 8, 0)], ids=["N=0", "S=0"])
@pytest.mark.parametrize("proxy", [True, False], ids=["pn", "no_pn"])
def test_empty_input(fused_backend, shape, proxy):
    """The backend's own op runs (no detour through the reference): statistics of groups without
    elements (mean 0, rstd 1/sqrt(eps)), an empty output, and zero parameter gradients."""
    from fusednorm import ops

    backend, device = fused_backend
    x = torch.randn(shape, device=device)
    w, b = torch.ones(8, device=device), torch.zeros(8, device=device)
    pb = torch.zeros(8, device=device) if proxy else None
    y, mean, rstd = ops.forward_op(backend)(x, w, b, pb, pb, 2, 1, 0.0, 1e-5, 0.03, 16, proxy)
    assert y.shape == x.shape and mean.shape == rstd.shape == (shape[0], 2)
    assert torch.equal(mean, torch.zeros_like(mean))
    torch.testing.assert_close(rstd, torch.full_like(rstd, 1e-5 ** -0.5))

    x.requires_grad_()
    params = {name: p.clone().requires_grad_() for name, p in
              dict(weight=w, bias=b, **(dict(proxy_bias=pb, proxy_weight=pb) if proxy else {})).items()}
    fn = fusednorm.group_norm_proxy_act if proxy else fusednorm.group_norm_act
    out = fn(x, 2, **params, backend=backend)
    grads = torch.autograd.grad(out.sum(), [x, *params.values()], allow_unused=True)
    assert out.shape == x.shape and grads[0].shape == x.shape
    for name, grad in zip(params, grads[1:]):
        assert grad is not None and torch.count_nonzero(grad) == 0, f"grad of {name}"


def _long_group_data(kind, shape, gen):
    if kind == "uniform":
        return torch.rand(shape, generator=gen, dtype=torch.float64)
    if kind == "offset":
        return 1e4 + torch.randn(shape, generator=gen, dtype=torch.float64)
    # heavy-tailed: Student's t with 2 degrees of freedom (infinite variance), z / sqrt(chi2 / 2)
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    chi2 = torch.randn((2, *shape), generator=gen, dtype=torch.float64).square().sum(0)
    return z / (chi2 / 2).sqrt()


@pytest.mark.parametrize("kind", ["uniform", "offset", "heavy_tailed"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_long_groups_as_accurate_as_torch(fused_backend, kind, channels_last, monkeypatch):
    """Groups of 131072 elements, fp32, every path that takes them (Triton: looped and split):
    output, dx, dweight and dbias err against fp64 at most 2x what F.group_norm and its
    autograd err on the contiguous input (PyTorch's most accurate kernel), plus conftest's floor.
    Statistics merged tile after tile from raw x lost digits to the tile count and to the mean
    (Triton looped, offset data, groups of 524288: output 3.5e-3 off against F.group_norm's
    1.2e-3); the kernels shift x near the group's mean and compensate the running sums."""
    backend, device = fused_backend
    shape, groups = (1, 4, 256, 256), 2
    gen = torch.Generator().manual_seed(7)
    x64 = _long_group_data(kind, shape, gen)
    params64 = dict(weight=1 + 0.3 * torch.randn(4, generator=gen, dtype=torch.float64),
                    bias=0.3 * torch.randn(4, generator=gen, dtype=torch.float64))
    grad64 = torch.randn(shape, generator=gen, dtype=torch.float64)

    def run(fn, x, grad):
        x = x.detach().requires_grad_()
        weight, bias = (p.to(x.device, x.dtype).requires_grad_() for p in params64.values())
        out = fn(x, weight, bias)
        return [out, *torch.autograd.grad(out, (x, weight, bias), grad)]

    def native(x, weight, bias):
        return torch.nn.functional.group_norm(x, groups, weight, bias)

    exact = run(native, x64, grad64)
    torch_fp32 = run(native, x64.float(), grad64.float())
    x = to_layout(x64.float(), channels_last).to(device)
    grad = to_layout(grad64.float(), channels_last).to(device)
    paths = ["looped", "split"] if backend == "triton" else [None]
    for path in paths:
        if path:
            monkeypatch.setenv("FUSEDNORM_TRITON_PATH", path)
        fused = run(lambda x, weight, bias: fusednorm.group_norm_act(
            x, groups, weight, bias, activation="identity", backend=backend), x, grad)
        for name, actual, lowp, expected in zip(["output", "dx", "dweight", "dbias"], fused,
                                                torch_fp32, exact):
            assert_within_reference_error(actual.cpu(), lowp, expected, f"{path or backend}: {name}")


def check_long_group_statistics(backend, device, kind, channels_last):
    """The (N, G) mean and rstd the forward saves, groups of 131072 fp32 elements, against fp64:
    the mean within 4 roundings of (|mean| + std), rstd within 4 relative roundings."""
    from fusednorm import ops
    from fusednorm.activations import parse_activation

    shape, groups = (1, 4, 256, 256), 2
    x64 = _long_group_data(kind, shape, torch.Generator().manual_seed(11))
    x = to_layout(x64.float(), channels_last).to(device)
    grouped = x.detach().double().cpu().reshape(1, groups, -1)  # what the kernel sees, exactly
    exact_mean = grouped.mean(-1)
    std = grouped.std(-1, unbiased=False)
    exact_rstd = (std.square() + 1e-5).rsqrt()
    ones, zeros = torch.ones(4, device=device), torch.zeros(4, device=device)
    identity = parse_activation("identity")[0].id
    _, mean, rstd = ops.forward_op(backend)(x, ones, zeros, None, None, groups, identity, 0.0,
                                            1e-5, 0.0, 2, False)
    eps32 = torch.finfo(torch.float32).eps
    mean_error = ((mean.double().cpu() - exact_mean).abs() / (exact_mean.abs() + std)).max()
    rstd_error = (rstd.double().cpu() / exact_rstd - 1).abs().max()
    assert mean_error <= 4 * eps32, f"{kind}: mean {mean_error / eps32:.1f} roundings off"
    assert rstd_error <= 4 * eps32, f"{kind}: rstd {rstd_error / eps32:.1f} roundings off"


@pytest.mark.parametrize("kind", ["uniform", "offset", "heavy_tailed"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_long_group_statistics_to_a_few_roundings(fused_backend, kind, channels_last,
                                                  monkeypatch):
    """check_long_group_statistics on every path that takes such groups (Triton: looped and
    split; every other instruction-set copy of the CPU kernels: test_cpu_backend.py). Merged tile
    after tile from raw x (Triton before the shift and the compensated sums), offset data gave
    rstd 1.9e-6 off (16 roundings) here, and 8e-6 on a 75M-element group; the CPU kernel's
    channels-last blocks merged one after the other, 5e-7."""
    backend, device = fused_backend
    for path in ["looped", "split"] if backend == "triton" else [None]:
        if path:
            monkeypatch.setenv("FUSEDNORM_TRITON_PATH", path)
        check_long_group_statistics(backend, device, kind, channels_last)
