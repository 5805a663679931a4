#!/usr/bin/env python3
"""Where the C++ CPU kernels spend their time: per-phase times of forward + backward on the
ResNet-50 stage shapes, against native GroupNorm + ReLU and BatchNorm + ReLU (train).

    python tools/cpu_phases.py [--batch 8] [--groups 8 1] [--dtype fp32|bf16] [--sizes 56 7]
                               [--repeats 20] [--out FILE.md]

The kernels mark their phases for torch.profiler (``parallel_phase`` in csrc/cpu/vec_utils.h,
RECORD_FUNCTION in csrc/cpu/fusednorm_cpu.cpp): statistics, apply, partials, dx, the proxy
statistics and the parameter finish. Each phase's time is its profiler total divided by the
repeats; "other" is the rest of the profiled calls' wall time (Python, autograd, dispatch,
allocation, the serial merges between phases). Op totals are medians of
interleaved perf_counter repeats (fusednorm, native GN+ReLU, BN+ReLU taking turns), with the
fraction of the copy bandwidth the 5T roofline of docs/pn-math.md asks for. Freed memory stays in
the process, as in the benchmark (bench/harness/timing.py: keep_freed_cpu_memory).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

# As the benchmark (bench/group_norm_proxy_act.py): tensors of 2 MB and more on huge pages, set
# before torch's first allocation.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fusednorm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from harness.timing import Timer, copy_bandwidth_gbps, keep_freed_cpu_memory  # noqa: E402

STAGES = ((256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))
PHASE_PREFIX = "fusednorm_cpu::"


def fwd_bwd(forward, x, params, grad):
    y = forward(x)
    return torch.autograd.grad(y, [x, *params], grad)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def providers(groups, channels, dtype):
    weight = torch.ones(channels, dtype=dtype, requires_grad=True)
    bias = torch.zeros(channels, dtype=dtype, requires_grad=True)
    batch_norm = torch.nn.BatchNorm2d(channels, dtype=dtype).train()
    return {
        "fusednorm-cpu": (lambda x: fusednorm.group_norm_proxy_act(x, groups, weight, bias,
                                                                   backend="cpu"),
                          [weight, bias]),
        "native GN+ReLU": (lambda x: F.relu(F.group_norm(x, groups, weight, bias)),
                           [weight, bias]),
        "BN+ReLU": (lambda x: F.relu(batch_norm(x)), list(batch_norm.parameters())),
    }


def measure(shape, layout, groups, dtype, repeats, warmup=3):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    if layout == "channels_last":
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    x.requires_grad_()
    ops = providers(groups, shape[1], dtype)
    for forward, params in ops.values():
        for _ in range(warmup):
            fwd_bwd(forward, x, params, grad)
    times = defaultdict(list)
    for _ in range(repeats):  # interleaved: every provider once per round
        for name, (forward, params) in ops.items():
            start = time.perf_counter()
            fwd_bwd(forward, x, params, grad)
            times[name].append((time.perf_counter() - start) * 1e3)
    forward, params = ops["fusednorm-cpu"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            fwd_bwd(forward, x, params, grad)
        profiled_ms = (time.perf_counter() - start) * 1e3 / repeats
    phases = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith(PHASE_PREFIX):
            phases[event.key[len(PHASE_PREFIX):]] += event.cpu_time_total / 1e3 / repeats
    # What the phases leave of the profiled calls' own wall time.
    phases["other"] = profiled_ms - sum(phases.values())
    return {name: statistics.median(t) for name, t in times.items()}, dict(phases)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--groups", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--sizes", type=int, nargs="+", default=[h for _, h, _ in STAGES],
                        help="spatial sizes of the stages to run (56 28 14 7)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    allocator = keep_freed_cpu_memory()
    device = torch.device("cpu")
    bandwidth = copy_bandwidth_gbps(device, Timer(device), warmup=3, repeats=args.repeats)
    dtype = DTYPES[args.dtype]
    lines = [f"CPU phases, {args.dtype} forward+backward, GN+PN (ReLU), batch {args.batch}, "
             f"{torch.get_num_threads()} threads, fusednorm {fusednorm._C.cpu_capability()} "
             f"kernels; {allocator or 'default allocator'}; copy bandwidth {bandwidth:.1f} GB/s; ms per call (phases: profiler "
             f"totals / repeats; totals: medians of {args.repeats} interleaved repeats)", "",
             "| shape | layout | G | fusednorm | native GN+ReLU | BN+ReLU | 5T / copy BW | "
             "phases (ms) |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for channels, height, width in STAGES:
        if height not in args.sizes:
            continue
        shape = (args.batch, channels, height, width)
        for layout in args.layouts:
            for groups in args.groups:
                totals, phases = measure(shape, layout, groups, dtype, args.repeats)
                ours = totals["fusednorm-cpu"]
                t_bytes = torch.Size(shape).numel() * dtype.itemsize
                fraction = 5 * t_bytes / (ours * 1e-3) / 1e9 / bandwidth
                phase_text = ", ".join(f"{name} {ms:.2f}" for name, ms in
                                       sorted(phases.items(), key=lambda kv: -kv[1]))
                line = (f"| {'x'.join(map(str, shape))} | {layout} | {groups} | {ours:.2f} | "
                        f"{totals['native GN+ReLU']:.2f} | {totals['BN+ReLU']:.2f} | "
                        f"{fraction:.0%} | {phase_text} |")
                lines.append(line)
                print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
