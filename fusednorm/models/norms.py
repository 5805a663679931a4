"""Normalization + activation blocks by name, shared by the models and the analysis tools."""
from __future__ import annotations

from torch import nn

from ..activations import activation_module
from ..modules import BatchNormProxyAct, GroupNormProxyAct, group_count

NORMS = ("bn", "gn", "ln", "in", "bn+pn", "gn+pn", "ln+pn", "in+pn")


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
