"""nn.Modules over the functional API."""
from __future__ import annotations

import torch
from torch import nn

from . import functional
from .activations import parse_activation


class GroupNormProxyAct(nn.Module):
    """GroupNorm -> affine -> activation -> Proxy Normalization, fused.

    ``num_groups=1`` gives LayerNorm + PN, ``num_groups=num_channels`` InstanceNorm + PN.
    Owns ``weight`` (ones) and ``bias`` (zeros) and, with ``proxy_affine``, ``proxy_bias`` and
    ``proxy_weight`` (zeros). No running statistics: train and eval compute the same thing.
    """

    def __init__(self, num_groups, num_channels, activation="relu", eps=1e-5, proxy_eps=0.03,
                 num_proxy_samples=200, proxy_affine=True, backend=None, device=None, dtype=None):
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"num_channels={num_channels} is not divisible by num_groups={num_groups}")
        parse_activation(activation)
        self.num_groups, self.num_channels = num_groups, num_channels
        self.activation, self.eps, self.proxy_eps = activation, eps, proxy_eps
        self.num_proxy_samples, self.backend = num_proxy_samples, backend
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.ones(num_channels, **factory))
        self.bias = nn.Parameter(torch.zeros(num_channels, **factory))
        if proxy_affine:
            self.proxy_bias = nn.Parameter(torch.zeros(num_channels, **factory))
            self.proxy_weight = nn.Parameter(torch.zeros(num_channels, **factory))
        else:
            self.register_parameter("proxy_bias", None)
            self.register_parameter("proxy_weight", None)

    def forward(self, input):
        _check_channels(self, input)
        return functional.group_norm_proxy_act(
            input, self.num_groups, self.weight, self.bias, self.proxy_bias, self.proxy_weight,
            activation=self.activation, eps=self.eps, proxy_eps=self.proxy_eps,
            num_proxy_samples=self.num_proxy_samples, backend=self.backend)

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, activation={self.activation!r}, "
                f"eps={self.eps}, proxy_eps={self.proxy_eps}, "
                f"num_proxy_samples={self.num_proxy_samples}, "
                f"proxy_affine={self.proxy_bias is not None}")


class GroupNormAct(nn.Module):
    """``act(GroupNorm(x))`` fused (Proxy Normalization off), e.g. GroupNorm + SiLU."""

    def __init__(self, num_groups, num_channels, activation="relu", eps=1e-5, affine=True,
                 backend=None, device=None, dtype=None):
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"num_channels={num_channels} is not divisible by num_groups={num_groups}")
        parse_activation(activation)
        self.num_groups, self.num_channels = num_groups, num_channels
        self.activation, self.eps, self.backend = activation, eps, backend
        if affine:
            factory = dict(device=device, dtype=dtype)
            self.weight = nn.Parameter(torch.ones(num_channels, **factory))
            self.bias = nn.Parameter(torch.zeros(num_channels, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, input):
        _check_channels(self, input)
        return functional.group_norm_act(input, self.num_groups, self.weight, self.bias,
                                         activation=self.activation, eps=self.eps,
                                         backend=self.backend)

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, activation={self.activation!r}, "
                f"eps={self.eps}, affine={self.weight is not None}")


def _check_channels(module, input):
    """The module's view of a channel mismatch (the functional API would blame the weight)."""
    if isinstance(input, torch.Tensor) and input.dim() >= 2 and input.shape[1] != module.num_channels:
        raise ValueError(
            f"{type(module).__name__}({module.num_groups}, {module.num_channels}): the input has "
            f"{input.shape[1]} channels (shape {tuple(input.shape)}) where the module expects "
            f"{module.num_channels}")
