#!/usr/bin/env python3
"""How far each backend's output and gradients are from fp64 on long groups, against what
PyTorch's own GroupNorm errs on the same input.

    python tools/long_group_accuracy.py [--shape 1x8x256x256x72] [--groups 2]
        [--data uniform offset heavy_tailed] [--dtypes float32 bfloat16]
        [--backends cpu triton:looped triton:split] [--layouts nchw channels_last] [--out FILE.md]

PyTorch's test_GroupNorm_numeric input is the default: (1, 8, 256, 256, 72) in 2 groups, 18.9M
elements a group. For each data kind (uniform [0, 1), offset 1e4 + randn, heavy-tailed Student-t
with 2 degrees of freedom), dtype and layout: the max error against fp64 F.group_norm (identity
activation, PN off, random weight and bias) of y, dx, dweight, dbias for F.group_norm in that dtype
on the contiguous input (its most accurate kernel), F.group_norm on the input in that layout, and
each fusednorm backend ("triton:looped" forces a Triton path; on CPU tensors Triton needs
TRITON_INTERPRET=1). Ratios are fusednorm's error over contiguous F.group_norm's.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fusednorm  # noqa: E402
from fusednorm.info import cpu_model, info  # noqa: E402

GRADIENTS = ("y", "dx", "dweight", "dbias")


def data(kind: str, shape, gen) -> torch.Tensor:
    if kind == "uniform":
        return torch.rand(shape, generator=gen, dtype=torch.float64)
    if kind == "offset":
        return 1e4 + torch.randn(shape, generator=gen, dtype=torch.float64)
    z = torch.randn(shape, generator=gen, dtype=torch.float64)  # Student-t, 2 degrees of freedom
    chi2 = torch.randn((2, *shape), generator=gen, dtype=torch.float64).square().sum(0)
    return z / (chi2 / 2).sqrt()


def forward_backward(fn, x, weight, bias, grad):
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    y = fn(x, weight, bias)
    return [y.detach(), *torch.autograd.grad(y, (x, weight, bias), grad)]


def max_errors(results, exact):
    return [(r.double() - e).abs().max().item() for r, e in zip(results, exact)]


def to_layout(x, channels_last):
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else x.contiguous()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1x8x256x256x72")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--data", nargs="+", default=["uniform", "offset", "heavy_tailed"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--backends", nargs="+", default=["cpu"])
    parser.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split("x"))
    groups, channels = args.groups, shape[1]

    def native(x, weight, bias):
        return F.group_norm(x, groups, weight, bias)

    lines = [f"Max error against fp64 F.group_norm, input {shape}, {groups} groups "
             f"({torch.Size(shape).numel() // (shape[0] * groups):,} elements a group), identity "
             f"activation, PN off; host {cpu_model()}, "
             f"torch {torch.__version__}, fusednorm CPU kernels "
             f"{info().get('CPU instruction set (C++ kernels)', '-')}. "
             f"Ratio: fusednorm's error / F.group_norm's on the contiguous input.", "",
             "| data | dtype | layout | who | " + " | ".join(GRADIENTS) + " |",
             "|---|---|---|---|" + "---|" * len(GRADIENTS)]
    for kind in args.data:
        gen = torch.Generator().manual_seed(0)
        x64 = data(kind, shape, gen)
        weight64 = 1 + 0.3 * torch.randn(channels, generator=gen, dtype=torch.float64)
        bias64 = 0.3 * torch.randn(channels, generator=gen, dtype=torch.float64)
        grad64 = torch.randn(shape, generator=gen, dtype=torch.float64)
        exact = forward_backward(native, x64, weight64, bias64, grad64)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            inputs = [t.to(dtype) for t in (x64, weight64, bias64, grad64)]
            torch_errors = max_errors(forward_backward(native, *inputs), exact)
            lines.append(f"| {kind} | {dtype_name} | nchw | F.group_norm | "
                         + " | ".join(f"{e:.2e}" for e in torch_errors) + " |")
            for layout in args.layouts:
                channels_last = layout == "channels_last"
                x, grad = (to_layout(t, channels_last) for t in (inputs[0], inputs[3]))
                if channels_last:
                    errors = max_errors(forward_backward(native, x, inputs[1], inputs[2], grad),
                                        exact)
                    lines.append(f"| {kind} | {dtype_name} | {layout} | F.group_norm | "
                                 + " | ".join(f"{e:.2e}" for e in errors) + " |")
                for spec in args.backends:
                    backend, _, path = spec.partition(":")
                    if path:
                        os.environ["FUSEDNORM_TRITON_PATH"] = path
                    errors = max_errors(forward_backward(
                        lambda x, w, b: fusednorm.group_norm_act(
                            x, groups, w, b, activation="identity", backend=backend),
                        x, inputs[1], inputs[2], grad), exact)
                    os.environ.pop("FUSEDNORM_TRITON_PATH", None)
                    cells = [f"{e:.2e} ({e / max(t, 1e-300):.2f}x)"
                             for e, t in zip(errors, torch_errors)]
                    lines.append(f"| {kind} | {dtype_name} | {layout} | fusednorm {spec} | "
                                 + " | ".join(cells) + " |")
                    print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
