"""The memory layout and the accumulation dtype every backend computes in: one definition, used
by the op registrations (ops.py) and the Triton launchers (the C++ side: csrc/common.cpp)."""
from __future__ import annotations

import torch


def dense_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when it is contiguous or channels-last (any number of spatial dims), else a
    contiguous copy. Every op computes in, and returns its outputs with, this tensor's strides."""
    if x.is_contiguous() or x.movedim(1, -1).is_contiguous():
        return x
    return x.contiguous()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 input, fp32 otherwise: the dtype of mean/rstd and of every reduction."""
    return torch.float64 if dtype == torch.float64 else torch.float32
