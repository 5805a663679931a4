"""Benchmark diffusers UNets before and after ``fusednorm.convert`` (GroupNorm + SiLU fused).

    python bench/convert_diffusers.py            # CPU (or CUDA with --device cuda), fp32
    python bench/convert_diffusers.py --quick    # small models, a few repeats

Models are built from configs (no download), with the same weights before and after conversion:
``unet2d`` is the DDPM CIFAR-10 UNet2DModel (google/ddpm-cifar10-32's config), ``sd-unet`` a
Stable-Diffusion-shaped UNet2DConditionModel narrowed to fit a CPU (block widths 128/256/512
instead of 320/640/1280). Modes: "infer" is an eval forward under torch.no_grad (sampling),
"train" a training forward + backward (torch.autograd.grad of the output's sum over the inputs'
and parameters' gradients). Each repeat times the original and the converted model back to back,
in alternating order, so that load on the machine hits both alike; reported as the median (and
min) of the repeats. The outputs are compared first: "max|diff|" is the largest difference of the
converted model's output from the original's.

Writes a table to stdout and diffusers-<device>[-quick]-<date>.csv/.json under bench/out/
(ignored by git; ``--output-dir bench/results`` for a run to commit).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ holds scripts, not a package
from harness import cases, report, timing  # noqa: E402  (shared timing and machine facts)

import fusednorm  # noqa: E402

MODES = ("infer", "train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def unet2d(quick):
    from diffusers import UNet2DModel
    channels = (32, 64, 64, 64) if quick else (128, 256, 256, 256)
    model = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1 if quick else 2,
        block_out_channels=channels, norm_num_groups=32 if not quick else 16, dropout=0.0,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))

    def inputs(batch, dtype, device):
        return dict(sample=torch.randn(batch, 3, 32, 32, dtype=dtype, device=device),
                    timestep=torch.randint(0, 1000, (batch,), device=device))
    return model, inputs


def sd_unet(quick):
    from diffusers import UNet2DConditionModel
    channels = (32, 64, 64) if quick else (128, 256, 512)
    model = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1 if quick else 2,
        block_out_channels=channels, norm_num_groups=32 if not quick else 16,
        cross_attention_dim=64 if quick else 256, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    text = 64 if quick else 256

    def inputs(batch, dtype, device):
        return dict(sample=torch.randn(batch, 4, 32, 32, dtype=dtype, device=device),
                    timestep=torch.randint(0, 1000, (batch,), device=device),
                    encoder_hidden_states=torch.randn(batch, 16, text, dtype=dtype, device=device))
    return model, inputs


MODELS = {"unet2d": unet2d, "sd-unet": sd_unet}


@dataclass
class Result:
    model: str
    mode: str
    dtype: str
    batch: int
    fused_norms: int
    left_norms: int
    original_ms: float
    converted_ms: float
    original_min_ms: float
    converted_min_ms: float
    speedup: float
    max_abs_diff: float


def timed_call(model, inputs, mode):
    """One repeat of ``mode`` on ``model``."""
    if mode == "infer":
        def call():
            with torch.no_grad():
                return model(**inputs).sample
        return call
    wrt = [t for t in inputs.values() if t.is_floating_point()] + list(model.parameters())
    return lambda: torch.autograd.grad(model(**inputs).sample.sum(), wrt, allow_unused=True)


def interleaved_times(timer, calls, warmup, repeats):
    """Milliseconds of each call per repeat, the calls taken in turn, the order alternating."""
    for call in calls:
        timer(call, warmup, 0)
    times = [[] for _ in calls]
    for repeat in range(repeats):
        order = range(len(calls)) if repeat % 2 == 0 else reversed(range(len(calls)))
        for i in order:
            times[i] += timer(calls[i], 0, 1)
    return times


def run_case(name, mode, dtype_name, args, device, timer):
    torch.manual_seed(0)
    model, make_inputs = MODELS[name](args.quick)
    dtype = DTYPES[dtype_name]
    model = model.to(device=device, dtype=dtype).train(mode == "train")
    converted, report = fusednorm.convert(model)
    inputs = make_inputs(args.batch, dtype, device)
    if mode == "train":
        inputs = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        diff = (converted(**inputs).sample - model(**inputs).sample).abs().max().item()
    original_ms, converted_ms = interleaved_times(
        timer, [timed_call(model, inputs, mode), timed_call(converted, inputs, mode)],
        args.warmup, args.repeats)
    original, fused = float(np.median(original_ms)), float(np.median(converted_ms))
    return Result(name, mode, dtype_name, args.batch, len(report.replaced), len(report.left),
                  original, fused, min(original_ms), min(converted_ms), original / fused, diff)


def table(results):
    headers = ["model", "mode", "dtype", "batch", "fused", "left", "diffusers ms",
               "converted ms", "speedup", "min ms (orig/conv)", "max|diff|"]
    rows = [[r.model, r.mode, r.dtype, str(r.batch), str(r.fused_norms), str(r.left_norms),
             f"{r.original_ms:.1f}", f"{r.converted_ms:.1f}", f"{r.speedup:.2f}x",
             f"{r.original_min_ms:.1f}/{r.converted_min_ms:.1f}", f"{r.max_abs_diff:.1e}"]
            for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small models, 3 repeats (a smoke run, not a measurement)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available, else cpu (default: auto)")
    parser.add_argument("--models", type=report.comma_list(MODELS),
                        help=f"comma list of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--modes", type=report.comma_list(MODES),
                        help="comma list of infer, train (default: both)")
    parser.add_argument("--dtypes", type=report.comma_list(DTYPES),
                        help="comma list of fp32, bf16 (default: fp32 on cpu, both on cuda)")
    parser.add_argument("--batch", type=int, help="images per call (default: 4 cpu, 16 cuda)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default: 2)")
    parser.add_argument("--repeats", type=int,
                        help="timed calls of each model (default: 3 with --quick, else 15)")
    parser.add_argument("--output-dir", type=Path, default=cases.OUTPUT_DIR,
                        help=f"where the CSV/JSON go (default: {cases.OUTPUT_DIR}, ignored by "
                             f"git; {cases.RESULTS_DIR} for a run to commit)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.models = args.models or list(MODELS)
    args.modes = args.modes or list(MODES)
    args.dtypes = args.dtypes or (["fp32"] if args.device == "cpu" else ["fp32", "bf16"])
    args.batch = args.batch or (4 if args.device == "cpu" else 16)
    args.repeats = args.repeats or (3 if args.quick else 15)
    return args


def quiet_diffusers():
    """diffusers' deprecation notices (~36 lines: warnings and its logger) stay out of the table;
    this benchmark builds its models from configs on purpose."""
    warnings.filterwarnings("ignore", module=r"diffusers(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()


def main(argv=None):
    args = parse_args(argv)
    quiet_diffusers()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        timing.keep_freed_cpu_memory()
    timer = timing.Timer(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        report.cpu_model()
    print(f"device: {device} ({device_name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fusednorm backend for GroupNormAct: "
          f"{fusednorm.select_backend(None, torch.empty(1, device=device))}")
    results = []
    for name in args.models:
        for mode in args.modes:
            for dtype_name in args.dtypes:
                results.append(run_case(name, mode, dtype_name, args, device, timer))
                print(table(results[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(results))

    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = (f"diffusers-{report.device_slug(device)}{'-quick' if args.quick else ''}-"
            f"{datetime.datetime.now().strftime('%Y%m%d-%H%M')}")
    with (args.output_dir / f"{stem}.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    meta = {"device": str(device), "device_name": device_name,
            "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
            "diffusers_version": __import__("diffusers").__version__,
            "git": report.git_commit(), "load_average_at_start": os.getloadavg(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "timing": "interleaved repeats, median and min after warm-up; " +
                      ("CUDA events" if device.type == "cuda" else "time.perf_counter"),
            "results": [asdict(r) for r in results]}
    (args.output_dir / f"{stem}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"\nwrote {args.output_dir / stem}.csv/.json")
    return results


if __name__ == "__main__":
    main()
