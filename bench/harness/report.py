"""Output of the GN+PN benchmark: the result row, tables, machine facts, CSV, JSON metadata, plot."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import fusednorm
from fusednorm.info import cpu_model

from harness.cases import MODES, REPO_ROOT, ROOFLINE_FACTOR
from harness.providers import PROVIDERS


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
    ms_min: float
    gbps: float  # roofline bytes / median time
    copy_fraction: float  # gbps / case_copy_gbps
    saved_over_t: float
    peak_mb: Optional[float]  # CUDA only
    speedup_over: dict = field(default_factory=dict)  # fused providers: baseline -> its ms / ms
    # Bandwidth of a copy of x (2T bytes / median time), timed in the same interleaved rounds.
    case_copy_gbps: float = float("nan")

    def case_key(self):
        return (self.shape_set, self.shape, self.op, self.dtype, self.layout, self.mode)



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
    headers = ["shape", "op", "dtype", "layout", "mode", "provider", "ms", "p20", "p80", "min",
               "GB/s", "copy GB/s", "copy%", "saved/T", "peak MB"]
    return format_table(headers, results, lambda r: [
        r.shape, r.op, r.dtype, r.layout, r.mode, r.provider, f"{r.ms:.3f}", f"{r.ms_p20:.3f}",
        f"{r.ms_p80:.3f}", f"{r.ms_min:.3f}", f"{r.gbps:.2f}", f"{r.case_copy_gbps:.1f}",
        f"{100 * r.copy_fraction:.1f}", f"{r.saved_over_t:.2f}", "-" if r.peak_mb is None else f"{r.peak_mb:.1f}"])


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


def wins_report(results: list[Result], providers) -> str:
    """Per case and mode, the fastest provider by median and, for each fused provider, its ratio
    to the fastest baseline (> 1: ahead); then, per fused provider, the cases where it trails."""
    fused = [p.name for p in providers if p.fused]
    by_case = {}
    for r in display_order(results):
        by_case.setdefault(r.case_key(), []).append(r)
    lines, trails = [], {name: [] for name in fused}
    for key, group in by_case.items():
        label = " ".join(key[1:])
        fastest = min(group, key=lambda r: r.ms)
        baselines = [r for r in group if r.provider not in fused]
        text = f"{label}: fastest {fastest.provider} {fastest.ms:.3f} ms"
        if baselines:
            best = min(baselines, key=lambda r: r.ms)
            for r in group:
                if r.provider in fused:
                    ratio = best.ms / r.ms
                    text += f"; {r.provider} {ratio:.2f}x vs {best.provider}"
                    if ratio < 1:
                        trails[r.provider].append(f"{label} ({ratio:.2f}x vs {best.provider})")
        lines.append(text)
    for name, cases in trails.items():
        if name in {r.provider for r in results}:
            lines.append(f"{name} trails a baseline in {len(cases)} of {len(by_case)} cases"
                         + (":\n  " + "\n  ".join(cases) if cases else ""))
    return "\n".join(lines)


def readme_table(results: list[Result], meta: dict, mode: str = "fwd+bwd") -> str:
    """The README's benchmark table: ``mode`` medians per case (rows) and provider (columns); a
    fused provider's cell adds its GB/s against the roofline and the fraction of the measured
    copy bandwidth, in bold where it is faster than every native baseline that ran (native-gn,
    batchnorm). Regenerated from a results JSON by the benchmark (``<run>.md``) and checked
    against the README by bench/test_bench_group_norm_proxy_act.py."""
    rows = [r for r in display_order(results) if r.mode == mode]
    providers = [name for name in PROVIDERS if any(r.provider == name for r in rows)]
    natives = [name for name in ("native-gn", "batchnorm") if name in providers]
    cases = {}
    for r in rows:
        cases.setdefault((r.shape, r.op, r.dtype, r.layout), {})[r.provider] = r
    # Runs before the instruction sets were recorded have no "cpu_kernels".
    kernels = f", {meta['cpu_kernels']}" if meta.get("cpu_kernels") else ""
    lines = [f"{mode} ms, median of {meta['settings']['repeats']} interleaved repeats, on "
             f"{meta['device_name']} ({meta['torch_threads']} threads{kernels}), torch "
             f"{meta['torch_version']}; fused cells: ms (GB/s against the roofline bytes, % of a "
             f"copy of x timed in the same rounds)",
             "",
             "| shape | op | dtype | layout | " + " | ".join(providers) + " |",
             "|---" * (4 + len(providers)) + "|"]
    for (shape, op, dtype, layout), by_provider in cases.items():
        cells = []
        for name in providers:
            r = by_provider.get(name)
            if r is None:
                cells.append("-")
            elif PROVIDERS[name].fused:
                cell = f"{r.ms:.2f} ({r.gbps:.1f} GB/s, {100 * r.copy_fraction:.0f}%)"
                ahead = natives and all(n in by_provider and r.ms < by_provider[n].ms
                                        for n in natives)
                cells.append(f"**{cell}**" if ahead else cell)
            else:
                cells.append(f"{r.ms:.2f}")
        lines.append(f"| {shape.replace('x', '×')} | {op} | {dtype} | {layout} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def git_commit() -> dict:
    def git(*argv):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *argv], capture_output=True,
                              text=True).stdout.strip()
    # Results written by earlier runs (bench/results/) are not changes to what is measured.
    changes = git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(changes)}


def device_slug(device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{os.cpu_count()}c"


def cpu_kernels() -> str:
    """The instruction sets the CPU kernels run with: ATen's (ATEN_CPU_CAPABILITY can lower it)
    and the copy of fusednorm's C++ kernels."""
    aten = torch.backends.cpu.get_cpu_capability()
    try:
        from fusednorm import _C
        return f"ATen {aten}, fusednorm {_C.cpu_capability()} kernels"
    except ImportError:
        return f"ATen {aten}"


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
        "cpu_kernels": cpu_kernels(),
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
                  + " per call, caches flushed before each; providers and modes of a case "
                    "interleaved (one call each per round, rotating order); median, p20, p80, min "
                    "after warm-up",
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


def comma_list(choices):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(choices)}")
        return values
    return parse
