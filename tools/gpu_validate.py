#!/usr/bin/env python3
"""Validate fusednorm on a CUDA machine in one go: ``python3 dev.py gpu [--out DIR]``.

Steps, each with its own time limit, each logged to DIR/<step>.log; a failing step does not stop
the later ones:
  env        device, capability, driver, torch/Triton/CUDA versions, commit  -> env.json
  tests      the whole test suite on CUDA (no interpreter)                   -> junit.xml
  bench      bench/group_norm_proxy_act.py on CUDA (ResNet-50 stages at batch 32, diffusion
             shapes; bf16 and fp32; both layouts; every provider)            -> bench-*.csv/json/png
  profile    torch.profiler per-kernel table of one training step per backend -> profile.txt
  ncu        Nsight Compute summaries of the main kernels, when ncu is present -> ncu.csv
and summary.md / summary.json with every step's status and time, and the test counts.
Installing (the CUDA extension built for the present GPU) is dev.py's part, before this runs.

The lent GPU machine gives 15 minutes of device time in all and brings back at most 8 files
(16 MiB each, at most two folders deep): the whole call keeps within ``--budget-s`` (default
480 s, counted from dev.py's start when it passes FUSEDNORM_GPU_START), each step within its own
limit and the time left, and the folder ends with at most MAX_FILES files: the summaries, the
benchmark's table, plot and data, the profile table, and results.tar.gz with everything else
(logs, junit.xml, the benchmark's CSV, Nsight Compute's output).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA_MESSAGE = "dev.py gpu: no CUDA device here (torch.cuda.is_available() is False); nothing run"
PROFILE_SHAPE = (32, 256, 56, 56)
MAX_FILES = 8
# What stays a file of its own, in this order of priority (the benchmark's table, plot and data;
# env.json last), the rest into ARCHIVE.
KEEP = ("summary.md", "summary.json", "*.md", "*.png", "profile.txt", "*.json")
ARCHIVE = "results.tar.gz"
START_ENV = "FUSEDNORM_GPU_START"  # dev.py's start (time.time()), for the overall budget
REPORT_RESERVE_S = 15  # kept back from the budget for the report and the archive


@dataclasses.dataclass
class StepResult:
    name: str
    status: str  # "ok", "failed (exit N)", "timed out after N s", "skipped: why"
    seconds: float
    log: str  # file name under the output folder


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def default_out_dir(device_name: str, now: datetime.datetime | None = None) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in device_name.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M")
    return ROOT / "bench" / "results" / f"{slug}-{stamp}"


def environment() -> dict:
    import torch
    import triton
    props = torch.cuda.get_device_properties(0)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    smi = shutil.which("nvidia-smi")
    driver = (subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip() if smi else "unknown")
    return {"device": props.name, "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": driver, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "python": platform.python_version(), "commit": commit,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def run_step(name, command, out_dir: Path, timeout_s: int, env=None) -> StepResult:
    """Run one step's command, its output to <name>.log; never raises for the command's sake."""
    log = f"{name}.log"
    print(f"[{name}] {' '.join(map(str, command))} (limit {timeout_s} s)", flush=True)
    start = time.perf_counter()
    with open(out_dir / log, "w") as handle:
        try:
            code = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=timeout_s, env=env).returncode
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout_s} s"
        except OSError as error:
            status = f"failed ({error})"
    seconds = time.perf_counter() - start
    print(f"[{name}] {status} in {seconds:.0f} s", flush=True)
    return StepResult(name, status, seconds, log)


def pack(out_dir: Path, max_files: int = MAX_FILES) -> list[str]:
    """Leave at most max_files entries in out_dir: the KEEP files (first match first), and one
    ARCHIVE (tar.gz) with every other file and folder, which are then removed. Returns the
    names left."""
    import tarfile

    kept = []
    for pattern in KEEP:
        for path in sorted(out_dir.glob(pattern)):
            if path.is_file() and path.name not in kept and len(kept) < max_files - 1:
                kept.append(path.name)
    rest = sorted(p for p in out_dir.iterdir() if p.name not in kept and p.name != ARCHIVE)
    if rest:
        with tarfile.open(out_dir / ARCHIVE, "w:gz") as archive:
            for path in rest:
                archive.add(path, arcname=path.name)
        for path in rest:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        kept.append(ARCHIVE)
    return kept


def junit_counts(path: Path) -> dict | None:
    """{tests, failures, errors, skipped} of a pytest JUnit XML, or None when it is missing."""
    if not path.exists():
        return None
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def write_report(out_dir: Path, env: dict, steps: list[StepResult]) -> str:
    """summary.json and summary.md under out_dir; returns the markdown."""
    counts = junit_counts(out_dir / "junit.xml")
    (out_dir / "summary.json").write_text(json.dumps(
        {"env": env, "steps": [dataclasses.asdict(s) for s in steps], "tests": counts},
        indent=1) + "\n")
    lines = [f"# fusednorm GPU validation: {env.get('device', '?')}", "",
             ", ".join(f"{k} {env[k]}" for k in ("capability", "torch", "cuda", "triton", "driver",
                                                  "commit", "date") if k in env), "",
             "| step | status | seconds | log |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.log} |" for s in steps]
    if counts is not None:
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        lines += ["", f"tests: {passed} passed, {counts['failures']} failed, "
                      f"{counts['errors']} errors, {counts['skipped']} skipped (junit.xml)"]
    text = "\n".join(lines) + "\n"
    (out_dir / "summary.md").write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output folder (default: "
                        "bench/results/<device>-<date>/)")
    parser.add_argument("--skip", default="", help="comma list of steps to leave out")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="the whole call's time, dev.py's build included (default %(default)s)")
    parser.add_argument("--bench-args", default="--shape-sets resnet,diffusion --batch 32 "
                        "--dtypes bf16 --modes fwd+bwd --repeats 30 --warmup 3",
                        help="arguments of bench/group_norm_proxy_act.py (default: %(default)s)")
    args = parser.parse_args(argv)
    if not cuda_available():
        print(NO_CUDA_MESSAGE)
        return 2
    env = environment()
    out_dir = (args.out or default_out_dir(env["device"])).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    print(f"[env] {env['device']} (sm_{env['capability'].replace('.', '')}), torch {env['torch']}, "
          f"CUDA {env['cuda']}, Triton {env['triton']}, commit {env['commit'][:10]} -> {out_dir}")
    skip = set(filter(None, args.skip.split(",")))
    cuda_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    py = sys.executable
    plan = [
        # The CPU-only compile checks are CI's; here the GPU runs the rest.
        ("tests", [py, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "-rs",
                   "--ignore=tests/test_gpu_readiness.py", f"--junitxml={out_dir / 'junit.xml'}"],
         200),
        ("bench", [py, "bench/group_norm_proxy_act.py", "--device", "cuda",
                   "--output-dir", str(out_dir), *args.bench_args.split()], 120),
        ("profile", [py, str(Path(__file__).resolve()), "--profile-into", str(out_dir)], 30),
    ]
    ncu = shutil.which("ncu")
    if ncu:
        plan.append(("ncu", [ncu, "--csv", "--log-file", str(out_dir / "ncu.csv"),
                             "--kernel-name", "regex:_kernel$", "--launch-count", "24",
                             "--section", "SpeedOfLight", "--section", "Occupancy",
                             "--section", "LaunchStats", py, str(Path(__file__).resolve()),
                             "--profile-into", str(out_dir / "ncu-target"), "--steps", "1"], 60))
    deadline = float(os.environ.get(START_ENV, time.time())) + args.budget_s - REPORT_RESERVE_S
    steps = []
    for name, command, limit in plan:
        left = int(deadline - time.time())
        if name in skip:
            steps.append(StepResult(name, "skipped: --skip", 0.0, "-"))
        elif left < 10:
            steps.append(StepResult(name, f"skipped: the {args.budget_s:.0f} s budget is spent",
                                    0.0, "-"))
        else:
            steps.append(run_step(name, command, out_dir, min(limit, left), env=cuda_env))
    if not ncu:
        steps.append(StepResult("ncu", "skipped: ncu not on PATH", 0.0, "-"))
    print(write_report(out_dir, env, steps))
    print(f"[pack] {out_dir}: {', '.join(pack(out_dir))}")
    return 0 if all(s.status == "ok" or s.status.startswith("skipped") for s in steps) else 1


def profile(out_dir: Path, steps: int = 5) -> None:
    """One bf16 training step (forward + backward) of GN+PN per CUDA backend; the per-kernel
    table of torch.profiler to out_dir/profile.txt."""
    import torch
    import fusednorm
    from fusednorm import ops

    out_dir.mkdir(parents=True, exist_ok=True)
    backends = ["triton"] + (["cuda"] if ops.extension_has_kernel("cuda") else [])
    x = torch.randn(PROFILE_SHAPE, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(PROFILE_SHAPE[1], device="cuda", requires_grad=True)
    bias = torch.zeros(PROFILE_SHAPE[1], device="cuda", requires_grad=True)
    tables = []
    for backend in backends:
        def step():
            y = fusednorm.group_norm_proxy_act(x, 8, weight, bias, backend=backend)
            y.backward(torch.ones_like(y))
        step()  # compile / warm up outside the profile
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        tables.append(f"## backend {backend}: {steps} x fwd+bwd, {PROFILE_SHAPE} bf16, G=8, "
                      f"ReLU + PN\n\n" + prof.key_averages().table(
                          sort_by="cuda_time_total", row_limit=25))
    (out_dir / "profile.txt").write_text("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    if "--profile-into" in sys.argv:
        profile_args = argparse.ArgumentParser()
        profile_args.add_argument("--profile-into", type=Path, required=True)
        profile_args.add_argument("--steps", type=int, default=5)
        parsed = profile_args.parse_args()
        profile(parsed.profile_into, parsed.steps)
        sys.exit(0)
    sys.exit(main())
