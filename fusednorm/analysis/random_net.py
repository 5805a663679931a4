"""The paper's random-network experiment: power decomposition against depth, per normalization."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.norms import norm_act
from .power import record_power

PAPER_NORMS = ("bn", "ln", "in", "gn", "ln+pn", "gn+pn")


def random_net(norm: str, depth: int = 50, width: int = 128, in_channels: int = 3,
               num_groups: int = 8, activation="relu", gamma_std: float = 0.2,
               beta_std: float = 0.2, padding_mode: str = "circular", seed: int = 0) -> nn.Sequential:
    """A plain (no skip connections) convolutional net at random initialization:
    conv3x3 -> [norm-act -> conv3x3] x ``depth``, He-initialized convolutions, and every norm's
    gamma ~ N(1, gamma_std^2), beta ~ N(0, beta_std^2). The convolutions depend only on ``seed``,
    so nets of different norms share them. Circular padding by default: zero padding makes border
    positions differ from the rest, spatial variance that no normalization causes or removes."""
    gen = torch.Generator().manual_seed(seed)

    def conv(in_channels):
        return nn.Conv2d(in_channels, width, 3, padding=1, bias=False, padding_mode=padding_mode)

    layers = [conv(in_channels)]
    for _ in range(depth):
        layers += [norm_act(norm, width, num_groups, activation), conv(width)]
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
        affine_gen = torch.Generator().manual_seed(seed + 1)
        for module in net.modules():
            if getattr(module, "weight", None) is not None and not isinstance(module, nn.Conv2d):
                module.weight.normal_(1.0, gamma_std, generator=affine_gen)
                module.bias.normal_(0.0, beta_std, generator=affine_gen)
    return net


def random_inputs(batch: int = 32, in_channels: int = 3, size: int = 16, seed: int = 0):
    """Fixed-seed random images (batch, in_channels, size, size) that differ from one another the
    way natural images do: smooth structure plus fine noise, with a random contrast per image and
    a random offset per image and channel. (White noise makes all instances statistically alike:
    the instance-variability terms would be ~0 whatever the norm.)"""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, in_channels, max(size // 4, 1), max(size // 4, 1), generator=gen)
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.5 * torch.randn(batch, in_channels, size, size, generator=gen)
    contrast = torch.exp(0.5 * torch.randn(batch, 1, 1, 1, generator=gen))
    return x * contrast + torch.randn(batch, in_channels, 1, 1, generator=gen)


def natural_inputs(batch: int = 32, size: int = 16, crop: int = 64, seed: int = 0):
    """``batch`` natural images (batch, 3, size, size): random ``crop`` x ``crop`` crops of the two
    photos scikit-learn ships (``load_sample_images``: a temple in China, a flower), averaged down
    to ``size``, standardized per RGB channel over both photos (as datasets are). A finite set of
    natural images, as in the paper's experiment; needs scikit-learn."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as error:
        raise ImportError("natural_inputs needs scikit-learn (pip install scikit-learn); "
                          "random_inputs needs nothing") from error
    photos = [torch.tensor(image).permute(2, 0, 1).double() / 255
              for image in load_sample_images().images]
    pixels = torch.cat([p.reshape(3, -1) for p in photos], dim=1)
    mean, std = pixels.mean(1).view(3, 1, 1), pixels.std(1).view(3, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(batch):
        photo = photos[i % len(photos)]
        top = int(torch.randint(0, photo.shape[1] - crop + 1, (1,), generator=gen))
        left = int(torch.randint(0, photo.shape[2] - crop + 1, (1,), generator=gen))
        crops.append((photo[:, top:top + crop, left:left + crop] - mean) / std)
    x = torch.stack(crops)
    return F.adaptive_avg_pool2d(x, size).float() if size != crop else x.float()


def power_profile(norm: str, inputs: torch.Tensor, **net_kwargs) -> torch.Tensor:
    """(depth, 4): the normalized power terms of each normalization layer's output, in depth order,
    for :func:`random_net` (batch statistics for BN) applied to ``inputs``."""
    net = random_net(norm, in_channels=inputs.shape[1], **net_kwargs).train()
    with torch.no_grad(), record_power(net) as records:
        net(inputs)
    return torch.stack([decomposition.terms for _, decomposition in records])


def resnet_power_profile(norm: str, inputs: torch.Tensor, depth: int = 50, seed: int = 0,
                         **net_kwargs) -> torch.Tensor:
    """(layers, 4): the normalized power terms of every normalization layer of the project's
    pre-activation ResNet (:func:`fusednorm.models.resnet_v2`) at initialization (PyTorch's
    default initialization, gamma = 1, beta = 0), in call order, for ``inputs`` (batch
    statistics for BN): the paper's Fig. 6 for ``depth=50``."""
    from ..models import resnet_v2
    torch.manual_seed(seed)
    net = resnet_v2(depth, norm=norm, **net_kwargs).train()
    with torch.no_grad(), record_power(net) as records:
        net(inputs)
    return torch.stack([decomposition.terms for _, decomposition in records])
