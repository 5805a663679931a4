"""Pre-activation ResNets (He et al., "Identity Mappings in Deep Residual Networks", 2016) with a
choice of normalization: every block computes norm -> activation -> conv."""
from __future__ import annotations

from torch import nn

from .norms import norm_act

CIFAR_DEPTHS = (20, 32, 56)
IMAGENET_DEPTHS = {50: (3, 4, 6, 3)}


def _conv(in_channels, out_channels, kernel_size, stride=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)


class PreActBlock(nn.Module):
    """Basic block: (norm-act, conv3x3) x 2. A projection shortcut, when the shape changes, takes
    the pre-activated input, as in the pre-activation paper."""

    def __init__(self, in_channels, channels, stride, make_norm):
        super().__init__()
        self.norm1 = make_norm(in_channels)
        self.conv1 = _conv(in_channels, channels, 3, stride)
        self.norm2 = make_norm(channels)
        self.conv2 = _conv(channels, channels, 3)
        self.shortcut = (_conv(in_channels, channels, 1, stride)
                         if stride != 1 or in_channels != channels else None)

    def forward(self, x):
        out = self.norm1(x)
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.norm2(out))
        return out + residual


class PreActBottleneck(nn.Module):
    """Bottleneck block: norm-act-conv1x1, norm-act-conv3x3 (strided), norm-act-conv1x1 (x4)."""
    expansion = 4

    def __init__(self, in_channels, channels, stride, make_norm):
        super().__init__()
        out_channels = channels * self.expansion
        self.norm1 = make_norm(in_channels)
        self.conv1 = _conv(in_channels, channels, 1)
        self.norm2 = make_norm(channels)
        self.conv2 = _conv(channels, channels, 3, stride)
        self.norm3 = make_norm(channels)
        self.conv3 = _conv(channels, out_channels, 1)
        self.shortcut = (_conv(in_channels, out_channels, 1, stride)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x):
        out = self.norm1(x)
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.norm2(out))
        out = self.conv3(self.norm3(out))
        return out + residual


class ResNetV2(nn.Module):
    """Stem -> stages of pre-activation blocks -> final norm-act -> global average pool -> linear."""

    def __init__(self, block, blocks_per_stage, widths, num_classes, make_norm, in_channels,
                 imagenet_stem):
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(_conv(in_channels, widths[0], 7, 2),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = _conv(in_channels, widths[0], 3)
        stages, channels = [], widths[0]
        for i, (count, width) in enumerate(zip(blocks_per_stage, widths)):
            blocks = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(channels, width, stride, make_norm))
                channels = width * getattr(block, "expansion", 1)
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_norm = make_norm(channels)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.final_norm(self.stages(self.stem(x))))


def resnet_v2(depth: int, num_classes: int = 10, norm: str = "gn+pn", num_groups: int = 8,
              width: int | None = None, activation="relu", in_channels: int = 3) -> ResNetV2:
    """A pre-activation ResNet.

    ``depth`` 20, 32 or 56: the CIFAR network, 3 stages of (depth - 2) / 6 basic blocks of widths
    ``width``, 2x, 4x (default 16) and a 3x3 stem. ``depth`` 50: the ImageNet network, bottleneck
    blocks (3, 4, 6, 3) of widths ``width`` .. 8x (default 64), a 7x7 stride-2 stem and max-pool.
    ``norm``: "bn", "gn", "ln" (GroupNorm with 1 group), "in", "gn+pn", "ln+pn", "in+pn" (fused
    :class:`fusednorm.GroupNormProxyAct`) or "bn+pn" (:class:`BatchNormProxyAct`). A layer whose
    channel count is not divisible by ``num_groups`` uses the largest group count that divides it.
    ``activation`` is a name of :mod:`fusednorm.activations`.
    """
    if depth in CIFAR_DEPTHS:
        block, stages, imagenet = PreActBlock, ((depth - 2) // 6,) * 3, False
        width = 16 if width is None else width
        widths = (width, 2 * width, 4 * width)
    elif depth in IMAGENET_DEPTHS:
        block, stages, imagenet = PreActBottleneck, IMAGENET_DEPTHS[depth], True
        width = 64 if width is None else width
        widths = (width, 2 * width, 4 * width, 8 * width)
    else:
        raise ValueError(f"unsupported depth {depth}; expected one of "
                         f"{CIFAR_DEPTHS + tuple(IMAGENET_DEPTHS)}")
    return ResNetV2(block, stages, widths, num_classes,
                    lambda channels: norm_act(norm, channels, num_groups, activation),
                    in_channels, imagenet)
