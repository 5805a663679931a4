#!/usr/bin/env python3
"""Set up this checkout and run it: ``python3 dev.py demo`` or ``python3 dev.py test``.

Installs what is missing into the running Python (use a venv if you want isolation): torch 2.13.0
only when no torch is importable (an installed torch, CPU or CUDA, is never replaced), the
development requirements, then fusednorm itself in editable mode with its C++ extension.
"""
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
TEST_COMMAND = [sys.executable, "-m", "pytest", "tests", "bench", "-q", "-p", "no:cacheprovider"]


def pip(*args):
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                           "--no-input", *args], cwd=ROOT)


def install():
    if importlib.util.find_spec("torch") is None:
        pip("torch==2.13.0")
    pip("-r", "requirements-dev.txt")
    pip("--no-build-isolation", "-e", ".")


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in ("demo", "test", "install"):
        sys.exit("usage: python3 dev.py {demo|test|install}")
    install()
    if sys.argv[1] == "demo":
        sys.exit(subprocess.call([sys.executable, "examples/demo.py"], cwd=ROOT))
    if sys.argv[1] == "test":
        # The interpreter lets the Triton kernels run (and be tested) on CPU tensors.
        env = dict(os.environ, TRITON_INTERPRET="1")
        sys.exit(subprocess.call(TEST_COMMAND, cwd=ROOT, env=env))


if __name__ == "__main__":
    main()
