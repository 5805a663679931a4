"""fusednorm.convert: BatchNorm (+ activation) -> GroupNormProxyAct / GroupNormAct / GroupNorm."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.testing import assert_close

import fusednorm
from fusednorm import GroupNormAct, GroupNormProxyAct, convert


def randomize_bn(model, seed=0):
    """Non-trivial BN affine parameters, so that carrying them over is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
    return model


def sequential():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.MaxPool2d(2),
        nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24, affine=False), nn.GELU(approximate="tanh"),
        nn.Flatten(), nn.Linear(24 * 16, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.2)))


class AttributeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.SiLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))))


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(6))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(6))

    def forward(self, x):
        x = F.relu(self.bns[0](self.convs[0](x)))
        x = torch.relu(self.bns[1](self.convs[1](x)))
        x = F.silu(self.bns[2](self.convs[2](x)))
        x = F.gelu(self.bns[3](self.convs[3](x)), approximate="tanh")
        x = F.leaky_relu(self.bns[4](self.convs[4](x)), 0.2)
        y = self.bns[5](self.convs[5](x))
        return y + x  # BN followed by an add: not fused


class SharedReLUBlock(nn.Module):
    """torchvision's BasicBlock pattern: one ReLU module called after bn1 and after the add."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, the module walk takes over."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.features(x)
        return self.bn(x) if x.sum() > 0 else x


def test_sequential_keeps_its_class_and_absorbs_activations():
    model = sequential()
    converted, report = convert(model, num_groups=8)
    assert type(converted) is nn.Sequential
    assert [type(m) for m in converted] == [
        nn.Conv2d, GroupNormProxyAct, nn.Identity, nn.Conv2d, nn.GroupNorm, nn.MaxPool2d,
        nn.Conv2d, GroupNormProxyAct, nn.Identity, nn.Flatten, nn.Linear, GroupNormProxyAct,
        nn.Identity]
    assert converted[1].activation == "relu"
    assert converted[7].activation == "gelu_tanh"
    assert converted[11].activation == ("leaky_relu", 0.2)
    assert [(r.name, r.groups, r.absorbed) for r in report.replaced] == [
        ("1", 8, "2"), ("4", 8, None), ("7", 8, "8"), ("11", 8, "12")]
    assert [(e.name, e.reason) for e in report.left] == [("4", "BN followed by MaxPool2d")]
    assert type(model[1]) is nn.BatchNorm2d and type(model[2]) is nn.ReLU  # input untouched


def test_attribute_module_keeps_its_class():
    converted, report = convert(randomize_bn(AttributeNet()))
    assert type(converted) is AttributeNet
    assert isinstance(converted.bn, GroupNormProxyAct) and converted.bn.activation == "silu"
    assert isinstance(converted.act, nn.Identity)
    assert [(r.name, r.absorbed) for r in report.replaced] == [("bn", "act")]
    assert report.left == []


def test_fx_path_absorbs_functional_activations():
    model = randomize_bn(FunctionalNet())
    converted, report = convert(model, num_groups=4)
    assert isinstance(converted, fx.GraphModule)
    acts = {r.name: converted.get_submodule(r.name).activation for r in report.replaced[:5]}
    assert acts == {"bns.0": "relu", "bns.1": "relu", "bns.2": "silu", "bns.3": "gelu_tanh",
                    "bns.4": ("leaky_relu", 0.2)}
    assert isinstance(converted.get_submodule("bns.5"), nn.GroupNorm)
    assert [(e.name, e.reason) for e in report.left] == [("bns.5", "BN followed by add")]
    called = {n.target for n in converted.graph.nodes if n.op == "call_function"}
    assert not called & {F.relu, torch.relu, F.silu, F.gelu, F.leaky_relu}

    x = torch.randn(2, 3, 6, 6)
    expected = x
    for i, act in enumerate(["relu", "relu", "silu", "gelu_tanh", ("leaky_relu", 0.2)]):
        bn = model.bns[i]
        expected = fusednorm.group_norm_proxy_act(model.convs[i](expected), 4, bn.weight, bn.bias,
                                                  activation=act)
    y = model.convs[5](expected)
    expected = F.group_norm(y, 4, model.bns[5].weight, model.bns[5].bias) + expected
    assert_close(converted(x), expected)


def test_shared_activation_module_is_removed_from_the_graph_only_where_absorbed():
    model = randomize_bn(SharedReLUBlock())
    converted, report = convert(model)
    assert isinstance(converted, fx.GraphModule)
    assert [(r.name, r.absorbed) for r in report.replaced] == [("bn1", "relu"), ("bn2", None)]
    x = torch.randn(2, 8, 5, 5)
    bn1, bn2 = model.bn1, model.bn2
    out = fusednorm.group_norm_proxy_act(model.conv1(x), 8, bn1.weight, bn1.bias)
    expected = torch.relu(F.group_norm(model.conv2(out), 8, bn2.weight, bn2.bias) + x)
    assert_close(converted(x), expected)


def test_untraceable_model_uses_module_walk():
    converted, report = convert(Untraceable())
    assert type(converted) is Untraceable
    assert isinstance(converted.features[1], GroupNormProxyAct)
    assert isinstance(converted.features[2], nn.Identity)
    assert isinstance(converted.bn, nn.GroupNorm)
    [left] = report.left
    assert left.name == "bn" and "not fx-traceable" in left.reason and "module walk" in left.reason


def test_group_count_fallback():
    model = nn.Sequential(nn.Conv2d(3, 24, 1), nn.BatchNorm2d(24), nn.ReLU(),
                          nn.Conv2d(24, 7, 1), nn.BatchNorm2d(7), nn.ReLU())
    converted, report = convert(model, num_groups=16)
    assert [r.groups for r in report.replaced] == [12, 7]
    assert converted[1].num_groups == 12 and converted[4].num_groups == 7


def test_parameters_carried_over_with_dtype_and_device():
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(8, eps=1e-3), nn.ReLU(),
                                       nn.BatchNorm2d(8, affine=False), nn.SiLU())).double()
    model[0].weight.requires_grad_(False)
    converted, _ = convert(model, proxy=True)
    fused, plain_affine = converted[0], converted[2]
    assert_close(fused.weight, model[0].weight)
    assert_close(fused.bias, model[0].bias)
    assert fused.eps == 1e-3 and fused.weight.dtype == torch.float64
    assert not fused.weight.requires_grad and fused.bias.requires_grad
    assert_close(plain_affine.weight, torch.ones(8, dtype=torch.float64))
    assert_close(plain_affine.bias, torch.zeros(8, dtype=torch.float64))
    assert_close(fused.proxy_bias, torch.zeros(8, dtype=torch.float64))


def test_proxy_false_gives_group_norm_act():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.GELU()))
    converted, _ = convert(model, num_groups=2, proxy=False)
    assert isinstance(converted[1], GroupNormAct) and converted[1].activation == "gelu"
    x = torch.randn(2, 3, 4, 4)
    bn = model[1]
    expected = F.gelu(F.group_norm(model[0](x), 2, bn.weight, bn.bias))
    assert_close(converted(x), expected)


def test_activation_override():
    converted, report = convert(AttributeNet(), activation=("leaky_relu", 0.1))
    assert converted.bn.activation == ("leaky_relu", 0.1)
    with pytest.raises(ValueError, match="unknown activation"):
        convert(AttributeNet(), activation="tanh")


def test_converted_equals_hand_built_and_eval_equals_train():
    model = sequential()
    converted, _ = convert(model, num_groups=4)
    hand = copy.deepcopy(model)
    for index, act in [(1, "relu"), (7, "gelu_tanh"), (11, ("leaky_relu", 0.2))]:
        bn = model[index]
        module = GroupNormProxyAct(4, bn.num_features, act)
        if bn.affine:
            module.load_state_dict({"weight": bn.weight, "bias": bn.bias,
                                    "proxy_bias": module.proxy_bias,
                                    "proxy_weight": module.proxy_weight})
        hand[index], hand[index + 1] = module, nn.Identity()
    hand[4] = nn.GroupNorm(4, 16)
    hand[4].load_state_dict({"weight": model[4].weight, "bias": model[4].bias})
    x = torch.randn(4, 3, 8, 8)
    out = converted.train()(x)
    assert_close(out, hand(x))
    assert_close(converted.eval()(x), out)
    assert_close(converted.eval()(x[:1]), out[:1])  # batch independent


def test_report_str_and_single_bn():
    converted, report = convert(nn.BatchNorm1d(6), num_groups=4)
    assert isinstance(converted, nn.GroupNorm) and converted.num_groups == 3
    assert "replaced 1 BatchNorm" in str(report)


def test_nothing_to_convert():
    with pytest.raises(ValueError, match="nothing to convert"):
        convert(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    with pytest.raises(ValueError, match="num_groups"):
        convert(sequential(), num_groups=0)


def test_fusednorm_modules_are_fx_leaves_and_shared_bn_is_not_fused():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.pn = GroupNormProxyAct(2, 8)
            self.bn = nn.BatchNorm2d(8)
            self.shared = nn.BatchNorm2d(8)

        def forward(self, x):
            x = torch.relu(self.bn(self.pn(x)))
            return F.relu(self.shared(x)) + self.shared(x)

    converted, report = convert(Mixed())
    assert isinstance(converted, fx.GraphModule)  # traced, not walked
    assert [(r.name, r.absorbed) for r in report.replaced] == [("bn", "relu"), ("shared", None)]
    assert [(e.name, e.reason) for e in report.left] == [("shared", "BN module called 2 times")]
