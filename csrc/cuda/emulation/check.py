"""Runs the CUDA launchers and kernels of csrc/cuda on the CPU, in emulation, against the C++ CPU
kernel: a check of their logic (indexing, split paths, reduction order, layouts, dtypes) on a
machine without a GPU. Not a test of the GPU itself: no timing, no memory model, no real warps.

    python csrc/cuda/emulation/check.py [--quick]

The .cu files are copied as C++ with each kernel<<<grid, block, ...>>>(args) launch replaced by
emulated_launch(&kernel, grid, block, args) (emulate.h), and their ops registered as
fusednorm_emulated::forward/backward on CPU tensors. Needs the extension's CPU kernel
(pip install --no-build-isolation -e .) and a C++20 compiler; the build takes about a minute.
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
import re
import sys
import tempfile
import time

import torch
import torch.utils.cpp_extension as cpp_extension

HERE = pathlib.Path(__file__).resolve().parent
CUDA_DIR = HERE.parent
CSRC = CUDA_DIR.parent
REPO = CSRC.parent
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def split_top_level(text: str) -> list[str]:
    """Split at the commas outside any brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{<"
        depth -= char in ")]}>"
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return parts + [current.strip()]


def emulated_source(path: pathlib.Path) -> str:
    text = re.sub(r"#include <c10/cuda/[^>]*>\n", "", path.read_text())

    def launch(match):
        grid, block = split_top_level(match.group(2))[:2]
        return f"emulated_launch(&{match.group(1)}, dim3({grid}), dim3({block}), "

    text = LAUNCH.sub(launch, text)
    return text.replace("TORCH_LIBRARY_IMPL(fusednorm, CUDA, m)",
                        "TORCH_LIBRARY_IMPL(fusednorm_emulated, CPU, m)")


def library_source() -> str:
    """The schemas of csrc/fusednorm.cpp, as the fusednorm_emulated library."""
    text = (CSRC / "fusednorm.cpp").read_text()
    block = re.search(r"TORCH_LIBRARY\(fusednorm, m\) \{.*?\n\}", text, re.S).group(0)
    return "#include <torch/library.h>\n" + block.replace("(fusednorm, m)", "(fusednorm_emulated, m)")


def build(directory: pathlib.Path) -> None:
    (directory / "stub").mkdir()
    (directory / "stub" / "cuda_runtime.h").write_text("")
    sources = [str(CSRC / "common.cpp"), str(CSRC / "proxy.cpp")]
    for cu in sorted(CUDA_DIR.glob("*.cu")):
        target = directory / (cu.stem + ".cpp")
        target.write_text(emulated_source(cu))
        sources.append(str(target))
    (directory / "library.cpp").write_text(library_source())
    sources.append(str(directory / "library.cpp"))
    cpp_extension.load(
        name="fusednorm_emulated", sources=sources, build_directory=str(directory),
        extra_cflags=["-include", str(HERE / "emulate.h"), f"-I{directory / 'stub'}",
                      f"-I{CUDA_DIR}", "-std=c++20", "-O1", "-pthread"],
        extra_ldflags=["-pthread"], is_python_module=False, verbose=False)


def run_op(namespace, x, params, groups, activation, proxy, grad):
    args = (x, params["weight"], params["bias"], params.get("proxy_bias"),
            params.get("proxy_weight"), groups, activation, 0.1, 1e-5, 0.03, 50, proxy)
    y, mean, rstd = namespace.forward(*args)
    return (y, mean, rstd,
            *namespace.backward(grad, *args[:5], mean, rstd, groups, activation, 0.1, 0.03, 50,
                                proxy))


OUTPUTS = ["y", "mean", "rstd", "dx", "dweight", "dbias", "dproxy_bias", "dproxy_weight"]
# (shape, groups); with 2 emulated SMs (8 target blocks) the last ones take the split paths.
SHAPES = [((2, 12, 5, 7), 3), ((4, 12), 3), ((3, 8, 1, 1), 4), ((2, 30, 3, 5), 5),
          ((2, 8, 11), 4), ((2, 8, 3, 4, 5), 2), ((5, 64, 3, 3), 32), ((1, 70, 6, 6), 7),
          ((1, 4, 40, 40), 1), ((1, 2, 64, 64), 1)]
DTYPES = [(torch.float32, None), (torch.float16, torch.float32), (torch.bfloat16, None),
          (torch.bfloat16, torch.float32)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ReLU and SiLU only, fewer shapes")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    import fusednorm  # noqa: F401  (registers torch.ops.fusednorm)
    from conftest import make_inputs, to_layout

    with tempfile.TemporaryDirectory() as directory:
        start = time.time()
        build(pathlib.Path(directory))
        print(f"built the emulation in {time.time() - start:.0f} s")
        emulated, reference = torch.ops.fusednorm_emulated, torch.ops.fusednorm
        shapes = SHAPES[::3] + SHAPES[-1:] if args.quick else SHAPES
        activations = [1, 2] if args.quick else range(6)
        failures = 0
        cases = itertools.product(shapes, activations, ["proxy_params", "pn", "no_pn"],
                                  [False, True], [(torch.float64, None)] + DTYPES)
        for (shape, groups), act, mode, channels_last, (dtype, param_dtype) in cases:
            if dtype != torch.float64 and (act != 2 or mode != "proxy_params"):
                continue  # low precision: one activation and mode is enough
            x, params = make_inputs(shape, dtype=dtype, param_dtype=param_dtype,
                                    proxy_params=mode == "proxy_params",
                                    channels_last=channels_last)
            x, params = x.detach(), {k: v.detach() for k, v in params.items()}
            grad = to_layout(torch.randn(shape, dtype=torch.float64), channels_last).to(dtype)
            got = run_op(emulated, x, params, groups, act, mode != "no_pn", grad)
            want = run_op(reference, x, params, groups, act, mode != "no_pn", grad)
            tolerance = 1e-10 if dtype == torch.float64 else 1e-2
            for name, a, b in zip(OUTPUTS, got, want):
                scale = max(1.0, b.double().abs().max().item())
                error = (a.double() - b.double()).abs().max().item() / scale
                if a.dtype != b.dtype or a.stride() != b.stride() or not error <= tolerance:
                    failures += 1
                    print(f"MISMATCH {shape} G={groups} act={act} {mode} "
                          f"channels_last={channels_last} {dtype}: {name} error {error:.2e}, "
                          f"dtype {a.dtype}/{b.dtype}, strides {a.stride()}/{b.stride()}")
        print(f"{'FAILED' if failures else 'OK'}: emulated CUDA kernels vs CPU kernel, "
              f"{time.time() - start:.0f} s")
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
