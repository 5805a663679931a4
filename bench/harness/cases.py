"""Cases of the GN+PN benchmark: shape sets, dtypes, layouts, modes, and the inputs of one case."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch



REPO_ROOT = Path(__file__).resolve().parents[2]  # bench/harness/cases.py -> the repository
# Committed runs, the ones the docs quote; a run writes there only when asked (--output-dir).
RESULTS_DIR = REPO_ROOT / "bench" / "results"
# Where runs write by default: ignored by git.
OUTPUT_DIR = REPO_ROOT / "bench" / "out"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")
MODES = ("fwd", "bwd", "fwd+bwd")
# Minimum bytes a mode must move, in units of T = bytes of x (docs/pn-math.md, "Bytes moved").
ROOFLINE_FACTOR = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}

RESNET50_STAGES = ((256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))
EFFICIENTNET_B0 = ((32, 112, 112), (144, 56, 56), (240, 28, 28), (672, 14, 14), (1152, 7, 7))
SHAPE_SETS = ("resnet", "efficientnet", "diffusion", "layernorm")

# Torch.compile of the reference traces through proxy.py's lru_cache'd constants; the warning


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    shape_set: str
    shape: tuple
    groups: int
    activation: str
    proxy: bool  # Proxy Normalization on (group_norm_proxy_act) or off (group_norm_act)

    @property
    def shape_text(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def op_text(self) -> str:
        return f"G={self.groups} {self.activation}{'+PN' if self.proxy else ''}"


def make_cases(shape_sets, batch: int, max_shapes_per_set: Optional[int]) -> list[Case]:
    """``batch`` is the ResNet/EfficientNet batch; the diffusion and LayerNorm shapes fix theirs."""
    by_set = {
        "resnet": [Case("resnet", (batch, *chw), 8, "relu", True) for chw in RESNET50_STAGES],
        # G=8 where C allows it (all B0 widths here do), else the largest divisor of 8 that fits.
        "efficientnet": [Case("efficientnet", (batch, *chw), math.gcd(chw[0], 8), "silu", True)
                         for chw in EFFICIENTNET_B0],
        "diffusion": [Case("diffusion", (1, 320, 64, 64), 32, "silu", False),
                      Case("diffusion", (2, 640, 32, 32), 32, "silu", False)],
        "layernorm": [Case("layernorm", (8, *chw), 1, "relu", True) for chw in RESNET50_STAGES],
    }
    return [case for name in shape_sets for case in by_set[name][:max_shapes_per_set]]


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Channels-last for any rank: (N, C, *spatial) stored as (N, *spatial, C)."""
    if layout == "channels_last" and x.dim() > 2:
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x.contiguous()


@dataclass
class Inputs:
    x: torch.Tensor
    gn_params: list  # weight, bias (+ proxy_bias, proxy_weight with PN), leaves requiring grad


def make_inputs(case: Case, dtype: torch.dtype, layout: str, device: torch.device) -> Inputs:
    gen = torch.Generator().manual_seed(0)
    x = to_layout(torch.randn(case.shape, generator=gen), layout)
    channels = case.shape[1]

    def param(loc, scale):
        value = loc + scale * torch.randn(channels, generator=gen)
        return value.to(device, dtype).requires_grad_()

    gn_params = [param(1.0, 0.1), param(0.0, 0.1)]
    if case.proxy:
        gn_params += [param(0.0, 0.1), param(0.0, 0.1)]
    return Inputs(x.to(device, dtype).requires_grad_(), gn_params)


# ----------------------------------------------------------------------------------------------
