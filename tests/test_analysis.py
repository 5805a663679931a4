"""The power decomposition, the hooks that collect it, and the paper's random-net findings."""
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from fusednorm import GroupNormProxyAct
from fusednorm.analysis import (PAPER_NORMS, power_decomposition, power_profile, random_inputs,
                                record_power)
from fusednorm.models import BatchNormProxyAct


@pytest.mark.parametrize("shape", [(8, 5), (8, 5, 7), (6, 4, 5, 3), (4, 3, 2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decomposition_sums_to_power(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    y = (torch.randn(shape, generator=gen) * torch.rand(shape[:2] + (1,) * (len(shape) - 2),
                                                        generator=gen) + 0.7).to(dtype)
    result = power_decomposition(y)
    flat = y.double().reshape(shape[0], shape[1], -1)
    power_per_channel = flat.square().mean(dim=(0, 2))
    assert result.per_channel.shape == (shape[1], 4)
    assert_close(result.per_channel.sum(1), power_per_channel)
    assert_close(result.terms.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert result.power == pytest.approx(power_per_channel.mean().item(), rel=1e-12)
    mu = flat.mean(2)
    assert_close(result.per_channel[:, 0], mu.mean(0).square())
    assert (result.per_channel >= 0).all()


def test_decomposition_of_known_cases():
    constant_per_channel = torch.arange(1.0, 4.0).view(1, 3, 1, 1).expand(5, 3, 4, 4)
    assert_close(power_decomposition(constant_per_channel).terms,
                 torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    with pytest.raises(ValueError):
        power_decomposition(torch.randn(5))


def test_record_power_hooks_outermost_norm_layers_in_call_order():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          GroupNormProxyAct(2, 8), BatchNormProxyAct(8), nn.GroupNorm(4, 8),
                          nn.InstanceNorm2d(8))
    x = torch.randn(4, 3, 6, 6)
    with record_power(model) as records:
        out = model(x)
    assert [name for name, _ in records] == ["1", "3", "4", "5", "6"]  # not "4.norm"
    assert_close(records[-1][1].per_channel, power_decomposition(out).per_channel)
    model(x)
    assert len(records) == 5  # hooks removed on exit


def test_random_net_findings():
    x = random_inputs(16, 3, 8, seed=0)
    profiles = {norm: power_profile(norm, x, depth=24, width=32) for norm in PAPER_NORMS}
    for terms in profiles.values():
        assert_close(terms.sum(1), torch.ones(24, dtype=torch.float64))
    # LN: channel-wise collapse, the first term grows with depth and dominates.
    ln = profiles["ln"][:, 0]
    assert ln[-1] > 0.75 and ln[-1] > ln[0] + 0.5 and ln[12:].mean() > ln[:4].mean()
    # LN+PN and GN+PN: no collapse, the first term stays small and, deep in the net, near BN's.
    for norm in ("ln+pn", "gn+pn"):
        first = profiles[norm][:, 0]
        assert first.max() < 0.25
        assert (first[12:] - profiles["bn"][12:, 0]).abs().max() < 0.1
    # IN: no variability of the instance statistics, the second and fourth terms vanish.
    assert profiles["in"][:, [1, 3]].max() < 1e-3
