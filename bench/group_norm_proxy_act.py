"""Benchmark fused GroupNorm + affine + activation + Proxy Normalization against its baselines.

    python bench/group_norm_proxy_act.py            # everything this machine can run
    python bench/group_norm_proxy_act.py --quick    # a CPU run of a few minutes

Providers: every fusednorm backend that can run here (triton and cuda on CUDA tensors, cpu on CPU
tensors), the eager reference GN+PN and its torch.compile, native F.group_norm + activation
(eager and compiled), and training-mode BatchNorm + activation (eager and compiled). A provider
that cannot run is listed with the reason and left out.

Timing: CUDA events (on CUDA) or time.perf_counter (on CPU) around each repeat, with the caches
flushed before it as triton.testing.do_bench does, after warm-up calls (the first of which
compiles); reported as the median with p20/p80. On CPU, freed memory stays in the process (see
keep_freed_cpu_memory) so that timings do not depend on which page faults glibc happens to take.
"fwd" is a training forward (inputs require grad), "bwd" times autograd on a graph built once
outside the timing, "fwd+bwd" both. Effective bandwidth is against the roofline bytes of
pn-math.md (2T forward, 3T backward, 5T both; T = bytes of x), also as a fraction of the measured
copy bandwidth. "saved/T" is the bytes of the unique storages the forward saves for backward / T.

Writes a table to stdout and <device>[-quick]-<date>.csv/.json/.png under bench/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fusednorm
from fusednorm import ops, reference
from fusednorm.kernels.group_norm_proxy_act import PATH_ENV as TRITON_PATH_ENV
from fusednorm.kernels.group_norm_proxy_act import PATHS as TRITON_PATHS

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")
MODES = ("fwd", "bwd", "fwd+bwd")
# Minimum bytes a mode must move, in units of T = bytes of x (pn-math.md, "Bytes moved").
ROOFLINE_FACTOR = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}
ACTIVATION_FNS = {"relu": F.relu, "silu": F.silu}

RESNET50_STAGES = ((256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))
EFFICIENTNET_B0 = ((32, 112, 112), (144, 56, 56), (240, 28, 28), (672, 14, 14), (1152, 7, 7))
SHAPE_SETS = ("resnet", "efficientnet", "diffusion", "layernorm")

# Torch.compile of the reference traces through proxy.py's lru_cache'd constants; the warning
# about it would be repeated for every compiled case.
warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")


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
# Providers
# ----------------------------------------------------------------------------------------------
Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Provider:
    name: str
    # build(case, inputs) -> (forward, parameters whose gradients the backward computes)
    build: Callable[[Case, Inputs], tuple[Forward, list]]
    # unavailable(device) -> why this provider cannot run on this device, or None
    unavailable: Callable[[torch.device], Optional[str]]
    fused: bool = False  # a fusednorm backend: its speedup over every baseline is reported
    env: tuple = ()  # (name, value) environment settings while this provider runs


def fused_builder(backend: str):
    def build(case, inputs):
        if case.proxy:
            return (lambda x: fusednorm.group_norm_proxy_act(
                x, case.groups, *inputs.gn_params, activation=case.activation, backend=backend),
                inputs.gn_params)
        return (lambda x: fusednorm.group_norm_act(
            x, case.groups, *inputs.gn_params, activation=case.activation, backend=backend),
            inputs.gn_params)
    return build


def build_reference(case, inputs):
    if case.proxy:
        return (lambda x: reference.group_norm_proxy_act(
            x, case.groups, *inputs.gn_params, activation=case.activation), inputs.gn_params)
    return (lambda x: reference.group_norm_act(
        x, case.groups, *inputs.gn_params, activation=case.activation), inputs.gn_params)


def build_native_group_norm(case, inputs):
    """F.group_norm + activation: the same op with PN off, the cost of GN without PN with PN on."""
    weight, bias = inputs.gn_params[:2]
    act = ACTIVATION_FNS[case.activation]
    return (lambda x: act(F.group_norm(x, case.groups, weight, bias)), [weight, bias])


def build_batch_norm(case, inputs):
    """Training-mode BatchNorm{1,2,3}d + activation. Its parameters stay fp32 for bf16 inputs,
    as under autocast: that mixed configuration is the one cuDNN batch norm runs."""
    batch_norm_class = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(case.shape)]
    batch_norm = batch_norm_class(case.shape[1], device=inputs.x.device).train()
    act = ACTIVATION_FNS[case.activation]
    return (lambda x: act(batch_norm(x)), list(batch_norm.parameters()))


def compiled(build):
    def build_compiled(case, inputs):
        forward, params = build(case, inputs)
        # Static shapes: each case is compiled on its own (the dynamo cache is reset per case).
        return torch.compile(forward, dynamic=False), params
    return build_compiled


def needs_device(device_type: str):
    def unavailable(device):
        return None if device.type == device_type else f"runs on {device_type} tensors only"
    return unavailable


def triton_unavailable(device):
    if not ops.triton_available():
        return f"triton is not importable: {ops.TRITON_IMPORT_ERROR}"
    # The interpreter (the only way the Triton kernels run on CPU) is far too slow to mean anything.
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: the Triton interpreter is not benchmarked"
    return needs_device("cuda")(device)


def extension_unavailable(device_type: str):
    def unavailable(device):
        if ops.EXTENSION_IMPORT_ERROR is not None:
            return (f"the C++ extension fusednorm._C is not built; build it with "
                    f"`pip install --no-build-isolation -e .`")
        if not ops.extension_has_kernel(device_type):
            return f"the C++ extension is built without a {device_type} kernel"
        return needs_device(device_type)(device)
    return unavailable


def always_available(device):
    return None


PROVIDERS = {p.name: p for p in (
    Provider("fusednorm-triton", fused_builder("triton"), triton_unavailable, fused=True),
    # Each path of the Triton kernels forced (kernels/group_norm_proxy_act.py, choose_path), so
    # that the rule "auto" follows can be checked against measurements.
    *(Provider(f"fusednorm-triton-{path}", fused_builder("triton"), triton_unavailable,
               fused=True, env=((TRITON_PATH_ENV, path),)) for path in TRITON_PATHS),
    Provider("fusednorm-cuda", fused_builder("cuda"), extension_unavailable("cuda"), fused=True),
    Provider("fusednorm-cpu", fused_builder("cpu"), extension_unavailable("cpu"), fused=True),
    Provider("reference", build_reference, always_available),
    Provider("reference-compiled", compiled(build_reference), always_available),
    Provider("native-gn", build_native_group_norm, always_available),
    Provider("native-gn-compiled", compiled(build_native_group_norm), always_available),
    Provider("batchnorm", build_batch_norm, always_available),
    Provider("batchnorm-compiled", compiled(build_batch_norm), always_available),
)}


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
class Timer:
    """Milliseconds of each of ``repeats`` calls, after ``warmup`` untimed ones. The caches are
    flushed before each repeat (as triton.testing.do_bench flushes the L2 on CUDA) so that no
    repeat reads what the previous one left there. CUDA: CUDA events; CPU: time.perf_counter."""

    def __init__(self, device):
        self.device = device
        # Larger than the last-level cache: an H100/H200 L2 is 50-60 MB, a server L3 32-256 MB.
        self.cache_flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def __call__(self, fn, warmup: int, repeats: int) -> list[float]:
        for _ in range(warmup):
            fn()
        if self.device.type == "cuda":
            return self._cuda_times(fn, repeats)
        times = []
        for _ in range(repeats):
            self.cache_flush.zero_()
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times

    def _cuda_times(self, fn, repeats):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        torch.cuda.synchronize()
        for start, end in zip(starts, ends):
            self.cache_flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def keep_freed_cpu_memory() -> Optional[str]:
    """Keep freed memory in glibc's heap: no mmap per large block, no trimming. Otherwise whether a
    repeat pays first-touch page faults for its outputs depends on glibc's heuristics, not on the
    provider, and CPU timings turn bimodal; this is the CPU analogue of PyTorch's caching
    allocator on CUDA. Returns the settings made, None where glibc is not there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    if libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1):
        return "glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2**31-1"
    return None


def copy_bandwidth_gbps(device, timer, warmup: int, repeats: int) -> float:
    """Device memory bandwidth as a copy sees it: 2 * bytes / time of dst.copy_(src)."""
    nbytes = (256 if device.type == "cuda" else 64) * 2**20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = float(np.median(timer(lambda: dst.copy_(src), warmup, repeats)))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def saved_bytes(forward: Forward, x: torch.Tensor) -> int:
    """Bytes of the unique storages that one forward saves for backward."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward(x)
    return sum(storages.values())


def peak_memory_bytes(fn) -> int:
    """Peak CUDA memory one call allocates above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def timed_call(mode: str, forward: Forward, x, params, grad_y):
    """The callable one repeat of ``mode`` runs. torch.autograd.grad, not .backward(), so no
    repeat pays for accumulating into .grad."""
    inputs = [x, *params]
    if mode == "fwd":
        return lambda: forward(x)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(x), inputs, grad_y)
    y = forward(x)  # backward only: the forward runs once, outside the timing
    return lambda: torch.autograd.grad(y, inputs, grad_y, retain_graph=True)


@dataclass
class Result:
    shape_set: str
    shape: str
    op: str
    dtype: str
    layout: str
    mode: str
    provider: str
    ms: float
    ms_p20: float
    ms_p80: float
    gbps: float  # roofline bytes / median time
    copy_fraction: float  # gbps / measured copy bandwidth
    saved_over_t: float
    peak_mb: Optional[float]  # CUDA only
    speedup_over: dict = field(default_factory=dict)  # fused providers: baseline -> its ms / ms

    def case_key(self):
        return (self.shape_set, self.shape, self.op, self.dtype, self.layout, self.mode)


@contextlib.contextmanager
def environment(settings):
    """os.environ with ``settings`` ((name, value) pairs) for the duration of the block."""
    saved = {name: os.environ.get(name) for name, _ in settings}
    os.environ.update(dict(settings))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def measure_provider(provider, case, inputs, dtype_name, layout, args, timer, copy_gbps):
    """The results of every mode of one provider on one case."""
    with environment(provider.env):
        return _measure_provider(provider, case, inputs, dtype_name, layout, args, timer,
                                 copy_gbps)


def _measure_provider(provider, case, inputs, dtype_name, layout, args, timer, copy_gbps):
    x = inputs.x
    t_bytes = x.numel() * x.element_size()
    grad_y = torch.randn_like(x)  # x's layout
    forward, params = provider.build(case, inputs)
    results = []
    for mode in args.modes:
        fn = timed_call(mode, forward, x, params, grad_y)
        times = timer(fn, args.warmup, args.repeats)
        peak = peak_memory_bytes(fn) / 2**20 if x.is_cuda else None
        del fn  # frees the graph the backward-only mode retains
        ms, p20, p80 = (float(t) for t in np.percentile(times, [50, 20, 80]))
        gbps = ROOFLINE_FACTOR[mode] * t_bytes / (ms * 1e-3) / 1e9
        results.append(Result(case.shape_set, case.shape_text, case.op_text, dtype_name, layout,
                              mode, provider.name, ms, p20, p80, gbps, gbps / copy_gbps,
                              float("nan"), peak))
    # After the timing, so that compilation happens outside the hooks.
    saved_over_t = saved_bytes(forward, x) / t_bytes
    for result in results:
        result.saved_over_t = saved_over_t
    return results


def run(args, device, providers, skipped) -> tuple[list[Result], float]:
    timer = Timer(device)
    copy_gbps = copy_bandwidth_gbps(device, timer, args.warmup, args.repeats)
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s", flush=True)
    results = []
    cases = make_cases(args.shape_sets, args.batch, args.max_shapes_per_set)
    for dtype_name in args.dtypes:
        for layout in args.layouts:
            for case in cases:
                torch._dynamo.reset()  # static shapes per case; no recompile limit across cases
                inputs = make_inputs(case, DTYPES[dtype_name], layout, device)
                for provider in providers:
                    label = (f"{case.shape_text} {case.op_text} {dtype_name} {layout} "
                             f"{provider.name}")
                    try:
                        measured = measure_provider(provider, case, inputs, dtype_name, layout,
                                                    args, timer, copy_gbps)
                    except Exception as error:  # one failing provider/case must not end the run
                        reason = f"{type(error).__name__}: {str(error).split(chr(10))[0][:200]}"
                        print(f"  {label}: FAILED {reason}", flush=True)
                        skipped.append({"provider": provider.name, "case": label,
                                        "reason": reason})
                        continue
                    results += measured
                    print(f"  {label}: " + ", ".join(f"{r.mode} {r.ms:.3f} ms" for r in measured),
                          flush=True)
    add_speedups(results, providers)
    return results, copy_gbps


def add_speedups(results: list[Result], providers) -> None:
    fused = {p.name for p in providers if p.fused}
    by_case = {}
    for result in results:
        by_case.setdefault(result.case_key(), []).append(result)
    for group in by_case.values():
        baselines = [r for r in group if r.provider not in fused]
        for result in group:
            if result.provider in fused:
                result.speedup_over = {b.provider: b.ms / result.ms for b in baselines}


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def display_order(results: list[Result]) -> list[Result]:
    """Case by case and, within a case, mode by mode: the providers compare line by line."""
    case_index = {}
    for r in results:
        case_index.setdefault(r.case_key()[:-1], len(case_index))
    return sorted(results, key=lambda r: (case_index[r.case_key()[:-1]], MODES.index(r.mode)))


def format_table(headers, results: list[Result], cells, group_key=Result.case_key) -> str:
    """Right-aligned columns, a blank line wherever ``group_key`` changes."""
    ordered = display_order(results)
    rows = [[str(c) for c in cells(r)] for r in ordered]
    widths = [max(len(c) for c in column) for column in zip(headers, *rows)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    for i, (result, row) in enumerate(zip(ordered, rows)):
        if i and group_key(result) != group_key(ordered[i - 1]):
            lines.append("")
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    return "\n".join(lines)


def results_table(results: list[Result]) -> str:
    headers = ["shape", "op", "dtype", "layout", "mode", "provider", "ms", "p20", "p80", "GB/s",
               "copy%", "saved/T", "peak MB"]
    return format_table(headers, results, lambda r: [
        r.shape, r.op, r.dtype, r.layout, r.mode, r.provider, f"{r.ms:.3f}", f"{r.ms_p20:.3f}",
        f"{r.ms_p80:.3f}", f"{r.gbps:.2f}", f"{100 * r.copy_fraction:.1f}",
        f"{r.saved_over_t:.2f}", "-" if r.peak_mb is None else f"{r.peak_mb:.1f}"])


def speedup_table(results: list[Result]) -> Optional[str]:
    fused_results = [r for r in results if r.speedup_over]
    if not fused_results:
        return None
    baselines = list(dict.fromkeys(b for r in fused_results for b in r.speedup_over))
    headers = ["shape", "op", "dtype", "layout", "mode", "provider",
               *(f"vs {b}" for b in baselines)]
    return format_table(headers, fused_results, lambda r: [
        r.shape, r.op, r.dtype, r.layout, r.mode, r.provider,
        *(f"{r.speedup_over[b]:.2f}x" if b in r.speedup_over else "-" for b in baselines)],
        group_key=lambda r: r.case_key()[:-1])


def git_commit() -> dict:
    def git(*argv):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *argv], capture_output=True,
                              text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{os.cpu_count()}c"


def metadata(args, device, copy_gbps, skipped, load_at_start, cpu_allocator) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "triton_version": triton_version,
        "fusednorm_version": fusednorm.__version__,
        "python_version": platform.python_version(),
        "git": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "timing": ("CUDA events" if device.type == "cuda" else "time.perf_counter")
                  + " per repeat, caches flushed before each; median, p20, p80 after warm-up",
        # 1/5/15-minute load averages: other processes disturb CPU timings (and GPU launches).
        "load_average_at_start": load_at_start,
        "cpu_allocator": cpu_allocator or "default",
        "roofline_bytes": "fwd 2T, bwd 3T, fwd+bwd 5T; T = bytes of x",
        "copy_bandwidth_gbps": copy_gbps,
        "skipped": skipped,
    }


def write_csv(path: Path, results: list[Result]) -> None:
    baselines = list(dict.fromkeys(b for r in results for b in r.speedup_over))
    columns = [f.name for f in dataclasses.fields(Result) if f.name != "speedup_over"]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns + [f"speedup_over_{b}" for b in baselines])
        for r in results:
            values = [getattr(r, c) for c in columns] + [r.speedup_over.get(b) for b in baselines]
            writer.writerow(["" if v is None else round(v, 5) if isinstance(v, float) else v
                             for v in values])


def plot(path: Path, results: list[Result], copy_gbps: float, title: str) -> None:
    """One panel per mode: effective GB/s per case (x) and provider (bars, log scale: providers
    differ by orders of magnitude); the dashed line is the measured copy bandwidth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r.mode for r in results))
    providers = list(dict.fromkeys(r.provider for r in results))
    cases = list(dict.fromkeys((r.shape, r.op, r.dtype, r.layout) for r in results))
    gbps = {(r.shape, r.op, r.dtype, r.layout, r.mode, r.provider): r.gbps for r in results}
    bar_width = 0.8 / len(providers)
    figure_width = max(10.0, 0.22 * len(cases) * len(providers) + 3)
    fig, axes = plt.subplots(len(modes), 1, figsize=(figure_width, 3.6 * len(modes)),
                             squeeze=False)
    colors = plt.get_cmap("tab10").colors
    color_index = {name: i % len(colors) for i, name in enumerate(PROVIDERS)}  # same in every run
    for ax, mode in zip(axes[:, 0], modes):
        for i, provider in enumerate(providers):
            values = [gbps.get((*case, mode, provider), 0.0) for case in cases]
            ax.bar(np.arange(len(cases)) + (i - (len(providers) - 1) / 2) * bar_width, values,
                   bar_width, label=provider, color=colors[color_index[provider]],
                   edgecolor="black" if PROVIDERS[provider].fused else "none")
        ax.set_yscale("log")
        ax.set_ylim(min(r.gbps for r in results) / 2, max(copy_gbps, *gbps.values()) * 3)
        ax.axhline(copy_gbps, color="gray", linestyle="--", linewidth=1)
        ax.text(-0.45, copy_gbps, f"copy {copy_gbps:.0f} GB/s", ha="left", va="bottom",
                fontsize=8, color="gray")
        ax.set_title(f"{mode}: effective bandwidth ({ROOFLINE_FACTOR[mode]}T / time)",
                     fontsize=10)
        ax.set_ylabel("GB/s (log)")
        ax.set_xticks(np.arange(len(cases)))
        ax.set_xticklabels([f"{shape}\n{op}\n{dtype} {layout}" for shape, op, dtype, layout
                            in cases], fontsize=8)
        ax.set_xlim(-0.5, len(cases) - 0.5)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=min(len(providers), 5), fontsize=8, loc="lower left",
                      bbox_to_anchor=(0, 1.12))
    fig.suptitle(title, fontsize=11, y=1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def comma_list(choices):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(choices)}")
        return values
    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CPU preset of a few minutes: the four ResNet-50 stage shapes at "
                             "batch 8, fp32, both layouts, all modes, providers fusednorm-cpu, "
                             "reference, reference-compiled, native-gn, batchnorm; explicit "
                             "flags override it")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available (default: auto, cpu with --quick)")
    parser.add_argument("--shape-sets", type=comma_list(SHAPE_SETS),
                        help=f"comma list of {', '.join(SHAPE_SETS)} (default: all)")
    parser.add_argument("--max-shapes-per-set", type=int,
                        help="only the first K shapes of each set (default: all)")
    parser.add_argument("--batch", type=int,
                        help="batch of the ResNet/EfficientNet shapes (default: 64 cuda, 8 cpu)")
    parser.add_argument("--modes", type=comma_list(MODES), help="comma list (default: all)")
    parser.add_argument("--dtypes", type=comma_list(DTYPES),
                        help="comma list (default: fp32,bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--layouts", type=comma_list(LAYOUTS), help="comma list (default: both)")
    parser.add_argument("--providers", type=comma_list(PROVIDERS),
                        help=f"comma list of {', '.join(PROVIDERS)} (default: all that can run)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default: 10 cuda, 3 cpu)")
    parser.add_argument("--repeats", type=int, help="timed calls (default: 100 cuda, 30 cpu)")
    parser.add_argument("--glibc-malloc-defaults", action="store_true",
                        help="CPU: leave glibc's allocator as it is (per-call page faults for "
                             "large outputs in the timings) instead of keeping freed memory")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR,
                        help=f"where the CSV/JSON/PNG go (default: {RESULTS_DIR})")
    args = parser.parse_args(argv)

    if args.quick:
        preset = dict(device="cpu", shape_sets=["resnet"], dtypes=["fp32"],
                      providers=["fusednorm-cpu", "reference", "reference-compiled", "native-gn",
                                 "batchnorm"])
        for name, value in preset.items():
            if getattr(args, name) in (None, "auto"):
                setattr(args, name, value)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = args.device == "cuda"
    defaults = dict(shape_sets=list(SHAPE_SETS), batch=64 if on_cuda else 8, modes=list(MODES),
                    dtypes=["fp32", "bf16"] if on_cuda else ["fp32"], layouts=list(LAYOUTS),
                    providers=list(PROVIDERS), warmup=10 if on_cuda else 3,
                    repeats=100 if on_cuda else 30)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")

    providers, skipped = [], []
    for name in args.providers:
        reason = PROVIDERS[name].unavailable(device)
        if reason is None:
            providers.append(PROVIDERS[name])
        else:
            skipped.append({"provider": name, "case": "all", "reason": reason})
    cpu_allocator = None
    if device.type == "cpu" and not args.glibc_malloc_defaults:
        cpu_allocator = keep_freed_cpu_memory()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"device: {device} ({device_name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"providers: {', '.join(p.name for p in providers)}")
    if cpu_allocator:
        print(f"allocator: {cpu_allocator}")
    load_at_start = os.getloadavg()
    if load_at_start[0] > 0.25 * os.cpu_count():
        print(f"warning: load average {load_at_start[0]:.1f} on {os.cpu_count()} CPUs: other "
              f"processes will disturb the timings")
    for entry in skipped:
        print(f"skipped {entry['provider']}: {entry['reason']}")
    if not providers:
        sys.exit("no provider can run")

    results, copy_gbps = run(args, device, providers, skipped)
    if not results:
        sys.exit("no results")

    print()
    print(f"effective GB/s against the roofline bytes (fwd 2T, bwd 3T, fwd+bwd 5T); copy% of the "
          f"measured copy bandwidth {copy_gbps:.1f} GB/s; saved/T = bytes saved for backward / T")
    print(results_table(results))
    speedups = speedup_table(results)
    if speedups:
        print("\nspeedup of each fusednorm provider (baseline ms / fusednorm ms)")
        print(speedups)
    for entry in skipped:
        if entry["case"] == "all":
            print(f"skipped {entry['provider']}: {entry['reason']}")
        else:
            print(f"failed {entry['case']}: {entry['reason']}")

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    stem = f"{device_slug(device)}{'-quick' if args.quick else ''}-{stamp}"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    meta = metadata(args, device, copy_gbps, skipped, load_at_start, cpu_allocator)
    write_csv(args.output_dir / f"{stem}.csv", results)
    (args.output_dir / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "results": [dataclasses.asdict(r) for r in results]}, indent=1) + "\n")
    cpus = f" ({meta['cpu_count']} CPUs)" if device.type == "cpu" else ""
    plot(args.output_dir / f"{stem}.png", results, copy_gbps,
         f"fusednorm GN+act+PN on {meta['device_name']}{cpus}, torch {torch.__version__}, "
         f"{meta['date'][:10]}")
    print(f"\nwrote {args.output_dir / stem}.csv, .json, .png")


if __name__ == "__main__":
    main()
