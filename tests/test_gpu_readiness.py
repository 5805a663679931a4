"""GPU readiness on a machine without a GPU: every Triton kernel specialization compiled for sm_90
and sm_80 by Triton's real compiler, the CUDA extension's .cu files compiled by nvcc, and the
one-command GPU validation (its refusal without CUDA, its report on fake results)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import triton

from fusednorm.kernels import group_norm_proxy_act as kernels

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gpu_validate  # noqa: E402
import nvcc_compile  # noqa: E402


def _run_tool(args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def test_triton_kernels_compile_for_sm90_and_sm80(tmp_path):
    """tools/gpu_compile.py: every activation, PN mode, proxy-parameter mode, dtype, layout,
    edge shape, split path and 64-bit indexing through the real launchers with GPU launch plans;
    fails on a compile error, a spill in fp32/fp16/bf16, or an fp32 scalar in an fp64 kernel."""
    code, output = _run_tool(["tools/gpu_compile.py", "--table-dir", str(tmp_path)], 1500)
    assert code == 0, output[-20000:]
    for arch in (90, 80):
        assert f"sm_{arch}: " in output and " 0 failures" in output
        table = (tmp_path / f"triton-resources-sm{arch}.md").read_text()
        for name in dir(kernels):
            if name.endswith("_kernel") and isinstance(getattr(kernels, name), triton.runtime.JITFunction):
                assert f"| {name.lstrip('_')} |" in table, f"{name} was never compiled for sm_{arch}"


def test_committed_resource_tables_cover_every_kernel():
    for arch in (90, 80):
        table = (ROOT / "bench" / "results" / f"triton-resources-sm{arch}.md").read_text()
        for name in dir(kernels):
            if name.endswith("_kernel") and isinstance(getattr(kernels, name), triton.runtime.JITFunction):
                assert f"| {name.lstrip('_')} |" in table, (
                    f"{name} is missing from the committed table: rerun "
                    f"python tools/gpu_compile.py --full --table-dir bench/results")


def test_cuda_extension_compiles_for_sm80_and_sm90(tmp_path):
    if nvcc_compile.find_nvcc() is None:
        pytest.skip("nvcc not found (CUDA_HOME or PATH): the .cu files cannot be compiled here")
    code, output = _run_tool(["tools/nvcc_compile.py", "--table-dir", str(tmp_path)], 1200)
    assert code == 0, output[-20000:]
    table = (tmp_path / "cuda-resources.md").read_text()
    for source in nvcc_compile.CUDA_SOURCES:
        assert f"ok {source.relative_to(ROOT)} for sm_90, sm_80" in output
    for arch in (80, 90):
        assert f"| sm_{arch} |" in table


def test_ptxas_resource_lines_are_parsed():
    output = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    24 bytes stack frame, 20 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 384 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90'
ptxas info    : Function properties for _Z3barPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, 384 bytes cmem[0]
"""
    assert nvcc_compile.resource_rows(output) == [(90, "_Z3fooPf", 40, 24, 20),
                                                  (90, "_Z3barPf", 12, 0, 0)]


def test_fp32_scalar_parameters_are_found_in_ptx():
    import gpu_compile
    ptx = """.visible .entry _k(
	.param .u64 .ptr .global .align 1 _k_param_0,
	.param .f32 _k_param_1,
	.param .f64 _k_param_2
)
{ .reg .f32 %f<4>; }"""
    assert gpu_compile._f32_params(ptx) == 1


def test_launch_plan_for_a_gpu_without_one():
    """plan_as_gpu gives CPU tensors the tiles a GPU would get (the compile check relies on it)."""
    cpu = kernels.device_traits(torch.device("cpu"))
    with kernels.plan_as_gpu(132):
        gpu = kernels.device_traits(torch.device("cpu"))
    assert not cpu.gpu and gpu == kernels.DeviceTraits(gpu=True, sm_count=132, l2_bytes=50 * 2**20)
    block_c, block_s = kernels._tile_shape(256, 3136, False, gpu)
    assert block_c * block_s == 1024 and block_s == 1024
    assert kernels._tile_shape(256, 3136, False, cpu)[1] == 4096


def test_dev_py_gpu_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: `dev.py gpu` would run for real")
    done = subprocess.run([sys.executable, "dev.py", "gpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], lines


def test_gpu_validate_refuses_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(gpu_validate, "cuda_available", lambda: False)
    assert gpu_validate.main([]) == 2
    assert capsys.readouterr().out.strip() == gpu_validate.NO_CUDA_MESSAGE


def test_gpu_report_on_fake_results(tmp_path):
    (tmp_path / "junit.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="10" failures="1" '
        'errors="0" skipped="2"></testsuite></testsuites>')
    env = {"device": "NVIDIA H100 80GB HBM3", "capability": "9.0", "torch": "2.11.0",
           "cuda": "13.0", "triton": "3.6.0", "commit": "abc123", "date": "2026-11-25T02:00:00"}
    steps = [gpu_validate.StepResult("tests", "failed (exit 1)", 61.2, "tests.log"),
             gpu_validate.StepResult("bench", "timed out after 240 s", 240.0, "bench.log"),
             gpu_validate.StepResult("ncu", "skipped: ncu not on PATH", 0.0, "-")]
    text = gpu_validate.write_report(tmp_path, env, steps)
    assert "# fusednorm GPU validation: NVIDIA H100 80GB HBM3" in text
    assert "| tests | failed (exit 1) | 61 | tests.log |" in text
    assert "| bench | timed out after 240 s | 240 | bench.log |" in text
    assert "tests: 7 passed, 1 failed, 0 errors, 2 skipped" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tests"] == {"tests": 10, "failures": 1, "errors": 0, "skipped": 2}
    assert [s["name"] for s in summary["steps"]] == ["tests", "bench", "ncu"]


def test_gpu_report_folder_is_named_by_device_and_date():
    import datetime
    path = gpu_validate.default_out_dir("NVIDIA H100 80GB HBM3", datetime.datetime(2026, 11, 25, 2, 5))
    assert path == ROOT / "bench" / "results" / "nvidia-h100-80gb-hbm3-20261125-0205"


def test_gpu_results_pack_into_eight_files(tmp_path):
    """What `dev.py gpu` leaves (14 files and a folder on the last plan) packs into at most 8
    files, none in a folder: the summaries, the benchmark's table/plot/data, the profile table,
    and one archive holding everything else intact."""
    import tarfile

    names = ["summary.md", "summary.json", "env.json", "junit.xml", "tests.log", "bench.log",
             "profile.log", "ncu.log", "ncu.csv", "profile.txt", "nvidia-h200-20261203-2000.md",
             "nvidia-h200-20261203-2000.json", "nvidia-h200-20261203-2000.csv",
             "nvidia-h200-20261203-2000.png"]
    for name in names:
        (tmp_path / name).write_text(f"contents of {name}\n")
    (tmp_path / "ncu-target").mkdir()
    (tmp_path / "ncu-target" / "profile.txt").write_text("nested\n")
    kept = gpu_validate.pack(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(kept) == left and len(left) <= gpu_validate.MAX_FILES
    assert all((tmp_path / name).is_file() for name in left)
    assert {"summary.md", "summary.json", "nvidia-h200-20261203-2000.md",
            "nvidia-h200-20261203-2000.png", "profile.txt", gpu_validate.ARCHIVE} <= set(left)
    with tarfile.open(tmp_path / gpu_validate.ARCHIVE) as archive:
        members = {m.name: m for m in archive.getmembers()}
        archived = {name for name in members if members[name].isfile()}
        assert archived == {n for n in names if n not in left} | {"ncu-target/profile.txt"}
        assert archive.extractfile("junit.xml").read() == b"contents of junit.xml\n"


def test_gpu_validation_keeps_to_its_budget(tmp_path, monkeypatch):
    """Steps run within the time the budget leaves (counted from dev.py's start): a step with
    less than 10 s left is skipped with the reason, not started."""
    monkeypatch.setattr(gpu_validate, "cuda_available", lambda: True)
    monkeypatch.setattr(gpu_validate, "environment", lambda: {"device": "fake", "capability": "9.0",
                                                              "torch": "-", "cuda": "-",
                                                              "triton": "-", "commit": "0" * 10})
    ran = []
    monkeypatch.setattr(gpu_validate, "run_step", lambda name, command, out_dir, limit, env=None:
                        ran.append((name, limit)) or gpu_validate.StepResult(name, "ok", 0.0, "-"))
    monkeypatch.setenv(gpu_validate.START_ENV, str(time.time() - 400))
    assert gpu_validate.main(["--out", str(tmp_path), "--budget-s", "480"]) == 0
    assert ran and all(limit <= 480 - 400 - gpu_validate.REPORT_RESERVE_S for _, limit in ran)
    summary = json.loads((tmp_path / "summary.json").read_text())
    statuses = {s["name"]: s["status"] for s in summary["steps"]}
    assert statuses["tests"] == "ok"
    monkeypatch.setenv(gpu_validate.START_ENV, str(time.time() - 470))
    ran.clear()
    gpu_validate.main(["--out", str(tmp_path / "late"), "--budget-s", "480"])
    assert ran == []
    summary = json.loads((tmp_path / "late" / "summary.json").read_text())
    assert all(s["status"].startswith("skipped") for s in summary["steps"])
