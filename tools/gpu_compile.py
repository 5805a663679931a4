#!/usr/bin/env python3
"""Compile every Triton kernel specialization the public API can launch, for real GPUs, on a
machine without one; report registers, spills and shared memory per kernel.

    python tools/gpu_compile.py                       # sm_90 and sm_80, summary to stdout
    python tools/gpu_compile.py --arch 90 --table-dir bench/results

Why this exists: CI runs the Triton kernels under ``TRITON_INTERPRET=1``, which accepts code that
Triton's compiler rejects. Here the real compiler (Triton -> PTX -> ptxas -> cubin, all shipped
with the ``triton`` wheel) runs against a stand-in driver that reports a GPU target and launches
nothing. The launchers of ``fusednorm.kernels`` run unchanged on CPU tensors, inside
``plan_as_gpu`` so that they pick the tiles, splits and warps of a GPU of that architecture's SM
count: what compiles here is what a GPU run would compile. ``cuobjdump --dump-resource-usage``
reads each cubin.

Exit status 1 when any specialization fails to compile, when a fp32/fp16/bf16 kernel spills
(a stack frame or local memory), or when a fp64 kernel takes an fp32 scalar parameter (eps and
slope must stay fp64). fp64 kernels may spill; the table says where.
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # before triton is imported: compile, do not interpret
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

# One architecture: SM count (the launch plan depends on it) and shared memory per block.
ARCHES = {
    90: dict(name="H100 (sm_90)", sm_count=132, l2_bytes=50 * 2**20, max_shared_mem=232448),
    80: dict(name="A100 (sm_80)", sm_count=108, l2_bytes=40 * 2**20, max_shared_mem=166912),
}
ACTIVATIONS = ["identity", "relu", "silu", "gelu", "gelu_tanh", ("leaky_relu", 0.1)]
# (PN on, proxy_bias given, proxy_weight given)
MODES = {
    "pn+proxy_params": (True, True, True),
    "pn+proxy_bias": (True, True, False),
    "pn+proxy_weight": (True, False, True),
    "pn": (True, False, False),
    "no_pn": (False, False, False),
}
# (input dtype, parameter dtype)
DTYPES = [("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"),
          ("float64", "float64"), ("float16", "float32"), ("bfloat16", "float32")]
# Shapes that reach distinct launch plans on a GPU: (name, shape, groups).
SHAPES = [
    ("base", (8, 64, 14, 14), 8),
    ("no_spatial", (16, 48), 4),
    ("1d", (4, 32, 100), 4),
    ("3d", (2, 16, 4, 8, 8), 4),
    ("S=1", (8, 32, 1, 1), 8),
    ("C/G=1,S=1", (4, 32, 1, 1), 32),      # CPG and S both specialize to the constant 1
    ("G=C", (4, 30, 5, 5), 30),
    ("G=1", (4, 96, 9, 9), 1),
    ("N=1", (1, 40, 7, 7), 5),
    ("S=49,odd", (3, 15, 7, 7), 5),
    ("split", (1, 64, 96, 96), 1),         # N*G=1: statistics and partials split over programs
    ("looped", (16, 128, 32, 32), 16),     # groups too large for one program, N*G fills the SMs
    ("wide", (32, 2048, 7, 7), 32),
]
INDEX_64_SHAPE = ("index_64", (1, 2 ** 15 + 16, 2 ** 8, 2 ** 8), 8)  # > 2**31 elements
@dataclasses.dataclass(frozen=True)
class Case:
    shape_name: str
    shape: tuple
    groups: int
    dtype: str
    param_dtype: str
    activation: object
    mode: str
    channels_last: bool
    path: str = "auto"  # $FUSEDNORM_TRITON_PATH: the launch rule's choice, or a forced path

    def describe(self):
        layout = "channels_last" if self.channels_last else "nchw"
        return (f"{self.shape_name} {self.shape} G={self.groups} {self.dtype}/{self.param_dtype} "
                f"{self.activation} {self.mode} {layout} path={self.path}")


def cases(full: bool = False):
    """The launches to compile. A specialization costs about 0.5 s of one core cold (Triton's
    cache makes a second run fast), so the default is a covering set that shares
    specializations:
    - every activation x dtype x PN on (with proxy parameters) / off, base shape (the math);
    - every proxy-parameter mode x dtype, with ReLU (the proxy-parameter flags);
    - every shape (edge shapes, 0-3 spatial dims, split and non-split paths) x both layouts x
      fp32/bf16, GELU, PN on (the indexing and tiling paths);
    - fp32 parameters with fp16/bf16 input, both layouts, PN on/off;
    - the looped and split paths forced on the base shape (the rule picks resident there);
    - 64-bit indexing for each dtype, both layouts.
    ``full``: the cross product of activations x modes x dtypes (mixed too) on the base shape, and
    of shapes x dtypes x layouts x {ReLU, GELU} x PN on/off (about 1800 per architecture)."""
    same = [d for d in DTYPES if d[0] == d[1]]
    mixed = [d for d in DTYPES if d[0] != d[1]]
    both_layouts = (False, True)
    out = []

    def add(shapes, dtypes, activations, modes, layouts, paths=("auto",)):
        for (name, shape, groups), (dtype, param_dtype), act, mode, cl, path in itertools.product(
                shapes, dtypes, activations, modes, layouts, paths):
            if not (cl and len(shape) == 2):  # no spatial dims: one layout
                out.append(Case(name, shape, groups, dtype, param_dtype, act, mode, cl, path))

    if full:
        add(SHAPES[:1], DTYPES, ACTIVATIONS, MODES, (False,))
        add(SHAPES, DTYPES, ["relu", "gelu"], ("pn+proxy_params", "no_pn"), both_layouts)
    else:
        add(SHAPES[:1], same, ACTIVATIONS, ("pn+proxy_params", "no_pn"), (False,))
        add(SHAPES[:1], same, ["relu"], MODES, (False,))
        add(SHAPES, [DTYPES[0], DTYPES[2]], ["gelu"], ("pn+proxy_params",), both_layouts)
        add(SHAPES[:1], mixed, ["silu"], ("pn+proxy_params", "no_pn"), both_layouts)
    # The paths $FUSEDNORM_TRITON_PATH can force where the rule would choose another.
    add(SHAPES[:1], same, ["relu", "gelu"], ("pn+proxy_params", "no_pn"), both_layouts,
        ("looped", "split"))
    add([INDEX_64_SHAPE], same, ["relu"], ("pn+proxy_params",), both_layouts)
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------------------------
# A driver that targets a GPU and launches nothing
# ----------------------------------------------------------------------------------------------
def cuobjdump_path():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the one function in a cubin (cuobjdump --dump-resource-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump_path(), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if match is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{text}")
    return dict(zip(("registers", "stack", "shared", "local"), map(int, match.groups())))


class _Utils:
    def __init__(self, arch):
        self.arch = arch

    def get_device_properties(self, device):
        props = ARCHES[self.arch]
        return {"max_shared_mem": props["max_shared_mem"], "multiprocessor_count": props["sm_count"],
                "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, cubin, shared, device):
        usage = resource_usage(cubin)
        # (module, function, n_regs, n_spills, n_max_threads), as the CUDA driver's would give
        return None, None, usage["registers"], usage["local"] // 4, 1024

    def unload_module(self, module):
        pass


class CompileOnlyDriver:
    """Triton's active-driver interface, enough for JITFunction.run: a GPU target, a device id per
    architecture, and a launcher that records the launch instead of making it."""

    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(arch)
        self.launches = []

    def get_current_device(self):
        return f"sm_{self.arch}"

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def launcher_cls(self, src, metadata):
        def launch(grid_0, grid_1, grid_2, *rest):
            self.launches.append((metadata.name, (grid_0, grid_1, grid_2)))
        return launch


# ----------------------------------------------------------------------------------------------
# Running the launchers
# ----------------------------------------------------------------------------------------------
def _inputs(case: Case, torch):
    from fusednorm.layout import accumulation_dtype
    from fusednorm.proxy import proxy_samples

    dtype, param_dtype = getattr(torch, case.dtype), getattr(torch, case.param_dtype)
    if case.shape_name == "index_64":
        # Never written or read: the launcher only needs shapes, strides and pointers.
        shape = (case.shape[0], *case.shape[2:], case.shape[1]) if case.channels_last else case.shape
        x = torch.empty(shape, dtype=dtype)
        x = x.movedim(-1, 1) if case.channels_last else x
    else:
        x = torch.randn(case.shape).to(dtype)
        x = x.movedim(1, -1).contiguous().movedim(-1, 1) if case.channels_last else x
    channels = case.shape[1]
    pn, has_proxy_bias, has_proxy_weight = MODES[case.mode]
    weight = torch.ones(channels, dtype=param_dtype)
    bias = torch.zeros(channels, dtype=param_dtype)
    proxy_bias = torch.zeros(channels, dtype=param_dtype) if has_proxy_bias else None
    proxy_weight = torch.zeros(channels, dtype=param_dtype) if has_proxy_weight else None
    samples = proxy_samples(200, dtype=accumulation_dtype(dtype), device="cpu")
    return x, weight, bias, proxy_bias, proxy_weight, samples, pn


def run_case(case: Case):
    """Forward and backward launchers of one case; compiles what they launch."""
    import torch
    from fusednorm.activations import parse_activation
    from fusednorm.kernels import group_norm_proxy_act as kernels

    act, slope = parse_activation(case.activation)
    x, weight, bias, proxy_bias, proxy_weight, samples, pn = _inputs(case, torch)
    os.environ[kernels.PATH_ENV] = case.path
    y, mean, rstd = kernels.forward(x, weight, bias, proxy_bias, proxy_weight, samples,
                                    case.groups, act.id, slope, 1e-5, 0.03, pn)
    kernels.backward(y, x, weight, bias, proxy_bias, proxy_weight, samples, mean, rstd,
                     case.groups, act.id, slope, 0.03, pn)


def compiled_kernels(device):
    """(kernel name, CompiledKernel) for every specialization compiled on ``device``."""
    import triton
    from fusednorm.kernels import group_norm_proxy_act as kernels

    for name in sorted(dir(kernels)):
        fn = getattr(kernels, name)
        if isinstance(fn, triton.runtime.JITFunction) and device in fn.device_caches:
            for compiled in fn.device_caches[device][0].values():
                yield name, compiled


def _signature_summary(compiled):
    """The element type of the kernel's first pointer (the data it streams) and its ACT."""
    src = compiled.src
    dtype = next((ty[1:] for ty in src.signature.values() if isinstance(ty, str)
                  and ty.startswith("*")), "?")
    act = None
    for key, value in src.constants.items():
        names = [src.fn.arg_names[i] for i in key] if isinstance(key, tuple) else [key]
        if names == ["ACT"]:
            act = value
    return dtype, act


def _f32_params(ptx: str) -> int:
    """fp32 scalar parameters of the kernel's entry: an fp64 kernel must have none (eps, slope
    and the like must reach it in fp64)."""
    entry = ptx[ptx.index(".entry"):]
    return entry[:entry.index(")")].count(".param .f32")


def compile_arch(arch: int, full: bool):
    """Compile every case for one architecture; returns (rows, failures, launches, seconds)."""
    import torch
    from triton.runtime import driver
    from fusednorm.activations import parse_activation
    from fusednorm.kernels.group_norm_proxy_act import plan_as_gpu

    torch.set_num_threads(1)
    fake = CompileOnlyDriver(arch)
    driver.set_active(fake)
    start = time.perf_counter()
    failures = []
    first_case = {}  # id(compiled kernel) -> the case that first compiled it
    with plan_as_gpu(ARCHES[arch]["sm_count"], ARCHES[arch]["l2_bytes"]):
        for case in cases(full):
            try:
                run_case(case)
            except Exception:  # noqa: BLE001 - every failure is reported, with its case
                failures.append((case.describe(), traceback.format_exc(limit=3)))
            for _, compiled in compiled_kernels(fake.get_current_device()):
                first_case.setdefault(id(compiled), case.describe())
    names = {parse_activation(a)[0].id: parse_activation(a)[0].name for a in ACTIVATIONS}
    rows = []
    for name, compiled in compiled_kernels(fake.get_current_device()):
        usage = resource_usage(compiled.asm["cubin"])
        dtype, act = _signature_summary(compiled)
        rows.append(dict(arch=arch, kernel=name.lstrip("_"), dtype=dtype,
                         activation=names.get(act, "-"), num_warps=compiled.metadata.num_warps,
                         f32_params=_f32_params(compiled.asm["ptx"]),
                         case=first_case.get(id(compiled), "?"), **usage))
    return rows, failures, len(fake.launches), time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------
def summarize(rows):
    """Per (arch, kernel, dtype): specializations, register range, worst stack/local/shared."""
    groups = {}
    for row in rows:
        groups.setdefault((row["arch"], row["kernel"], row["dtype"]), []).append(row)
    out = []
    for (arch, kernel, dtype), items in sorted(groups.items()):
        worst = max(items, key=lambda r: (r["local"], r["stack"], r["registers"]))
        out.append(dict(arch=arch, kernel=kernel, dtype=dtype, specializations=len(items),
                        reg_min=min(r["registers"] for r in items),
                        reg_max=max(r["registers"] for r in items),
                        stack_max=max(r["stack"] for r in items),
                        local_max=max(r["local"] for r in items),
                        shared_max=max(r["shared"] for r in items),
                        warps=",".join(str(w) for w in sorted({r["num_warps"] for r in items})),
                        worst_activation=worst["activation"]))
    return out


def fp64_scalar_violations(rows):
    """fp64 specializations that take an fp32 scalar parameter."""
    return [r for r in rows if r["dtype"] == "fp64" and r["f32_params"]]


def spill_violations(rows):
    """Specializations of fp32/fp16/bf16 kernels that use local memory (fp64 may)."""
    return [r for r in rows if r["dtype"] != "fp64" and (r["local"] > 0 or r["stack"] > 0)]


def format_table(summary, arch) -> str:
    header = ("kernel", "dtype", "specs", "registers", "stack B", "local B", "shared B", "warps",
              "worst act")
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for s in summary:
        if s["arch"] != arch:
            continue
        regs = f"{s['reg_min']}-{s['reg_max']}" if s["reg_min"] != s["reg_max"] else str(s["reg_max"])
        lines.append(f"| {s['kernel']} | {s['dtype']} | {s['specializations']} | {regs} | "
                     f"{s['stack_max']} | {s['local_max']} | {s['shared_max']} | {s['warps']} | "
                     f"{s['worst_activation']} |")
    return "\n".join(lines)


def write_tables(table_dir: Path, summary, rows, meta):
    table_dir.mkdir(parents=True, exist_ok=True)
    for arch in sorted({r["arch"] for r in rows}):
        arch_rows = [r for r in rows if r["arch"] == arch]
        fp64 = [r for r in arch_rows if r["dtype"] == "fp64" and (r["local"] or r["stack"])]
        spills = spill_violations(arch_rows)
        text = [f"# Triton kernels of fusednorm compiled for {ARCHES[arch]['name']}",
                "",
                f"Made by `python tools/gpu_compile.py` ({meta}), no GPU involved: Triton's compiler",
                "and ptxas for the target, then `cuobjdump --dump-resource-usage` on each cubin.",
                "One row per kernel and streamed dtype over all the specializations the public API",
                "launches (activations, PN modes, proxy parameters, layouts, shapes; see the tool).",
                "'stack B' is the stack frame ptxas gives spilled registers, 'local B' local",
                "memory, both per thread; fp32/fp16/bf16 must have neither.",
                f"fp64 specializations with spills: {len(fp64)} of "
                f"{sum(r['dtype'] == 'fp64' for r in arch_rows)}.",
                f"fp32/fp16/bf16 specializations with spills: {len(spills)} of "
                f"{sum(r['dtype'] != 'fp64' for r in arch_rows)}"
                + "".join(f"\n- {r['kernel']} {r['dtype']} {r['activation']}: {r['stack']} B stack, "
                          f"{r['registers']} registers, {r['num_warps']} warps" for r in spills),
                "",
                format_table(summary, arch), ""]
        (table_dir / f"triton-resources-sm{arch}.md").write_text("\n".join(text))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCHES),
                        help="compute capability x10, repeatable (default: 90 and 80)")
    parser.add_argument("--full", action="store_true",
                        help="the full cross product (about 1800 specializations per "
                             "architecture, ~15 min cold on one core) instead of the covering set")
    parser.add_argument("--table-dir", type=Path,
                        help="write triton-resources-sm<arch>.md there (e.g. bench/results)")
    args = parser.parse_args(argv)
    arches = args.arch or [90, 80]

    import triton
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=len(arches)) as pool:
        results = list(pool.map(compile_arch, arches, [args.full] * len(arches)))
    rows = [row for r in results for row in r[0]]
    failures = [(arch, *f) for arch, r in zip(arches, results) for f in r[1]]
    for arch, r in zip(arches, results):
        print(f"sm_{arch}: {len(cases(args.full))} cases, {r[2]} launches, {len(r[0])} "
              f"specializations compiled, {len(r[1])} failures, {r[3]:.0f} s")
    summary = summarize(rows)
    for arch in arches:
        print(f"\nsm_{arch}:\n{format_table(summary, arch)}")
    spills = spill_violations(rows)
    for row in spills:
        print(f"SPILL sm_{row['arch']} {row['kernel']} {row['dtype']} {row['activation']}: "
              f"local {row['local']} B, stack {row['stack']} B, {row['registers']} registers, "
              f"{row['num_warps']} warps; first compiled by: {row['case']}")
    narrowed = fp64_scalar_violations(rows)
    for row in narrowed:
        print(f"FP32 SCALAR sm_{row['arch']} {row['kernel']} fp64: {row['f32_params']} "
              f"fp32 parameters")
    for arch, case, error in failures:
        print(f"FAILED sm_{arch} {case}\n{error}")
    if args.table_dir:
        meta = f"triton {triton.__version__}"
        write_tables(args.table_dir, summary, rows, meta)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 1 if failures or spills or narrowed else 0


if __name__ == "__main__":
    sys.exit(main())
