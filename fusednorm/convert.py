"""Put fusednorm modules into existing models.

BatchNorm (+ activation) -> GroupNormProxyAct / GroupNormAct / GroupNorm (batch independence), and
GroupNorm + activation -> GroupNormAct (the same function, fused: diffusers UNets, GN ResNets).
What follows each norm is read from the model's fx graph; a module fx cannot trace is walked, and
module classes whose forward fx cannot read are handled by rules (:func:`register_rule`).
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from .activations import activation_of_module, parse_activation
from .modules import BatchNormProxyAct, GroupNormAct, GroupNormProxyAct, group_count

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_PLAIN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward,
                   nn.GroupNorm.forward)
_FUSED = (GroupNormProxyAct, GroupNormAct, BatchNormProxyAct)


@dataclass(frozen=True)
class Replacement:
    """One norm replaced: its qualified name, the old and new modules (repr), the group count
    used, and the activation absorbed into the new module (its module name or function), if any."""
    name: str
    old: str
    new: str
    groups: int
    absorbed: str | None = None


@dataclass(frozen=True)
class LeftEntry:
    """A norm not fused with an activation, and why: a BatchNorm became a plain nn.GroupNorm (or
    was left as is when the traced forward never called it as a module); a GroupNorm stayed."""
    name: str
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert` did: every norm replaced, and those not fused with an activation."""
    replaced: list[Replacement] = field(default_factory=list)
    left: list[LeftEntry] = field(default_factory=list)

    def __str__(self):
        lines = [f"replaced {len(self.replaced)} norm layer(s):"]
        lines += [f"  {r.name}: {r.old} -> {r.new}"
                  + (f" (absorbed {r.absorbed})" if r.absorbed else "") for r in self.replaced]
        if self.left:
            lines.append(f"not fused with an activation ({len(self.left)}):")
            lines += [f"  {e.name}: {e.reason}" for e in self.left]
        return "\n".join(lines)


# A rule: (module, RuleContext) -> the module to put in its place, or None for "no rule applies".
Rule = Callable[[nn.Module, "RuleContext"], Union[nn.Module, None]]

# Keys: a class, or a class's qualified name ("package.module.Class"), so that rules for optional
# libraries need no import. Values: the rule, or "module:function" imported on first use.
_RULES: dict[Union[type, str], Union[Rule, str]] = {}


def register_rule(module_class, rule):
    """Teach :func:`convert` a module class whose ``forward`` fx cannot read.

    ``module_class`` is a class or its qualified name (``"diffusers.models.resnet.ResnetBlock2D"``;
    no import needed); the rule applies to instances of it and of its subclasses.
    ``rule(module, context)`` gets the module (already a copy: change it in place freely) and a
    :class:`RuleContext`; it returns the module to put in its place, or None to let convert
    handle the module as if there were no rule. Norms the rule neither fused
    (``context.fuse``) nor left (``context.leave``) are left by convert afterwards, and every
    child module that holds norms is converted the usual way. Returns ``rule``.
    """
    if not (isinstance(module_class, type) or isinstance(module_class, str)):
        raise TypeError(f"module_class must be a class or a qualified class name, "
                        f"got {module_class!r}")
    if not callable(rule):
        raise TypeError(f"rule must be callable, got {rule!r}")
    _RULES[module_class] = rule
    return rule


# Rules shipped with fusednorm (fusednorm/integrations/): see their docstrings for what each does.
for _name in ("diffusers.models.resnet.ResnetBlock2D",):
    _RULES[_name] = "fusednorm.integrations.diffusers:resnet_block_2d_rule"
for _name in ("diffusers.models.unets.unet_2d.UNet2DModel",
              "diffusers.models.unets.unet_2d_condition.UNet2DConditionModel",
              "diffusers.models.autoencoders.vae.Encoder",
              "diffusers.models.autoencoders.vae.Decoder"):
    _RULES[_name] = "fusednorm.integrations.diffusers:conv_norm_out_rule"
for _name in ("timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct",
              "timm.layers.norm_act.GroupNormAct", "timm.layers.norm_act.GroupNorm1Act"):
    _RULES[_name] = "fusednorm.integrations.timm:norm_act_rule"


def _rule_for(module):
    """The rule for ``module``'s class or its nearest base class with one, or None."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls) or _RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            if isinstance(rule, str):
                module_name, _, function = rule.partition(":")
                rule = getattr(importlib.import_module(module_name), function)
            return rule
    return None


def _norm_kind(module):
    """"batch" for a BatchNorm, "group" for a GroupNorm (subclasses included), else None."""
    if isinstance(module, BATCH_NORMS):
        return "batch"
    if isinstance(module, nn.GroupNorm):
        return "group"
    return None


def _is_plain_norm(module):
    """A BatchNorm/GroupNorm whose forward is torch's own (a subclass with its own forward, e.g. a
    norm that also applies an activation, needs a rule)."""
    return _norm_kind(module) is not None and type(module).forward in _PLAIN_FORWARDS


def convert(model: nn.Module, num_groups: int = 8, proxy: bool = True, activation=None,
            fuse_group_norm: bool = True, group_norm_proxy: bool = False):
    """Replace the norms of ``model`` by fusednorm modules.

    **BatchNorm** (made batch-independent): a BatchNorm1d/2d/3d whose output goes only to an
    activation (nn.ReLU, nn.SiLU, nn.GELU, nn.LeakyReLU, or through torch.fx F.relu/torch.relu/
    F.silu/F.gelu/F.leaky_relu/Tensor.relu) becomes one :class:`GroupNormProxyAct`
    (:class:`GroupNormAct` with ``proxy=False``) that also applies the activation; any other
    BatchNorm becomes a plain ``nn.GroupNorm``. BN's weight/bias become gamma/beta (1/0 for a
    GroupNormProxyAct from a BN without affine; GroupNormAct and GroupNorm keep BN's ``affine``),
    with BN's eps, device, dtype and requires_grad. The group count is the largest one
    <= ``num_groups`` dividing the channel count.

    **GroupNorm** (``fuse_group_norm``): an ``nn.GroupNorm`` whose output goes only to an
    activation becomes a :class:`GroupNormAct` with the same groups, eps, affine and parameters,
    so the output is the same up to rounding (``group_norm_proxy=True``: a GroupNormProxyAct,
    which changes the function). Other GroupNorms stay as they are.

    ``activation``, when given, is the activation name every fused module uses instead of the one
    it absorbed.

    The model is traced with torch.fx to see what follows each norm. A module class with a rule
    (:func:`register_rule`; shipped: diffusers' ResnetBlock2D, UNet2DModel, UNet2DConditionModel,
    VAE Encoder/Decoder, and timm's BatchNormAct2d/GroupNormAct) is handled by its rule. If a
    module cannot be traced, its children are converted one by one the same way, and inside it
    only the order of an ``nn.Sequential`` is trusted; a BN elsewhere becomes a plain GroupNorm.

    Returns ``(converted, report)``; ``model`` itself is not modified. ``converted`` keeps the
    classes of ``model`` when every absorbed activation is a module called once (it is replaced
    by ``nn.Identity``) or handled by a rule; when a functional activation or a module called at
    several places (as in torchvision's BasicBlock) is absorbed, the module traced is returned as
    a ``torch.fx.GraphModule`` without that call. Raises ValueError when there is nothing to
    convert.
    """
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if activation is not None:
        parse_activation(activation)
    converter = _Converter(num_groups, proxy, activation, fuse_group_norm, group_norm_proxy)
    if not converter.holds_work(model):
        kinds = "BatchNorm1d/2d/3d, SyncBatchNorm" + (" or GroupNorm" if fuse_group_norm else "")
        raise ValueError(f"nothing to convert: {type(model).__name__} has no {kinds}")
    model = copy.deepcopy(model)
    converter.report_unknown_norms(model)
    if _rule_for(model) is None and converter.wanted(model):
        kind = "BatchNorm" if _norm_kind(model) == "batch" else "GroupNorm"
        return converter.replace(model, "", None, None, f"the model is a single {kind}"), \
            converter.report
    return converter.convert(model, ""), converter.report


convert.register_rule = register_rule  # fusednorm.convert is this function; keep the rule API on it


# Activation classes of other libraries that are not subclasses of torch's, by qualified name.
_ACTIVATIONS_BY_NAME = {"timm.layers.activations.GELU": "gelu",
                        "timm.layers.activations.GELUTanh": "gelu_tanh",
                        "timm.layers.activations.Swish": "silu"}


def _activation_of_module(module):
    """The activation spec of an activation module (torch's, or another library's by name)."""
    cls = type(module)
    name = _ACTIVATIONS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    return name if name is not None else activation_of_module(module)


_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_)


def _activation_of_node(node, root):
    """The activation spec of an fx node applied to its first argument, or None."""
    if node.op == "call_module":
        return _activation_of_module(root.get_submodule(node.target))
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    if node.op != "call_function":
        return None
    if node.target in _RELU_FUNCTIONS:
        return "relu"
    if node.target is F.silu:
        return "silu"
    if node.target is F.gelu:
        approximate = node.args[1] if len(node.args) > 1 else node.kwargs.get("approximate", "none")
        return "gelu_tanh" if approximate == "tanh" else "gelu"
    if node.target in (F.leaky_relu, F.leaky_relu_):
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        return ("leaky_relu", slope) if isinstance(slope, (int, float)) else None
    return None


def _describe(node, root):
    if node.op == "call_module":
        return type(root.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return "the model output" if node.op == "output" else node.op


class _Tracer(fx.Tracer):
    """fx's default tracer, with fusednorm's modules and modules that have a rule as leaves: the
    former's argument checks cannot run on fx proxies, the latter are converted by their rule."""

    def is_leaf_module(self, module, qualified_name):
        return (isinstance(module, _FUSED) or _rule_for(module) is not None
                or super().is_leaf_module(module, qualified_name))


def _set_submodule(root, name, module):
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent), attr, module)


def _short(kind):
    return "BN" if kind == "batch" else "GroupNorm"


class RuleContext:
    """What a rule gets besides its module: the module's qualified name (``prefix``, ending in
    "." unless empty) and the converter's way of building and reporting replacements."""

    def __init__(self, converter, prefix):
        self._converter, self.prefix = converter, prefix
        self.handled = set()  # ids of modules fused or left by the rule

    def _qualified(self, name):
        return self.prefix + name if name else self.prefix.rstrip(".")

    def activation_of(self, module):
        """The activation spec of an activation module (nn.ReLU/SiLU/GELU/LeakyReLU), else None."""
        return _activation_of_module(module)

    def fuse(self, norm, name, activation, absorbed=None):
        """The fused module replacing ``norm`` (a BatchNorm or GroupNorm, ``name`` relative to the
        rule's module) followed by ``activation`` (a module or an activation spec): a
        GroupNormProxyAct or GroupNormAct with convert's settings; reported."""
        spec = activation if not isinstance(activation, nn.Module) else _activation_of_module(activation)
        if spec is None:
            raise ValueError(f"{self.prefix}{name}: {activation!r} is not an activation fusednorm has")
        new = self._converter.replace(norm, self._qualified(name), spec,
                                      self._qualified(absorbed) if absorbed else None)
        self.handled.add(id(new))
        return new

    def leave(self, norm, name, reason):
        """The module replacing a norm that stays unfused: a plain GroupNorm for a BatchNorm,
        ``norm`` itself for a GroupNorm; reported with ``reason``."""
        new = self._converter.replace(norm, self._qualified(name), None, None, reason)
        self.handled.add(id(new))
        return new


class _Converter:
    def __init__(self, num_groups, proxy, activation, fuse_group_norm, group_norm_proxy):
        self.num_groups, self.proxy, self.activation = num_groups, proxy, activation
        self.fuse_group_norm, self.group_norm_proxy = fuse_group_norm, group_norm_proxy
        self.report = ConversionReport()

    def wanted(self, module):
        """A norm convert replaces or fuses without a rule."""
        return _is_plain_norm(module) and (_norm_kind(module) == "batch" or self.fuse_group_norm)

    def report_unknown_norms(self, model):
        """Norm subclasses with a forward of their own and no rule are left: report them."""
        ruled = []
        for name, module in model.named_modules():
            if any(r == "" or name.startswith(r + ".") for r in ruled):
                continue
            if _rule_for(module) is not None:
                ruled.append(name)
            elif _norm_kind(module) is not None and not _is_plain_norm(module):
                self.report.left.append(LeftEntry(name, (
                    f"{type(module).__name__} subclasses {_norm_kind(module).title()}Norm with a "
                    f"forward of its own and has no rule (fusednorm.convert.register_rule); "
                    f"left as is")))

    def holds_work(self, module):
        return any(self.wanted(m) or _rule_for(m) for m in module.modules())

    def replace(self, norm, name, act, absorbed, reason=None):
        """The module replacing ``norm``: fused with ``act`` (a spec) or, when None, a GroupNorm
        for a BatchNorm and ``norm`` itself for a GroupNorm."""
        kind = _norm_kind(norm)
        if act is None:
            self.report.left.append(LeftEntry(name, reason))
            if kind == "group":
                return norm
        if kind == "batch":
            channels, proxy = norm.num_features, self.proxy
            groups = group_count(channels, self.num_groups)
        else:
            channels, groups, proxy = norm.num_channels, norm.num_groups, self.group_norm_proxy
        tensors = [t for t in (norm.weight, getattr(norm, "running_mean", None)) if t is not None]
        factory = dict(device=tensors[0].device, dtype=tensors[0].dtype) if tensors else {}
        # nn.GroupNorm(..., bias=False) has a weight and no bias; PN's modules keep a zero bias.
        has_bias = norm.affine and norm.bias is not None
        if act is None:
            new = nn.GroupNorm(groups, channels, norm.eps, norm.affine, bias=has_bias, **factory)
        elif proxy:
            new = GroupNormProxyAct(groups, channels, self.activation or act, norm.eps, **factory)
        else:
            new = GroupNormAct(groups, channels, self.activation or act, norm.eps, norm.affine,
                               bias=has_bias, **factory)
        for param in ("weight", "bias") if norm.affine else ():
            source, target = getattr(norm, param), getattr(new, param)
            if source is not None and target is not None:
                with torch.no_grad():
                    target.copy_(source)
                target.requires_grad_(source.requires_grad)
        new.train(norm.training)
        self.report.replaced.append(Replacement(name, repr(norm), repr(new), groups, absorbed))
        return new

    def convert(self, module, prefix):
        """``module`` converted (in place where possible): by its rule, its fx graph, or by
        walking it."""
        rule = _rule_for(module)
        if rule is not None:
            context = RuleContext(self, prefix)
            new = rule(module, context)
            if new is not None:
                return self._after_rule(new, prefix, context, type(module).__name__)
            if self.wanted(module):
                return self.replace(module, prefix.rstrip("."), None, None,
                                    f"the rule for {type(module).__name__} did not apply")
        try:
            graph_module = fx.GraphModule(module, _Tracer().trace(module), type(module).__name__)
        except Exception as error:  # noqa: BLE001 (any failure of tracing means: walk instead)
            message = str(error).splitlines()[0].split(". ")[0] if str(error) else ""
            return self._walk(module, prefix, f"{type(error).__name__}: {message}")
        return self._convert_graph(module, graph_module, prefix)

    def _after_rule(self, module, prefix, context, rule_owner):
        """Norms a rule did not handle are left; children that hold norms are converted."""
        for name, child in module.named_children():
            if id(child) in context.handled:
                continue
            if self.wanted(child) and _rule_for(child) is None:
                setattr(module, name, self.replace(child, prefix + name, None, None,
                                                   f"the rule for {rule_owner} did not fuse it"))
            elif self.holds_work(child):
                setattr(module, name, self.convert(child, f"{prefix}{name}."))
        return module

    def _convert_graph(self, module, gm, prefix):
        nodes = list(gm.graph.nodes)
        calls = {}
        for node in nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        plans = []  # (norm node, activation spec or None, activation node, reason)
        planned = set()
        for node in nodes:
            if (node.op != "call_module" or node.target in planned
                    or not self.wanted(gm.get_submodule(node.target))):
                continue
            planned.add(node.target)
            kind = _short(_norm_kind(gm.get_submodule(node.target)))
            users = list(node.users)
            act = None
            if calls[node.target] > 1:
                reason = f"{kind} module called {calls[node.target]} times"
            elif len(users) != 1:
                reason = f"{kind} output used {len(users)} times"
            else:
                act = _activation_of_node(users[0], gm) if users[0].args[:1] == (node,) else None
                reason = None if act else f"{kind} followed by {_describe(users[0], gm)}"
            plans.append((node, act, users[0] if act else None, reason))
        # Removing graph nodes is only needed for an activation that is not a module of its own.
        rewrite = any(a is not None and (a.op != "call_module" or calls[a.target] > 1)
                      for _, _, a, _ in plans)
        target = gm if rewrite else module
        for norm_node, act, act_node, reason in plans:
            absorbed = None
            if act_node is not None:
                absorbed = (prefix + act_node.target if act_node.op == "call_module"
                            else _describe(act_node, gm))
            new = self.replace(gm.get_submodule(norm_node.target), prefix + norm_node.target, act,
                               absorbed, reason)
            _set_submodule(target, norm_node.target, new)
            if act_node is None:
                continue
            if rewrite:
                act_node.replace_all_uses_with(norm_node)
                gm.graph.erase_node(act_node)
            else:
                _set_submodule(module, act_node.target, nn.Identity())
        ruled = [n for n in calls if _rule_for(gm.get_submodule(n)) is not None]
        for name in ruled:
            _set_submodule(target, name, self.convert(gm.get_submodule(name), f"{prefix}{name}."))
        for name, sub in module.named_modules():
            inside_rule = any(name == r or name.startswith(r + ".") for r in ruled)
            if self.wanted(sub) and name not in planned and not inside_rule:
                self.report.left.append(LeftEntry(
                    prefix + name, "not called as a module by the traced forward; left as is"))
        if rewrite:
            gm.graph.lint()
            gm.delete_all_unused_submodules()
            gm.recompile()
        return target

    def _walk(self, module, prefix, error):
        """Convert a module that fx cannot trace: nn.Sequential order, then each child."""
        children = list(module.named_children())
        sequential = type(module).forward is nn.Sequential.forward
        for i, (name, child) in enumerate(children):
            if not self.wanted(child) or _rule_for(child) is not None:
                if self.holds_work(child):
                    setattr(module, name, self.convert(child, f"{prefix}{name}."))
                continue
            following = children[i + 1] if sequential and i + 1 < len(children) else None
            act = _activation_of_module(following[1]) if following else None
            if act is not None:
                setattr(module, name, self.replace(child, prefix + name, act, prefix + following[0]))
                setattr(module, following[0], nn.Identity())
                continue
            kind = _short(_norm_kind(child))
            if following is not None:
                reason = f"{kind} followed by {type(following[1]).__name__}"
            elif sequential:
                reason = f"{kind} is the last module of a Sequential that fx cannot trace ({error})"
            else:
                reason = (f"{type(module).__name__} is not fx-traceable ({error}) and has no "
                          f"rule (fusednorm.convert.register_rule); used module walk")
            setattr(module, name, self.replace(child, prefix + name, None, None, reason))
        return module
