#!/usr/bin/env python3
"""Launches and bytes moved per call of the Triton kernels, read from their launch plans.

    python tools/launch_table.py [--sm-count 132] [--out bench/results/triton-launch-plan.md]

The launchers build a Plan (kernels/group_norm_proxy_act.py: forward_plan, backward_plan) before
launching anything; this tool builds the plans of representative shapes on meta tensors, as for
a GPU with the given SM count (H100: 132), and sums what each step declares: x-sized tensors
moved in memory (units of T = bytes of x), x-sized tensors re-read from L2, and the small
(N, C)/(N, G)/(C,) traffic. Nothing is launched; no GPU is needed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fusednorm.activations import RELU
from fusednorm.layout import accumulation_dtype
from fusednorm.kernels import group_norm_proxy_act as kernels

# (name, shape, groups): the ResNet-50 stages at batch 32 with G=32, 8 and 1, diffusion
# GroupNorm shapes, and small groups.
SHAPES = [
    *((f"resnet50 {s[0]}x{s[1]}x{s[2]} G={g}", (32, *s), g)
      for s in ((256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)) for g in (32, 8, 1)),
    ("diffusion 320x64x64 G=32", (2, 320, 64, 64), 32),
    ("diffusion 1280x8x8 G=32", (8, 1280, 8, 8), 32),
    ("small groups 512x8x8 G=32", (16, 512, 8, 8), 32),
    ("layernorm (256, 1024) G=1", (256, 1024), 1),
    ("batch 1 256x56x56 G=1", (1, 256, 56, 56), 1),
]


def plans(shape, groups, dtype=torch.bfloat16, proxy=True, channels_last=False):
    """(forward plan, backward plan) of one call, on meta tensors."""
    meta = dict(device="meta")
    x = torch.empty(shape, dtype=dtype, **meta)
    if channels_last and x.dim() > 2:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    channels = shape[1]
    weight = torch.empty(channels, dtype=torch.float32, **meta)
    samples = torch.empty(200, dtype=accumulation_dtype(dtype), **meta)
    args = (weight, weight, weight, weight, samples, groups, RELU, 0.01)
    forward = kernels.forward_plan(x, *args, 1e-5, 0.03, proxy)
    _, mean, rstd = forward.outputs
    backward = kernels.backward_plan(x, x, *args[:5], mean, rstd, groups, RELU, 0.01, 0.03, proxy)
    return forward, backward


def totals(plan, x_bytes):
    """(launches, x passes in memory, x passes from L2, small traffic in units of T)."""
    def passes(values):  # whole passes when chunks add up to one
        total = round(sum(values), 6)
        return int(total) if total == int(total) else total

    return (len(plan.steps), passes(s.x_passes for s in plan.steps),
            passes(s.l2_passes for s in plan.steps),
            sum(s.small_bytes for s in plan.steps) / x_bytes)


def table(sm_count: int, dtype=torch.bfloat16) -> str:
    lines = [f"| shape | path | fwd launches | fwd memory | fwd L2 | bwd launches | bwd memory | "
             f"bwd L2 | kernels (fwd; bwd) |", "|" + "---|" * 9]
    with kernels.plan_as_gpu(sm_count):
        for name, shape, groups in SHAPES:
            forward, backward = plans(shape, groups, dtype)
            x_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            f, b = totals(forward, x_bytes), totals(backward, x_bytes)
            kernel_names = (", ".join(s.name for s in forward.steps) + "; "
                            + ", ".join(s.name for s in backward.steps))
            lines.append(f"| {name} | {forward.path} | {f[0]} | {f[1]}T + {f[3]:.3f}T | {f[2]}T | "
                         f"{b[0]} | {b[1]}T + {b[3]:.3f}T | {b[2]}T | {kernel_names} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sm-count", type=int, default=132, help="SMs of the GPU planned for")
    parser.add_argument("--out", type=Path, help="also write the table there (markdown)")
    args = parser.parse_args(argv)
    text = (f"# Launches and bytes per call of the Triton kernels (bf16, GN+ReLU+PN, planned for "
            f"{args.sm_count} SMs)\n\nMade by `python tools/launch_table.py` from the launch plans "
            f"(nothing launched). 'memory': x-sized tensors read or written (x, y, grad, dx; "
            f"T = bytes of x) + the small statistics, partial sums and parameters in units of T; "
            f"'L2': x-sized tensors read a second time by the same program right after the first "
            f"(looped path). Roofline: forward 2T, backward 3T.\n\n{table(args.sm_count)}\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
