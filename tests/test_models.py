"""fusednorm.models.resnet_v2 and the norm blocks it is built from."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from fusednorm import GroupNormProxyAct
from fusednorm.activations import parse_activation
from fusednorm.models import NORMS, BatchNormProxyAct, norm_act, resnet_v2
from fusednorm.proxy import proxy_stats


@pytest.mark.parametrize("norm", NORMS)
def test_depth20_forward_backward(norm):
    torch.manual_seed(0)
    model = resnet_v2(20, num_classes=5, norm=norm, width=8, in_channels=1)
    x = torch.randn(3, 1, 8, 8)
    out = model(x)
    assert out.shape == (3, 5)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_depth50_bottleneck_tiny():
    model = resnet_v2(50, num_classes=7, norm="gn+pn", width=4, num_groups=4)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert model.stages[3][2].conv3.out_channels == 4 * 8 * 4  # width * 8 * expansion
    assert sum(isinstance(m, GroupNormProxyAct) for m in model.modules()) == 3 * 16 + 1


@pytest.mark.parametrize("depth, blocks", [(20, 3), (32, 5), (56, 9)])
def test_cifar_depths(depth, blocks):
    model = resnet_v2(depth, norm="bn")
    assert [len(stage) for stage in model.stages] == [blocks] * 3
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == depth  # 3x3 convs + the classifier


def test_norm_kinds():
    assert norm_act("ln", 16)[0].num_groups == 1
    assert norm_act("in", 16)[0].num_groups == 16
    assert norm_act("gn", 24, num_groups=16)[0].num_groups == 12
    assert norm_act("ln+pn", 16).num_groups == 1
    assert isinstance(norm_act("bn", 16)[0], nn.BatchNorm2d)


def test_unknown_norm_and_depth():
    with pytest.raises(ValueError, match="unknown norm"):
        resnet_v2(20, norm="batchnorm")
    with pytest.raises(ValueError, match="unsupported depth"):
        resnet_v2(18)


def test_batch_norm_proxy_act_matches_the_formula():
    torch.manual_seed(0)
    module = BatchNormProxyAct(6, activation="silu").double()
    with torch.no_grad():
        for p in (module.weight, module.bias, module.proxy_bias, module.proxy_weight):
            p.add_(0.2 * torch.randn(6, dtype=torch.float64))
    x = torch.randn(4, 6, 3, 5, dtype=torch.float64)
    xhat = F.batch_norm(x, None, None, training=True)
    act, slope = parse_activation("silu")
    m, _, s = proxy_stats(module.weight, module.bias, module.proxy_bias, module.proxy_weight,
                          act, slope, 200, 0.03)
    view = (1, -1, 1, 1)
    expected = s.view(view) * (F.silu(module.weight.view(view) * xhat + module.bias.view(view))
                               - m.view(view))
    assert_close(module(x), expected)
    assert module(torch.randn(4, 6, dtype=torch.float64)).shape == (4, 6)
