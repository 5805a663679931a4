"""fusednorm.convert: BatchNorm (+ activation) -> GroupNormProxyAct / GroupNormAct / GroupNorm,
GroupNorm + activation -> GroupNormAct, module rules (timm-style norm-act modules)."""
import copy
import importlib

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
    assert "replaced 1 norm layer(s)" in str(report)
    same, report = convert(nn.GroupNorm(2, 6))
    assert type(same) is nn.GroupNorm and report.replaced == []
    assert [(e.name, e.reason) for e in report.left] == [("", "the model is a single GroupNorm")]


def test_nothing_to_convert():
    with pytest.raises(ValueError, match="nothing to convert"):
        convert(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    with pytest.raises(ValueError, match="nothing to convert.*BatchNorm1d/2d/3d, SyncBatchNorm$"):
        convert(nn.Sequential(nn.GroupNorm(1, 3), nn.ReLU()), fuse_group_norm=False)
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


# GroupNorm + activation -> GroupNormAct: the same function, fused.

class GroupNormNet(nn.Module):
    """A GN model: GN+SiLU modules, GN (weight, no bias)+F.gelu, a GN followed by a conv, and a GN
    without affine."""

    def __init__(self):
        super().__init__()
        self.conv1, self.norm1, self.act = nn.Conv2d(3, 12, 3, padding=1), nn.GroupNorm(3, 12), nn.SiLU()
        self.conv2, self.norm2 = nn.Conv2d(12, 12, 1), nn.GroupNorm(4, 12, eps=1e-6, bias=False)
        self.norm3 = nn.GroupNorm(2, 12, affine=False)
        self.conv3, self.norm4 = nn.Conv2d(12, 6, 1), nn.GroupNorm(6, 6)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for norm in (self.norm1, self.norm2, self.norm4):
                norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=gen))
                if norm.bias is not None:
                    norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=gen))

    def forward(self, x):
        x = self.act(self.norm1(self.conv1(x)))
        x = F.gelu(self.norm2(self.conv2(x)))
        x = torch.relu(self.norm3(x))
        return self.norm4(self.conv3(x))  # followed by the output: stays a GroupNorm


def test_group_norm_followed_by_activation_becomes_group_norm_act():
    model = GroupNormNet()
    converted, report = convert(model, num_groups=8)
    assert isinstance(converted, fx.GraphModule)  # F.gelu/torch.relu absorbed: graph rewritten
    fused = {r.name: (type(converted.get_submodule(r.name)).__name__, r.groups, r.absorbed)
             for r in report.replaced}
    assert fused == {"norm1": ("GroupNormAct", 3, "act"), "norm2": ("GroupNormAct", 4, "gelu"),
                     "norm3": ("GroupNormAct", 2, "relu")}
    assert converted.norm2.eps == 1e-6 and converted.norm3.weight is None
    assert converted.norm2.weight is not None and converted.norm2.bias is None
    assert [(e.name, e.reason) for e in report.left] == [
        ("norm4", "GroupNorm followed by the model output")]
    assert type(converted.norm4) is nn.GroupNorm
    assert type(model.norm1) is nn.GroupNorm and type(model.act) is nn.SiLU  # input untouched

    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(converted, mode)()
        assert_close(converted(x), model(x))
    assert_same_gradients(model.double(), converted.double(), x.detach().double())


def assert_same_gradients(model, converted, *inputs, output=lambda out: out):
    """Gradients of every input and parameter (matched by name: convert keeps the state dict
    keys) equal, in float64 so that only a wrong formula can make them differ."""
    inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    wrt = [(f"input {i}", t) for i, t in enumerate(inputs) if t.requires_grad]
    names = [n for n, _ in wrt] + [n for n, _ in model.named_parameters()]
    converted_parameters = dict(converted.named_parameters())
    grads = torch.autograd.grad(output(model(*inputs)).square().sum(),
                                [t for _, t in wrt] + list(model.parameters()))
    fused = torch.autograd.grad(output(converted(*inputs)).square().sum(),
                                [t for _, t in wrt] + [converted_parameters[n] for n in names[len(wrt):]])
    for name, expected, actual in zip(names, grads, fused):
        assert_close(actual, expected, msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_group_norm_options():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.GroupNorm(2, 8), nn.SiLU())
    converted, report = convert(model, fuse_group_norm=False)
    assert type(converted[1]) is GroupNormProxyAct and type(converted[3]) is nn.GroupNorm
    assert [r.name for r in report.replaced] == ["1"] and report.left == []
    converted, report = convert(model, group_norm_proxy=True)
    assert type(converted[3]) is GroupNormProxyAct and converted[3].num_groups == 2
    assert_close(converted[3].weight, model[3].weight)
    converted, report = convert(model, proxy=False, activation="gelu")
    assert [type(m) for m in converted] == [nn.Conv2d, GroupNormAct, nn.Identity, GroupNormAct,
                                            nn.Identity]
    assert converted[3].activation == "gelu"


# Module rules.

class SharedActivationBlock(nn.Module):
    """fx cannot trace it (data-dependent branch); its one SiLU also acts on an embedding."""

    def __init__(self):
        super().__init__()
        self.norm, self.act = nn.GroupNorm(2, 8), nn.SiLU()
        self.proj = nn.Linear(4, 8)

    def forward(self, x, emb):
        h = self.act(self.norm(x))
        if emb.sum() > 0:
            h = h + self.proj(self.act(emb))[:, :, None, None]
        return h


class FusedSharedActivationBlock(SharedActivationBlock):
    def forward(self, x, emb):
        h = self.norm(x)
        if emb.sum() > 0:
            h = h + self.proj(self.act(emb))[:, :, None, None]
        return h


def shared_activation_rule(block, context):
    block.norm = context.fuse(block.norm, "norm", block.act, absorbed="act")
    block.__class__ = FusedSharedActivationBlock
    return block


@pytest.fixture
def rules():
    """fusednorm's rule registry, restored after the test."""
    module = importlib.import_module("fusednorm.convert")  # fusednorm.convert is the function
    saved = dict(module._RULES)
    yield fusednorm.convert.register_rule
    module._RULES.clear()
    module._RULES.update(saved)


@pytest.mark.parametrize("key", ["class", "qualified name"])
def test_registered_rule_converts_an_untraceable_block(rules, key):
    wrapper = nn.Sequential(SharedActivationBlock())  # a Sequential cannot pass emb: walk it
    model = nn.ModuleDict({"block": wrapper[0], "bn": nn.BatchNorm2d(8)})
    before, _ = convert(model)
    assert type(before["block"].norm) is nn.GroupNorm
    [entry] = [e for e in _.left if e.name == "block.norm"]
    assert "no rule (fusednorm.convert.register_rule)" in entry.reason

    cls = SharedActivationBlock
    rules(cls if key == "class" else f"{cls.__module__}.{cls.__qualname__}", shared_activation_rule)
    converted, report = convert(model)
    block = converted["block"]
    assert type(block) is FusedSharedActivationBlock and isinstance(block.norm, GroupNormAct)
    assert ("block.norm", "block.act") in [(r.name, r.absorbed) for r in report.replaced]
    assert "block.norm" not in [e.name for e in report.left]
    x, emb = torch.randn(2, 8, 3, 3), torch.rand(2, 4)
    assert_close(block(x, emb), model["block"](x, emb))
    assert_close(block(x, -emb), model["block"](x, -emb))
    assert type(model["block"]) is SharedActivationBlock  # input untouched


def test_register_rule_errors_and_unhandled_norms(rules):
    with pytest.raises(TypeError, match="module_class must be a class"):
        rules(3, shared_activation_rule)
    with pytest.raises(TypeError, match="rule must be callable"):
        rules(SharedActivationBlock, "not a function")
    rules(SharedActivationBlock, lambda block, context: block)  # fuses nothing
    converted, report = convert(SharedActivationBlock())
    assert type(converted.norm) is nn.GroupNorm
    assert [(e.name, e.reason) for e in report.left] == [
        ("norm", "the rule for SharedActivationBlock did not fuse it")]


# timm's norm-act modules (timm.layers.norm_act, timm 1.0). timm cannot be installed here (it needs
# torchvision, which needs a newer torch), so these stand-ins copy its structure: subclasses of
# the torch norm with ``drop`` and ``act`` submodules, under timm's qualified names.

class TimmBatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features, act_layer=nn.ReLU, drop_layer=None):
        super().__init__(num_features)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class TimmGroupNormAct(nn.GroupNorm):
    def __init__(self, num_channels, num_groups=32, act_layer=nn.ReLU):
        super().__init__(num_groups, num_channels)
        self.drop, self.act = nn.Identity(), act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)))


for _cls, _name in ((TimmBatchNormAct2d, "BatchNormAct2d"), (TimmGroupNormAct, "GroupNormAct")):
    _cls.__module__, _cls.__qualname__ = "timm.layers.norm_act", _name


class TimmNet(nn.Module):
    def __init__(self, act_layer=nn.SiLU, drop_layer=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = TimmBatchNormAct2d(8, act_layer, drop_layer)
        self.gn = TimmGroupNormAct(8, num_groups=4, act_layer=act_layer)
        self.bn2 = TimmBatchNormAct2d(8, act_layer=None)

    def forward(self, x):
        return self.bn2(self.gn(self.bn1(self.conv(x))))


def test_timm_norm_act_modules_keep_their_activation():
    model = randomize_bn(TimmNet())
    assert isinstance(model.bn1, nn.BatchNorm2d)  # seen as a plain BN, its SiLU would be lost
    converted, report = convert(model, num_groups=2)
    assert type(converted) is TimmNet  # leaves for fx, converted by their rule
    assert isinstance(converted.bn1, GroupNormProxyAct) and converted.bn1.activation == "silu"
    assert isinstance(converted.gn, GroupNormAct) and converted.gn.num_groups == 4
    assert type(converted.bn2) is nn.GroupNorm
    assert [(r.name, r.absorbed) for r in report.replaced] == [
        ("bn1", "bn1.act"), ("gn", "gn.act"), ("bn2", None)]
    assert [(e.name, e.reason) for e in report.left] == [("bn2", "no activation (apply_act=False)")]
    x = torch.randn(2, 3, 5, 5)
    bn1, gn, bn2 = model.bn1, model.gn, model.bn2
    h = fusednorm.group_norm_proxy_act(model.conv(x), 2, bn1.weight, bn1.bias, activation="silu")
    h = F.silu(F.group_norm(h, 4, gn.weight, gn.bias))
    assert_close(converted(x), F.group_norm(h, 2, bn2.weight, bn2.bias))


def test_timm_norm_act_with_drop_layer_or_unknown_activation():
    converted, report = convert(TimmNet(act_layer=nn.Hardswish), proxy=False)
    assert [type(m) for m in converted.bn1] == [nn.GroupNorm, nn.Identity, nn.Hardswish]
    assert type(converted.gn) is TimmGroupNormAct
    assert {e.name: e.reason for e in report.left}["gn"] == (
        "activation Hardswish is not one fusednorm has")
    converted, report = convert(TimmNet(drop_layer=lambda: nn.Dropout(0.5)))
    assert [type(m) for m in converted.bn1] == [nn.GroupNorm, nn.Dropout, nn.SiLU]
    assert {e.name: e.reason for e in report.left}["bn1"] == (
        "Dropout between the norm and the activation")


def test_norm_subclass_with_its_own_forward_and_no_rule_is_reported():
    class ScaledGroupNorm(nn.GroupNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(ScaledGroupNorm(2, 4), nn.ReLU(), nn.GroupNorm(2, 4), nn.ReLU())
    converted, report = convert(model)
    assert type(converted[0]) is ScaledGroupNorm and type(converted[2]) is GroupNormAct
    assert [e.name for e in report.left] == ["0"]
    assert "forward of its own and has no rule" in report.left[0].reason
