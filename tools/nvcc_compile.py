#!/usr/bin/env python3
"""Compile the CUDA extension's .cu files for sm_80 and sm_90 (compile only, no link) with
nvcc's ``--resource-usage``, on a machine without a GPU.

    python tools/nvcc_compile.py [--arch 90 --arch 80] [--table-dir bench/results]

setup.py builds these files only against a CUDA build of torch; a CPU-only machine (CI) never
would. torch's headers (CPU wheel included) carry what the .cu files include, so nvcc can compile
them here with the flags torch.utils.cpp_extension would use. Exit status 1 on any compile error,
or when a kernel spills; 2 when nvcc is not found.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def stand_in_includes(folder: Path) -> list[Path]:
    """A CPU wheel of torch lacks the one header CMake generates for c10's CUDA library; write
    the macro it defines (shared-library build) into ``folder`` when torch has none."""
    from torch.utils import cpp_extension

    name = Path("c10/cuda/impl/cuda_cmake_macros.h")
    if any((Path(p) / name).exists() for p in cpp_extension.include_paths()):
        return []
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [folder]


def nvcc_command(nvcc, source: Path, arches, extra_includes=()) -> list[str]:
    """Compile-only command for ``source``, one -gencode per architecture (the host pass, most
    of the time with torch's headers, runs once)."""
    import torch
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in (*cpp_extension.include_paths(), *extra_includes,
                                   ROOT / "csrc")]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    gencode = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in arches]
    return [nvcc, "-c", str(source), "-o", os.devnull, "-std=c++20", "-O3", *gencode,
            "--resource-usage", "-DFUSEDNORM_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *cpp_extension.COMMON_NVCC_FLAGS, *includes]


def compile_one(nvcc, source: Path, arches, extra_includes=()):
    """(returncode, output) of one compile."""
    done = subprocess.run(nvcc_command(nvcc, source, arches, extra_includes), capture_output=True,
                          text=True)
    return done.returncode, done.stdout + done.stderr


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_USAGE = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def resource_rows(output: str):
    """(arch, mangled kernel, registers, stack frame, spill stores) from ptxas' info lines."""
    rows, current, spill = [], None, (0, 0)
    for line in output.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current, spill = (int(entry.group(2)), entry.group(1)), (0, 0)
        spilled = _SPILL.search(line)
        if spilled:
            spill = (int(spilled.group(1)), int(spilled.group(2)))
        used = _USAGE.search(line)
        if used and current:
            rows.append((*current, int(used.group(1)), *spill))
            current = None
    return rows


def demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return list(names)
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout
    return [line[:140] for line in out.splitlines()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=(80, 90),
                        help="compute capability x10, repeatable (default: 90 and 80)")
    parser.add_argument("--table-dir", type=Path, help="write cuda-resources.md there")
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (set CUDA_HOME or put it on PATH): nothing compiled")
        return 2
    arches = args.arch or [90, 80]
    with tempfile.TemporaryDirectory() as folder, \
            concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        extra = stand_in_includes(Path(folder))
        results = list(pool.map(lambda source: compile_one(nvcc, source, arches, extra),
                                CUDA_SOURCES))
    failed, spills, table = 0, 0, []
    for source, (code, output) in zip(CUDA_SOURCES, results):
        name = f"{source.relative_to(ROOT)} for {', '.join(f'sm_{a}' for a in arches)}"
        if code != 0:
            failed += 1
            print(f"FAILED {name}\n{output}")
            continue
        rows = resource_rows(output)
        print(f"ok {name}: {len(rows)} kernels")
        for (arch, kernel, regs, stack, spill), pretty in zip(rows, demangle([r[1] for r in rows])):
            table.append((arch, source.name, pretty, regs, stack, spill))
            if spill:
                spills += 1
                print(f"SPILL sm_{arch} {pretty}: {spill} bytes spill stores")
    lines = ["| arch | file | kernel | registers | stack B | spill stores B |", "|---|---|---|---|---|---|"]
    lines += [f"| sm_{a} | {f} | `{k}` | {r} | {s} | {sp} |" for a, f, k, r, s, sp in sorted(table)]
    print("\n".join(lines))
    if args.table_dir:
        args.table_dir.mkdir(parents=True, exist_ok=True)
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        release = re.search(r"release [\d.]+", version)
        (args.table_dir / "cuda-resources.md").write_text(
            "# CUDA kernels of the extension compiled for sm_80 and sm_90\n\n"
            f"Made by `python tools/nvcc_compile.py` (nvcc {release.group(0) if release else '?'}, "
            "`--resource-usage`), compile only, no GPU involved.\n\n" + "\n".join(lines) + "\n")
    return 1 if failed or spills else 0


if __name__ == "__main__":
    sys.exit(main())
