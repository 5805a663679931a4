"""Quick check of the C++ CPU kernel's speed floor and backward memory (issue 3).

Forward + backward of GroupNorm + ReLU + Proxy Normalization, fp32, (8, 256, 56, 56), G = 8,
proxy parameters present, timed for: the CPU kernel, the eager reference, and torch.compile of
the eager reference. The floor: CPU kernel >= 4x faster than eager and >= 2x faster than
compiled. Also reports the bytes autograd saves for the backward, relative to the input.

    python bench/cpu_speed_check.py [--channels-last] [--repeats 20] [--threads 2]

The providers' calls are interleaved and the minimum is reported (the median too): on a shared
machine the minimum is the least disturbed measurement.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import fusednorm
from fusednorm import ops, reference

SHAPE, GROUPS = (8, 256, 56, 56), 8


def make_inputs(channels_last: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    channels = SHAPE[1]
    params = [1 + 0.1 * torch.randn(channels, generator=gen),
              0.1 * torch.randn(channels, generator=gen), torch.zeros(channels),
              torch.zeros(channels)]
    grad = torch.randn(SHAPE, generator=gen)
    if channels_last:
        grad = grad.to(memory_format=torch.channels_last)
    return x.requires_grad_(), [p.requires_grad_() for p in params], grad


def eager(x, *params):
    return reference.group_norm_proxy_act(x, GROUPS, *params, activation="relu")


def cpu_kernel(x, *params):
    return fusednorm.group_norm_proxy_act(x, GROUPS, *params, activation="relu", backend="cpu")


def step(fn, x, params, grad):
    start = time.perf_counter()
    out = fn(x, *params)
    torch.autograd.grad(out, [x, *params], grad)
    return time.perf_counter() - start


def saved_bytes(fn, x, params):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(x, *params)
    unique = {(t.untyped_storage().data_ptr(), t.numel(), t.dtype): t for t in saved}
    return sum(t.numel() * t.element_size() for t in unique.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not ops.extension_has_kernel("cpu"):
        raise SystemExit("the C++ extension is not built: pip install --no-build-isolation -e .")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    x, params, grad = make_inputs(args.channels_last)
    providers = {"cpu kernel": cpu_kernel, "eager reference": eager,
                 "torch.compile(reference)": torch.compile(eager)}
    times = {name: [] for name in providers}
    for fn in providers.values():
        for _ in range(3):
            step(fn, x, params, grad)
    for _ in range(args.repeats):
        for name, fn in providers.items():
            times[name].append(step(fn, x, params, grad))

    layout = "channels_last" if args.channels_last else "contiguous"
    print(f"shape {SHAPE}, G={GROUPS}, fp32, {layout}, ReLU, PN on, forward+backward, "
          f"{torch.get_num_threads()} threads, CPU kernel ISA {fusednorm._C.cpu_capability()}")
    best = {name: min(ts) * 1e3 for name, ts in times.items()}
    for name, ts in times.items():
        median = sorted(ts)[len(ts) // 2] * 1e3
        print(f"  {name:26s} min {best[name]:8.2f} ms   median {median:8.2f} ms")
    kernel = best["cpu kernel"]
    print(f"  speedup vs eager reference   {best['eager reference'] / kernel:5.1f}x (floor 4x)")
    print(f"  speedup vs torch.compile     {best['torch.compile(reference)'] / kernel:5.1f}x "
          f"(floor 2x)")
    input_bytes = x.numel() * x.element_size()
    for name in ("cpu kernel", "eager reference"):
        ratio = saved_bytes(providers[name], x, params) / input_bytes
        print(f"  saved for backward, {name:16s} {ratio:5.2f}x the input's bytes")


if __name__ == "__main__":
    main()
