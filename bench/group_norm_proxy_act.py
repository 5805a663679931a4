"""Benchmark fused GroupNorm + affine + activation + Proxy Normalization against its baselines.

    python bench/group_norm_proxy_act.py            # everything this machine can run
    python bench/group_norm_proxy_act.py --quick    # the CPU preset (~5 min on 2 cores)

Providers: every fusednorm backend that can run here (triton and cuda on CUDA tensors, cpu on CPU
tensors), the eager reference GN+PN and its torch.compile, native F.group_norm + activation
(eager and compiled), and training-mode BatchNorm + activation (eager and compiled). A provider
that cannot run is listed with the reason and left out.

Timing: CUDA events (on CUDA) or time.perf_counter (on CPU) around each call, with the caches
flushed before it as triton.testing.do_bench does, after warm-up calls (the first of which
compiles). The providers and modes of a case are interleaved: each round of repeats times every
one of them once, in a rotating order. Reported: the median with p20/p80, and the minimum; then,
per case, which provider is fastest and where each fused provider trails a baseline. On CPU, freed memory stays in the process (see
keep_freed_cpu_memory) so that timings do not depend on which page faults glibc happens to take,
and tensors of 2 MB and more are on transparent huge pages (THP_MEM_ALLOC_ENABLE, below).
"fwd" is a training forward (inputs require grad), "bwd" times autograd on a graph built once
outside the timing, "fwd+bwd" both. Effective bandwidth is against the roofline bytes of
docs/pn-math.md (2T forward, 3T backward, 5T both; T = bytes of x), also as a fraction of the measured
copy bandwidth. "saved/T" is the bytes of the unique storages the forward saves for backward / T.

Writes a table to stdout and <device>[-quick]-<date>.csv/.json/.md/.png under bench/out/ (ignored
by git; ``--output-dir bench/results`` for a run to commit; the .md is the README table of the run).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

# CPU: tensors of 2 MB and more on transparent huge pages. On 4 KB pages how fast a buffer
# streamed depended on the pages it got: copies of same-size tensors in one process took 41-45 or
# 73-82 GB/s on the 2-core VM of bench/results (78 +- 2 GB/s each on huge pages), so a provider's
# time depended on its allocations. c10 reads this at its first allocation: before torch is
# imported. THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# torch.compile's on-disk cache does not tell ATen's instruction sets apart: after a run under
# ATEN_CPU_CAPABILITY=avx2 (the README's AVX2 runs), a later run without it loaded the cached
# bf16 channels-last reference-compiled kernels and aborted ("double free or corruption";
# torch 2.13.0+cpu, Intel Xeon with AVX512-BF16). A lowered capability gets a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor-{os.environ['ATEN_CPU_CAPABILITY'].lower()}")

import numpy as np  # noqa: E402
import torch  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ holds scripts, not a package
from harness.cases import (DTYPES, LAYOUTS, MODES, OUTPUT_DIR, RESULTS_DIR, ROOFLINE_FACTOR,
    SHAPE_SETS, make_cases, make_inputs)  # noqa: E402
from harness.providers import PROVIDERS  # noqa: E402
from harness.report import (Result, comma_list, cpu_model, device_slug, metadata, plot,
    readme_table, results_table, speedup_table, wins_report, write_csv)  # noqa: E402
from harness.timing import (Timer, copy_bandwidth_gbps, keep_freed_cpu_memory, peak_memory_bytes,
    saved_bytes, timed_call)  # noqa: E402


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


def measure_case(case, inputs, providers, dtype_name, layout, args, timer,
                 failed) -> list[Result]:
    """Every mode of every provider on one case, interleaved: each round of repeats times every
    (provider, mode) once, in an order rotated by one each round, so that a slow spell of a
    shared machine falls on all providers alike rather than on whichever ran then. Each round
    also times a copy of x (2T bytes): copy% is against that copy's bandwidth, measured in the
    same rounds, not against a bandwidth measured minutes earlier (on a shared machine the two
    differ by up to 40%)."""
    x = inputs.x
    t_bytes = x.numel() * x.element_size()
    grad_y = torch.randn_like(x)  # x's layout
    calls, forwards = {}, {}
    for provider in providers:
        try:
            with environment(provider.env):
                forward, params = provider.build(case, inputs)
                fns = {mode: timed_call(mode, forward, x, params, grad_y) for mode in args.modes}
                for fn in fns.values():
                    for _ in range(args.warmup):  # the first call compiles, where a provider does
                        fn()
        except Exception as error:  # one failing provider/case must not end the run
            report_failure(failed, provider, case, dtype_name, layout, error)
            continue
        forwards[provider.name] = forward
        calls.update({(provider, mode): fn for mode, fn in fns.items()})
    times = {key: [] for key in calls}
    keys = list(calls)
    copy_source = x.detach()
    copy_target = torch.empty_like(copy_source)
    copy_times = []
    for round_index in range(args.repeats):
        copy_times.append(timer.once(lambda: copy_target.copy_(copy_source)))
        shift = round_index % len(keys) if keys else 0
        for provider, mode in keys[shift:] + keys[:shift]:
            if (provider, mode) not in times:
                continue
            try:
                with environment(provider.env):
                    times[provider, mode].append(timer.once(calls[provider, mode]))
            except Exception as error:
                report_failure(failed, provider, case, dtype_name, layout, error)
                for key in [k for k in times if k[0] is provider]:
                    del times[key]
    case_copy_gbps = 2 * t_bytes / (float(np.median(copy_times)) * 1e-3) / 1e9
    results = []
    for (provider, mode), measured in times.items():
        peak = peak_memory_bytes(calls[provider, mode]) / 2**20 if x.is_cuda else None
        ms, p20, p80 = (float(t) for t in np.percentile(measured, [50, 20, 80]))
        gbps = ROOFLINE_FACTOR[mode] * t_bytes / (ms * 1e-3) / 1e9
        results.append(Result(case.shape_set, case.shape_text, case.op_text, dtype_name, layout,
                              mode, provider.name, ms, p20, p80, float(min(measured)), gbps,
                              gbps / case_copy_gbps, float("nan"), peak,
                              case_copy_gbps=case_copy_gbps))
    calls.clear()  # frees the graphs the backward-only calls retain
    # After the timing, so that compilation happens outside the hooks; once per provider.
    saved_over_t = {}
    for provider in providers:
        if provider.name in forwards:
            with environment(provider.env):
                saved_over_t[provider.name] = saved_bytes(forwards[provider.name], x) / t_bytes
    for result in results:
        result.saved_over_t = saved_over_t[result.provider]
    return results


def report_failure(failed, provider, case, dtype_name, layout, error) -> None:
    label = f"{case.shape_text} {case.op_text} {dtype_name} {layout} {provider.name}"
    reason = f"{type(error).__name__}: {str(error).split(chr(10))[0][:200]}"
    print(f"  {label}: FAILED {reason}", flush=True)
    failed.append({"provider": provider.name, "case": label, "reason": reason})


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
                measured = measure_case(case, inputs, providers, dtype_name, layout, args, timer,
                                        skipped)
                results += measured
                for mode in args.modes:
                    print(f"  {case.shape_text} {case.op_text} {dtype_name} {layout} {mode}: "
                          + ", ".join(f"{r.provider} {r.ms:.3f}" for r in measured
                                      if r.mode == mode) + " ms", flush=True)
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
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CPU preset (~5 min on 2 cores): the four ResNet-50 stage shapes "
                             "at batch 8 with G=8 and G=1, fp32, both layouts, all modes, "
                             "providers fusednorm-cpu, reference, reference-compiled, native-gn, "
                             "batchnorm; explicit flags override it")
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
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR,
                        help=f"where the CSV/JSON/MD/PNG go (default: {OUTPUT_DIR}, ignored by "
                             f"git; {RESULTS_DIR} for a run to commit)")
    args = parser.parse_args(argv)

    if args.quick:
        preset = dict(device="cpu", shape_sets=["resnet", "layernorm"], dtypes=["fp32"],
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
    if device.type == "cpu" and os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        cpu_allocator = ", ".join(filter(None, [
            cpu_allocator, "THP_MEM_ALLOC_ENABLE=1 (tensors of 2 MB and more on huge pages)"]))
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
          f"bandwidth of a copy of x timed in the same rounds (copy GB/s; a 64 MB copy at the "
          f"start: {copy_gbps:.1f} GB/s); saved/T = bytes saved for backward / T")
    print(results_table(results))
    speedups = speedup_table(results)
    if speedups:
        print("\nspeedup of each fusednorm provider (baseline ms / fusednorm ms)")
        print(speedups)
    print("\nwhere each provider wins (medians)")
    print(wins_report(results, providers))
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
    (args.output_dir / f"{stem}.md").write_text(readme_table(results, meta) + "\n")
    (args.output_dir / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "results": [dataclasses.asdict(r) for r in results]}, indent=1) + "\n")
    cpus = f" ({meta['cpu_count']} CPUs)" if device.type == "cpu" else ""
    plot(args.output_dir / f"{stem}.png", results, copy_gbps,
         f"fusednorm GN+act+PN on {meta['device_name']}{cpus}, torch {torch.__version__}, "
         f"{meta['date'][:10]}")
    print(f"\nwrote {args.output_dir / stem}.csv, .json, .md (the README table), .png")


if __name__ == "__main__":
    main()
