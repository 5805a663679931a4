"""nn.Modules over the functional API."""
from __future__ import annotations

import torch
from torch import nn

from . import functional
from .activations import parse_activation
from .proxy import proxy_stats


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
    """``act(GroupNorm(x))`` fused (Proxy Normalization off), e.g. GroupNorm + SiLU.

    ``affine`` and ``bias`` mean what they mean for nn.GroupNorm, whose state_dict this module
    loads (with ``activation="identity"`` it computes nn.GroupNorm)."""

    def __init__(self, num_groups, num_channels, activation="relu", eps=1e-5, affine=True,
                 backend=None, device=None, dtype=None, *, bias=True):
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"num_channels={num_channels} is not divisible by num_groups={num_groups}")
        parse_activation(activation)
        self.num_groups, self.num_channels = num_groups, num_channels
        self.activation, self.eps, self.backend = activation, eps, backend
        factory = dict(device=device, dtype=dtype)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, **factory))
        else:
            self.register_parameter("weight", None)
        if affine and bias:
            self.bias = nn.Parameter(torch.zeros(num_channels, **factory))
        else:
            self.register_parameter("bias", None)

    def forward(self, input):
        _check_channels(self, input)
        return functional.group_norm_act(input, self.num_groups, self.weight, self.bias,
                                         activation=self.activation, eps=self.eps,
                                         backend=self.backend)

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, activation={self.activation!r}, "
                f"eps={self.eps}, affine={self.weight is not None}"
                + ("" if self.weight is None or self.bias is not None else ", bias=False"))


def _check_channels(module, input):
    """The module's view of a channel mismatch (the functional API would blame the weight)."""
    if isinstance(input, torch.Tensor) and input.dim() >= 2 and input.shape[1] != module.num_channels:
        raise ValueError(
            f"{type(module).__name__}({module.num_groups}, {module.num_channels}): the input has "
            f"{input.shape[1]} channels (shape {tuple(input.shape)}) where the module expects "
            f"{module.num_channels}")


def group_count(num_channels: int, num_groups: int) -> int:
    """The largest group count <= ``num_groups`` that divides ``num_channels``."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    return next(g for g in range(min(num_groups, num_channels), 0, -1) if num_channels % g == 0)


class BatchNormProxyAct(nn.Module):
    """BatchNorm without affine -> weight/bias -> activation -> Proxy Normalization ("BN+PN").

    The proxy statistics only depend on the parameters (docs/pn-math.md, steps 4-6), so PN applies to
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
