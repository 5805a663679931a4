#!/usr/bin/env python3
"""Set up this checkout and run it: ``python3 dev.py demo``, ``test`` or ``gpu``.

Installs what is missing into the running Python (use a venv if you want isolation): torch 2.13.0
only when no torch is importable (an installed torch, CPU or CUDA, is never replaced), the
development requirements (``test``: also requirements-test.txt's, e.g. diffusers), then fusednorm
itself in editable mode with its C++ extension.

``gpu`` (on a CUDA machine): builds the extension's CUDA kernels for the present GPU, then runs
``tools/gpu_validate.py`` (tests on CUDA, benchmarks, profiles, one report folder); extra
arguments go to it, e.g. ``python3 dev.py gpu --out /tmp/gpu``.
"""
import collections
import importlib.util
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
TEST_COMMAND = [sys.executable, "-m", "pytest", "tests", "bench", "-q", "-p", "no:cacheprovider"]
PIP_INSTALL = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
BUILD_LOG = os.path.join(ROOT, "build", "install.log")


def pip(*args, env=None):
    subprocess.check_call([*PIP_INSTALL, *args], cwd=ROOT, env=env)


def install(env=None, requirements="requirements-dev.txt"):
    if importlib.util.find_spec("torch") is None:
        pip("-r", "requirements-torch.txt")
    pip("-r", requirements)
    build(env)


# ninja's line for each compile, printed when it finishes:
# "[3/8] c++ ... -c /path/src.cpp -o /path/obj.o".
NINJA_COMPILE = re.compile(r"^\[(\d+)/(\d+)\] .* -c (\S+) -o (\S+)")


def progress_line(line):
    """What of pip -v's build output to show: setup.py's own lines and one line per compile."""
    line = line.strip()
    if line.startswith("fusednorm setup:"):
        return line
    compile_step = NINJA_COMPILE.match(line)
    if compile_step:
        done, total, source, obj = compile_step.groups()
        copy = os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(obj))))
        copy = copy.upper() if copy in ("avx2", "avx512", "avx512_bf16") else "plain"
        return f"  [{done}/{total}] compiled {os.path.relpath(source, ROOT)} ({copy} copy)"
    return None


def build(env=None):
    """``pip install --no-build-isolation -e .``, showing the build's progress; the whole output
    goes to build/install.log (pip alone shows nothing for minutes while it compiles)."""
    os.makedirs(os.path.dirname(BUILD_LOG), exist_ok=True)
    print("dev.py: building fusednorm (pip install --no-build-isolation -e .; full output in "
          f"{os.path.relpath(BUILD_LOG, ROOT)})", flush=True)
    env = dict(env or os.environ)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))  # else ninja runs cores + 2 per copy
    started = time.monotonic()
    tail = collections.deque(maxlen=80)
    with open(BUILD_LOG, "w") as log, subprocess.Popen(
            [*PIP_INSTALL, "-v", "--no-build-isolation", "-e", "."], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as pip_run:
        for line in pip_run.stdout:
            log.write(line)
            tail.append(line)
            shown = progress_line(line)
            if shown:
                minutes, seconds = divmod(int(time.monotonic() - started), 60)
                print(f"  {minutes:2d}:{seconds:02d} {shown}", flush=True)
    if pip_run.returncode != 0:
        sys.stdout.write("".join(tail))
        sys.exit(f"dev.py: the install failed (exit {pip_run.returncode}); the end of its output "
                 f"is above, all of it in {os.path.relpath(BUILD_LOG, ROOT)}")
    print(f"dev.py: fusednorm installed in {time.monotonic() - started:.0f} s", flush=True)


def gpu(extra_args):
    """One line and exit status 2 without CUDA; else build for this GPU and validate."""
    probe = ("import torch, sys; ok = torch.cuda.is_available(); "
             "print('%d.%d' % torch.cuda.get_device_capability() if ok else ''); "
             "sys.exit(0 if ok else 2)")
    found = (subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
             if importlib.util.find_spec("torch") else None)
    if found is None or found.returncode != 0:
        sys.exit("dev.py gpu: no CUDA device here (torch.cuda.is_available() is False); nothing run")
    # The validation's time budget counts from here: the build is part of the lent minutes.
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=found.stdout.strip(),
               MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)),
               FUSEDNORM_GPU_START=str(time.time()))
    print(f"dev.py gpu: building the CUDA extension for sm_{found.stdout.strip()}", flush=True)
    install(env)
    env.pop("TRITON_INTERPRET", None)
    sys.exit(subprocess.call([sys.executable, "tools/gpu_validate.py", *extra_args], cwd=ROOT,
                             env=env))


def main():
    commands = ("demo", "test", "install", "gpu")
    if len(sys.argv) < 2 or sys.argv[1] not in commands or (sys.argv[1] != "gpu" and len(sys.argv) != 2):
        sys.exit("usage: python3 dev.py {demo|test|install|gpu [--out DIR]}")
    if sys.argv[1] == "gpu":
        gpu(sys.argv[2:])
    # The GPU machine has no package index: only `test` asks for the models its tests convert.
    install(requirements="requirements-test.txt" if sys.argv[1] == "test" else "requirements-dev.txt")
    if sys.argv[1] == "demo":
        sys.exit(subprocess.call([sys.executable, "examples/demo.py"], cwd=ROOT))
    if sys.argv[1] == "test":
        # The interpreter lets the Triton kernels run (and be tested) on CPU tensors.
        env = dict(os.environ, TRITON_INTERPRET="1")
        sys.exit(subprocess.call(TEST_COMMAND, cwd=ROOT, env=env))


if __name__ == "__main__":
    main()
