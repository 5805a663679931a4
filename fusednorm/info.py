"""What this installation of fusednorm has: ``fusednorm.info()`` or ``python -m fusednorm``."""
from __future__ import annotations

import platform

import torch

from . import ops


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor field: the host every CPU
    number is reported with."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info() -> dict:
    """Versions, the backends that can run here, the CPU kernels' instruction set and the GPU."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    backends = {
        "cpu": ops.extension_has_kernel("cpu"),
        "cuda": cuda and ops.extension_has_kernel("cuda"),
        "triton": ops.triton_available() and cuda,
        "triton on CPU tensors (TRITON_INTERPRET=1)": ops.triton_available(),
        "reference": True,
    }
    if ops.EXTENSION_IMPORT_ERROR is None:
        from . import _C
        cpu_isa = _C.cpu_capability()
    else:
        cpu_isa = None
    from . import __version__
    return {
        "fusednorm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda,
        "triton": triton_version,
        "extension": ("built" if ops.EXTENSION_IMPORT_ERROR is None
                      else f"not built ({ops.EXTENSION_IMPORT_ERROR})"),
        "extension kernels": [d for d in ("cpu", "cuda") if ops.extension_has_kernel(d)],
        "CPU instruction set (C++ kernels)": cpu_isa,
        "GPU": (f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
                if cuda else None),
        "backends that run here": [name for name, ok in backends.items() if ok],
    }


def format_info(values: dict) -> str:
    width = max(map(len, values))
    return "\n".join(f"{name:<{width}}  {value}" for name, value in values.items())
