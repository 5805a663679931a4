"""fusednorm.models.resnet_v2 and the norm blocks it is built from."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from fusednorm import GroupNormProxyAct, reference
from fusednorm.models import NORMS, BatchNormProxyAct, norm_act, resnet_v2


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


def test_batch_norm_proxy_act_at_init_is_the_table():
    """gamma = 1, beta = 0: y = s (relu(xhat) - m) with docs/pn-math.md's m and s for ReLU."""
    x = torch.randn(4, 6, 3, 5, dtype=torch.float64)
    xhat = F.batch_norm(x, None, None, training=True)
    assert_close(BatchNormProxyAct(6).double()(x), 1.648373 * (F.relu(xhat) - 0.398451),
                 rtol=0, atol=5e-6)


def test_batch_norm_proxy_act_is_instance_norm_over_the_batch():
    """With batch statistics, BN of (N, C, S) is the GroupNorm with G = C of the batch seen as one
    instance (1, C, N*S): the eager GN+PN reference on that view is an independent oracle for
    the module's output and every gradient."""
    torch.manual_seed(0)
    module = BatchNormProxyAct(6, activation="silu").double()
    with torch.no_grad():
        for p in (module.weight, module.bias, module.proxy_bias, module.proxy_weight):
            p.add_(0.2 * torch.randn(6, dtype=torch.float64))
    x = torch.randn(4, 6, 3, 5, dtype=torch.float64, requires_grad=True)
    params = [module.weight, module.bias, module.proxy_bias, module.proxy_weight]

    def oracle(x):
        one_instance = x.transpose(0, 1).reshape(1, 6, -1)
        y = reference.group_norm_proxy_act(one_instance, 6, *params, activation="silu")
        return y.reshape(6, 4, 3, 5).transpose(0, 1)

    y, expected = module(x), oracle(x)
    assert_close(y, expected)
    grad_y = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, [x, *params], grad_y),
                         torch.autograd.grad(expected, [x, *params], grad_y)):
        assert_close(got, want)
    assert module(torch.randn(4, 6, dtype=torch.float64)).shape == (4, 6)
