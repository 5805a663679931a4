"""Timing and memory measurements (do_bench-style: caches flushed before each repeat, warm-up
calls first, one time per repeat), shared by the benchmarks."""
from __future__ import annotations

import ctypes
import time
from typing import Callable, Optional

import numpy as np
import torch



Forward = Callable[[torch.Tensor], torch.Tensor]


# Measurements
# ----------------------------------------------------------------------------------------------
class Timer:
    """Milliseconds of each of ``repeats`` calls, after ``warmup`` untimed ones. The caches are
    flushed before each repeat (as triton.testing.do_bench flushes the L2 on CUDA) so that no
    repeat reads what the previous one left there. CUDA: CUDA events; CPU: time.perf_counter."""

    def __init__(self, device):
        self.device = device
        # Larger than the last-level cache: an H100/H200 L2 is 50-60 MB, a server L3 32-256 MB.
        self.cache_flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def __call__(self, fn, warmup: int, repeats: int) -> list[float]:
        for _ in range(warmup):
            fn()
        return [self.once(fn) for _ in range(repeats)]

    def once(self, fn) -> float:
        """Milliseconds of one call after a cache flush (the interleaved benchmark times its
        providers one call at a time, in turn)."""
        self.cache_flush.zero_()
        if self.device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


def keep_freed_cpu_memory() -> Optional[str]:
    """Keep freed memory in glibc's heap: no mmap per large block, no trimming. Otherwise whether a
    repeat pays first-touch page faults for its outputs depends on glibc's heuristics, not on the
    provider, and CPU timings turn bimodal; this is the CPU analogue of PyTorch's caching
    allocator on CUDA. Returns the settings made, None where glibc is not there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    if libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1):
        return "glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2**31-1"
    return None


def copy_bandwidth_gbps(device, timer, warmup: int, repeats: int) -> float:
    """Device memory bandwidth as a copy sees it: 2 * bytes / time of dst.copy_(src)."""
    nbytes = (256 if device.type == "cuda" else 64) * 2**20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = float(np.median(timer(lambda: dst.copy_(src), warmup, repeats)))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def saved_bytes(forward: Forward, x: torch.Tensor) -> int:
    """Bytes of the unique storages that one forward saves for backward."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward(x)
    return sum(storages.values())


def peak_memory_bytes(fn) -> int:
    """Peak CUDA memory one call allocates above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def timed_call(mode: str, forward: Forward, x, params, grad_y):
    """The callable one repeat of ``mode`` runs. torch.autograd.grad, not .backward(), so no
    repeat pays for accumulating into .grad."""
    inputs = [x, *params]
    if mode == "fwd":
        return lambda: forward(x)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(x), inputs, grad_y)
    y = forward(x)  # backward only: the forward runs once, outside the timing
    return lambda: torch.autograd.grad(y, inputs, grad_y, retain_graph=True)
