"""Turn a BatchNorm model into a batch-independent one: BN + activation -> GroupNormProxyAct."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .activations import parse_activation
from .models.norms import BatchNormProxyAct, group_count
from .modules import GroupNormAct, GroupNormProxyAct

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class Replacement:
    """One BatchNorm replaced: its qualified name, the old and new modules (repr), the group count
    used, and the activation absorbed into the new module (its module name or function), if any."""
    name: str
    old: str
    new: str
    groups: int
    absorbed: str | None = None


@dataclass(frozen=True)
class LeftEntry:
    """A BatchNorm whose activation was not absorbed, and why: it became a plain nn.GroupNorm, or
    was left as is when the traced forward never called it as a module."""
    name: str
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert` did: every BatchNorm replaced, and those not fused with an activation."""
    replaced: list[Replacement] = field(default_factory=list)
    left: list[LeftEntry] = field(default_factory=list)

    def __str__(self):
        lines = [f"replaced {len(self.replaced)} BatchNorm layer(s):"]
        lines += [f"  {r.name}: {r.old} -> {r.new}"
                  + (f" (absorbed {r.absorbed})" if r.absorbed else "") for r in self.replaced]
        if self.left:
            lines.append(f"not fused with an activation ({len(self.left)}):")
            lines += [f"  {e.name}: {e.reason}" for e in self.left]
        return "\n".join(lines)


def convert(model: nn.Module, num_groups: int = 8, proxy: bool = True, activation=None):
    """Replace the BatchNorms of ``model`` by batch-independent normalizations.

    A BatchNorm1d/2d/3d whose output goes only to an activation (nn.ReLU, nn.SiLU, nn.GELU,
    nn.LeakyReLU, or through torch.fx F.relu/torch.relu/F.silu/F.gelu/F.leaky_relu/Tensor.relu)
    becomes one :class:`GroupNormProxyAct` (:class:`GroupNormAct` with ``proxy=False``) that also
    applies the activation; any other BatchNorm becomes a plain ``nn.GroupNorm``. BN's weight/bias
    become gamma/beta (1/0 for a GroupNormProxyAct from a BN without affine; GroupNormAct and
    GroupNorm keep BN's ``affine``), with BN's eps, device, dtype and requires_grad. The group
    count is the largest one <= ``num_groups`` dividing the channel count. ``activation``, when
    given, is the activation name every fused module uses instead of the one it absorbed.

    The model is traced with torch.fx to see what follows each BN. If it cannot be traced, its
    children are converted one by one the same way, and inside a non-traceable module only the
    order of an ``nn.Sequential`` is trusted; a BN elsewhere becomes a plain GroupNorm.

    Returns ``(converted, report)``; ``model`` itself is not modified. ``converted`` keeps the
    classes of ``model`` when every absorbed activation is a module called once (it is replaced
    by ``nn.Identity``); when a functional activation or a module called at several places (as in
    torchvision's BasicBlock) is absorbed, the module traced is returned as a
    ``torch.fx.GraphModule`` without that call. Raises ValueError when there is no BatchNorm.
    """
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if activation is not None:
        parse_activation(activation)
    if not any(isinstance(m, BATCH_NORMS) for m in model.modules()):
        raise ValueError(f"nothing to convert: {type(model).__name__} has no "
                         f"BatchNorm1d/2d/3d or SyncBatchNorm")
    converter = _Converter(num_groups, proxy, activation)
    model = copy.deepcopy(model)
    if isinstance(model, BATCH_NORMS):
        return converter.replace(model, "", None, None, "the model is a single BatchNorm"), \
            converter.report
    return converter.convert(model, ""), converter.report


def _activation_of_module(module):
    """The activation spec of an activation module, or None."""
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.SiLU):
        return "silu"
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if isinstance(module, nn.LeakyReLU):
        return ("leaky_relu", module.negative_slope)
    return None


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
    """fx's default tracer, with fusednorm's modules as leaves: their argument checks cannot run on
    fx proxies, and a partially converted model should still trace."""

    def is_leaf_module(self, module, qualified_name):
        return (isinstance(module, (GroupNormProxyAct, GroupNormAct, BatchNormProxyAct))
                or super().is_leaf_module(module, qualified_name))


def _set_submodule(root, name, module):
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent), attr, module)


class _Converter:
    def __init__(self, num_groups, proxy, activation):
        self.num_groups, self.proxy, self.activation = num_groups, proxy, activation
        self.report = ConversionReport()

    def replace(self, bn, name, act, absorbed, reason=None):
        """The module replacing ``bn``: fused with ``act`` (a spec) or, when None, a GroupNorm."""
        channels = bn.num_features
        groups = group_count(channels, self.num_groups)
        tensors = [t for t in (bn.weight, bn.running_mean) if t is not None]
        factory = dict(device=tensors[0].device, dtype=tensors[0].dtype) if tensors else {}
        if act is None:
            new = nn.GroupNorm(groups, channels, bn.eps, bn.affine, **factory)
            self.report.left.append(LeftEntry(name, reason))
        elif self.proxy:
            new = GroupNormProxyAct(groups, channels, self.activation or act, bn.eps, **factory)
        else:
            new = GroupNormAct(groups, channels, self.activation or act, bn.eps, bn.affine, **factory)
        if bn.affine and new.weight is not None:
            with torch.no_grad():
                new.weight.copy_(bn.weight)
                new.bias.copy_(bn.bias)
            new.weight.requires_grad_(bn.weight.requires_grad)
            new.bias.requires_grad_(bn.bias.requires_grad)
        new.train(bn.training)
        self.report.replaced.append(Replacement(name, repr(bn), repr(new), groups, absorbed))
        return new

    def convert(self, module, prefix):
        """``module`` converted (in place where possible): by its fx graph, else by walking it."""
        try:
            graph_module = fx.GraphModule(module, _Tracer().trace(module), type(module).__name__)
        except Exception as error:  # noqa: BLE001 (any failure of tracing means: walk instead)
            return self._walk(module, prefix, f"{type(error).__name__}: {error}".splitlines()[0])
        return self._convert_graph(module, graph_module, prefix)

    def _convert_graph(self, module, gm, prefix):
        nodes = list(gm.graph.nodes)
        calls = {}
        for node in nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        plans = []  # (bn node, activation spec or None, activation node, reason)
        for node in nodes:
            if (node.op != "call_module" or node.target in {p[0].target for p in plans}
                    or not isinstance(gm.get_submodule(node.target), BATCH_NORMS)):
                continue
            users = list(node.users)
            act = None
            if calls[node.target] > 1:
                reason = f"BN module called {calls[node.target]} times"
            elif len(users) != 1:
                reason = f"BN output used {len(users)} times"
            else:
                act = _activation_of_node(users[0], gm) if users[0].args[:1] == (node,) else None
                reason = None if act else f"BN followed by {_describe(users[0], gm)}"
            plans.append((node, act, users[0] if act else None, reason))
        # Removing graph nodes is only needed for an activation that is not a module of its own.
        rewrite = any(a is not None and (a.op != "call_module" or calls[a.target] > 1)
                      for _, _, a, _ in plans)
        target = gm if rewrite else module
        for bn_node, act, act_node, reason in plans:
            absorbed = None
            if act_node is not None:
                absorbed = (prefix + act_node.target if act_node.op == "call_module"
                            else _describe(act_node, gm))
            new = self.replace(gm.get_submodule(bn_node.target), prefix + bn_node.target, act,
                               absorbed, reason)
            _set_submodule(target, bn_node.target, new)
            if act_node is None:
                continue
            if rewrite:
                act_node.replace_all_uses_with(bn_node)
                gm.graph.erase_node(act_node)
            else:
                _set_submodule(module, act_node.target, nn.Identity())
        called = {bn_node.target for bn_node, *_ in plans}
        for name, sub in module.named_modules():
            if isinstance(sub, BATCH_NORMS) and name not in called:
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
            if not isinstance(child, BATCH_NORMS):
                if any(isinstance(m, BATCH_NORMS) for m in child.modules()):
                    setattr(module, name, self.convert(child, f"{prefix}{name}."))
                continue
            following = children[i + 1] if sequential and i + 1 < len(children) else None
            act = _activation_of_module(following[1]) if following else None
            if act is not None:
                setattr(module, name, self.replace(child, prefix + name, act, prefix + following[0]))
                setattr(module, following[0], nn.Identity())
                continue
            if following is not None:
                reason = f"BN followed by {type(following[1]).__name__}"
            elif sequential:
                reason = f"BN is the last module of a Sequential that fx cannot trace ({error})"
            else:
                reason = f"not fx-traceable ({error}), used module walk"
            setattr(module, name, self.replace(child, prefix + name, None, None, reason))
        return module
