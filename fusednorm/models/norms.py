"""Normalization + activation blocks by name, shared by the models and the analysis tools."""
from __future__ import annotations

import torch
from torch import nn

from ..activations import parse_activation
from ..modules import GroupNormProxyAct
from ..proxy import proxy_stats

NORMS = ("bn", "gn", "ln", "in", "bn+pn", "gn+pn", "ln+pn", "in+pn")


def group_count(num_channels: int, num_groups: int) -> int:
    """The largest group count <= ``num_groups`` that divides ``num_channels``."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    return next(g for g in range(min(num_groups, num_channels), 0, -1) if num_channels % g == 0)


def activation_module(activation) -> nn.Module:
    """The torch.nn module for an activation name of :mod:`fusednorm.activations`."""
    act, slope = parse_activation(activation)
    modules = {
        "identity": nn.Identity, "relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "leaky_relu": lambda: nn.LeakyReLU(slope),
    }
    return modules[act.name]()


class BatchNormProxyAct(nn.Module):
    """BatchNorm without affine -> weight/bias -> activation -> Proxy Normalization ("BN+PN").

    The proxy statistics only depend on the parameters (pn-math.md, steps 4-6), so PN applies to
    any normalized input; here the normalization is BatchNorm, with its running statistics.
    Accepts (N, C, *spatial) with any number of spatial dims.
    """

    def __init__(self, num_channels, activation="relu", eps=1e-5, momentum=0.1, proxy_eps=0.03,
                 num_proxy_samples=200, device=None, dtype=None):
        super().__init__()
        parse_activation(activation)
        self.activation, self.proxy_eps, self.num_proxy_samples = activation, proxy_eps, num_proxy_samples
        # BatchNorm1d on (N, C, L) normalizes over N and L: the flattened spatial dims.
        self.norm = nn.BatchNorm1d(num_channels, eps=eps, momentum=momentum, affine=False,
                                   device=device, dtype=dtype)
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.ones(num_channels, **factory))
        self.bias = nn.Parameter(torch.zeros(num_channels, **factory))
        self.proxy_bias = nn.Parameter(torch.zeros(num_channels, **factory))
        self.proxy_weight = nn.Parameter(torch.zeros(num_channels, **factory))

    def forward(self, input):
        act, slope = parse_activation(self.activation)
        xhat = self.norm(input.reshape(input.shape[0], input.shape[1], -1)).view(input.shape)
        shape = (1, -1) + (1,) * (input.dim() - 2)
        a = act.value(self.weight.view(shape) * xhat + self.bias.view(shape), slope)
        m, _, s = proxy_stats(self.weight, self.bias, self.proxy_bias, self.proxy_weight, act,
                              slope, self.num_proxy_samples, self.proxy_eps)
        return s.view(shape) * (a - m.view(shape))

    def extra_repr(self):
        return (f"activation={self.activation!r}, proxy_eps={self.proxy_eps}, "
                f"num_proxy_samples={self.num_proxy_samples}")


def norm_act(norm: str, num_channels: int, num_groups: int = 8, activation="relu") -> nn.Module:
    """A normalization + activation block for (N, C, H, W) inputs, by name (one of :data:`NORMS`).

    "ln" is GroupNorm with 1 group, "in" GroupNorm with one group per channel, "gn" GroupNorm
    with :func:`group_count` groups. The plain norms are ``nn.Sequential(norm, activation)``;
    the "+pn" ones a single module whose output is the proxy-normalized activation.
    """
    key = norm.lower() if isinstance(norm, str) else norm
    if key not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    base, _, pn = key.partition("+")
    if base == "bn":
        if pn:
            return BatchNormProxyAct(num_channels, activation)
        return nn.Sequential(nn.BatchNorm2d(num_channels), activation_module(activation))
    groups = {"ln": 1, "in": num_channels, "gn": group_count(num_channels, num_groups)}[base]
    if pn:
        return GroupNormProxyAct(groups, num_channels, activation)
    return nn.Sequential(nn.GroupNorm(groups, num_channels), activation_module(activation))
