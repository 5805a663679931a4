"""Build and install fusednorm: the Python package and the C++/CUDA extension ``fusednorm._C``.

The extension is built with torch.utils.cpp_extension, so torch must be importable while
building: install torch first, then ``pip install --no-build-isolation -e .``. Without torch the
build stops at once and says how to get it (it never lets pip resolve a torch of its own: that
would be a CUDA build of several GB). It always holds the CPU kernels; the CUDA kernels are added
when torch is a CUDA build and nvcc is found (CUDA_HOME or PATH). Nothing here asks whether a GPU
is present, so a CUDA extension can be built on a machine without one.

Environment:
  FUSEDNORM_NO_EXTENSION=1  no compiled code at all (pure-Python install: Triton + reference)
  FUSEDNORM_NO_CUDA=1       CPU extension only
  FUSEDNORM_CPU_KERNEL_COPIES  which instruction-set copies of the CPU kernels to build besides the
                            plain one: "native" (the one this CPU runs: the default, except for
                            wheels), "all" (AVX2, AVX512, AVX512_BF16: the default of
                            `pip wheel`/bdist_wheel, whose wheel may run on other CPUs), "none",
                            or a comma list of names
  FUSEDNORM_DEBUG=1         keep debug info (-g: a ~10x larger library); default -g0
  FUSEDNORM_BUILD_DIR       where object files are kept between builds (default: build/temp)
  MAX_JOBS                  parallel compile jobs (read by torch.utils.cpp_extension)
  TORCH_CUDA_ARCH_LIST      GPU architectures, e.g. "8.0;9.0" (read by torch.utils.cpp_extension)
"""
import concurrent.futures
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import time

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _torch_requirement():
    """The pinned torch (``torch==X``) of requirements-torch.txt, where dev.py reads it too."""
    with open(os.path.join(ROOT, "requirements-torch.txt")) as lines:
        return next(line.strip() for line in lines if line.strip().startswith("torch"))


TORCH_MISSING = f"""fusednorm setup: torch is not importable here ({sys.executable}).
The extension is compiled against the installed torch, so install torch first, then build
fusednorm without build isolation (pip's isolated build environment has no torch):
    CPU-only machine:  pip install {_torch_requirement()} --index-url https://download.pytorch.org/whl/cpu
    CUDA machine:      pip install {_torch_requirement()}
    then:              pip install --no-build-isolation -e .
(`python3 dev.py install` does all of this. FUSEDNORM_NO_EXTENSION=1 installs without compiled
code, and still needs torch to run.)"""

install_requires = ["numpy"]
if importlib.util.find_spec("triton") is None:
    install_requires.append("triton")

CPU_SOURCES = [
    "csrc/fusednorm.cpp",
    "csrc/autograd.cpp",
    "csrc/common.cpp",
    "csrc/proxy.cpp",
    "csrc/cpu/fusednorm_cpu.cpp",
    "csrc/cpu/forward.cpp",
    "csrc/cpu/backward.cpp",
    "csrc/cpu/proxy_kernels.cpp",
]
CUDA_SOURCES = ["csrc/cuda/fusednorm_cuda.cu", "csrc/cuda/forward.cu", "csrc/cuda/backward.cu"]
# Compiled again for each x86-64 instruction set below, picked at run time (ATen's scheme):
# one binary that runs everywhere and uses AVX2/AVX-512 where the CPU has them.
PER_CAPABILITY_SOURCES = ["csrc/cpu/forward.cpp", "csrc/cpu/backward.cpp",
                          "csrc/cpu/proxy_kernels.cpp"]
# name of the copy: (ATen's capability it is compiled as, its flags: those ATen compiles its own
# AVX2/AVX512 kernels with).
# GCC 12 takes ATen's AVX-512 headers' _mm512_undefined_* for uninitialized reads: ~2900 false
# warnings per build, hiding everything else.
_AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                 "-Wno-maybe-uninitialized", "-Wno-uninitialized"]
CPU_KERNEL_COPIES = {
    "AVX2": ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
    "AVX512": ("AVX512", _AVX512_FLAGS),
    # AVX-512 and the fp32 -> bf16 conversion instruction (Cooper Lake, Sapphire Rapids, Zen 4),
    # used only on CPUs that have it: ATen rounds in ~10 integer instructions per 16 values, and
    # bf16 kernels that are not memory-bound ran ~20% faster with the instruction.
    "AVX512_BF16": ("AVX512", _AVX512_FLAGS + ["-mavx512bf16"]),
}


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _progress(message):
    """A line that dev.py shows while pip builds (pip -v passes it through)."""
    print(f"fusednorm setup: {message}", file=sys.stderr, flush=True)


def _warn(message):
    print(f"fusednorm setup: warning: {message}", file=sys.stderr)


def _compiler_accepts(flags, source):
    """Whether the C++ compiler ($CXX, else c++) compiles ``source`` with ``flags``."""
    compiler = os.environ.get("CXX", "c++")
    try:
        result = subprocess.run([compiler, *flags, "-x", "c++", "-fsyntax-only", "-"],
                                input=source, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _native_copy():
    """The copy this CPU will run: the instruction set ATen picks here (torch's own CPU check),
    and AVX512_BF16 where the CPU also has AVX512-BF16 (Linux: /proc/cpuinfo)."""
    import torch
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return None  # DEFAULT (or a non-x86 capability): the plain copy is the one
    if capability == "AVX512":
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                if any(line.startswith("flags") and "avx512_bf16" in line.split()
                       for line in cpuinfo):
                    return "AVX512_BF16"
        except OSError:
            pass
    return capability


def _cpu_capabilities():
    """The instruction sets to build extra copies of the CPU kernels for (x86-64, GCC/Clang).

    Each copy costs 1.5-3 minutes of a 2-core build. The kernels run the best copy the CPU has
    (the plain one where none was built), so a development install builds the one this CPU runs;
    a wheel may run on any x86-64 CPU, so bdist_wheel builds them all."""
    if sys.platform == "win32" or platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    default = "all" if "bdist_wheel" in sys.argv else "native"
    chosen = os.environ.get("FUSEDNORM_CPU_KERNEL_COPIES", default).strip()
    if chosen.lower() == "all":
        capabilities = dict(CPU_KERNEL_COPIES)
    elif chosen.lower() == "native":
        native = _native_copy()
        capabilities = {native: CPU_KERNEL_COPIES[native]} if native else {}
    else:
        names = [name.strip().upper() for name in chosen.split(",")]
        names = [name for name in names if name not in ("", "NONE")]
        unknown = sorted(set(names) - set(CPU_KERNEL_COPIES))
        if unknown:
            sys.exit(f"fusednorm setup: FUSEDNORM_CPU_KERNEL_COPIES={chosen!r}: unknown "
                     f"{', '.join(unknown)} (known: {', '.join(CPU_KERNEL_COPIES)}, or all, "
                     "native, none)")
        capabilities = {name: CPU_KERNEL_COPIES[name] for name in names}
    if "AVX512_BF16" not in capabilities:
        return capabilities
    bf16_probe = ("#include <immintrin.h>\n"
                  "__m512bh f(__m512 a, __m512 b) { return _mm512_cvtne2ps_pbh(a, b); }\n")
    if not _compiler_accepts(capabilities["AVX512_BF16"][1], bf16_probe):
        _warn("the C++ compiler lacks -mavx512bf16 (GCC >= 10, Clang >= 9): bf16 kernels will "
              "round with ATen's conversion on every CPU")
        del capabilities["AVX512_BF16"]
    return capabilities


def _check_wheel_support():
    """setuptools < 70.1 builds wheels (and editable installs) only with the `wheel` package, which
    a --no-build-isolation install does not add: say so before pip fails with 'invalid command
    bdist_wheel'."""
    import setuptools
    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    if (major, minor) < (70, 1) and importlib.util.find_spec("wheel") is None:
        sys.exit(f"fusednorm setup: setuptools {setuptools.__version__} without the `wheel` package "
                 "cannot build a wheel or an editable install: `pip install -U setuptools` "
                 "(>= 70.1) or `pip install wheel`, then install again.")


def _find_nvcc(cpp_extension):
    if cpp_extension.CUDA_HOME:
        nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        if os.path.exists(nvcc):
            return nvcc
    return shutil.which("nvcc")


def _want_cuda(torch, cpp_extension):
    if _env_flag("FUSEDNORM_NO_CUDA"):
        print("fusednorm setup: FUSEDNORM_NO_CUDA=1: building the CPU extension only")
        return False
    if torch.version.cuda is None:
        return False  # a CPU (or ROCm) build of torch: nothing to link CUDA kernels against
    if _find_nvcc(cpp_extension) is None:
        _warn(f"torch {torch.__version__} is a CUDA build but nvcc was not found (set CUDA_HOME); "
              "building the CPU extension only")
        return False
    return True


def _extension_setup():
    """ext_modules and cmdclass for setup(), or {} when no extension is built."""
    if _env_flag("FUSEDNORM_NO_EXTENSION"):
        print("fusednorm setup: FUSEDNORM_NO_EXTENSION=1: installing without compiled code")
        return {}
    if importlib.util.find_spec("torch") is None:
        if "sdist" in sys.argv:
            return {}  # a source archive compiles nothing
        sys.exit(TORCH_MISSING)
    _check_wheel_support()
    import torch
    from torch.utils import cpp_extension

    cxx_flags = ["-O3", "-Wno-unknown-pragmas"]  # torch's vector headers carry CUDA-only pragmas
    # Python's own CFLAGS carry -g: with it the library is ~160 MB of debug info, without ~3 MB.
    cxx_flags.append("-g" if _env_flag("FUSEDNORM_DEBUG") else "-g0")
    link_flags = []
    if torch.backends.openmp.is_available():  # at::parallel_for is inline: it needs OpenMP here
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    capabilities = _cpu_capabilities()
    macros = [(f"FUSEDNORM_HAVE_{name}", None) for name in capabilities]

    if _want_cuda(torch, cpp_extension):
        macros.append(("FUSEDNORM_WITH_CUDA", None))
        extension = cpp_extension.CUDAExtension(
            "fusednorm._C", CPU_SOURCES + CUDA_SOURCES, define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags)
    else:
        extension = cpp_extension.CppExtension(
            "fusednorm._C", CPU_SOURCES, define_macros=macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    extension.cpu_capabilities = capabilities
    return {"ext_modules": [extension], "cmdclass": {"build_ext": _build_ext_class(cpp_extension)}}


def _build_ext_class(cpp_extension):
    class BuildExtension(cpp_extension.BuildExtension):
        """cpp_extension's builder, plus one more object of each PER_CAPABILITY_SOURCES file per
        CPU instruction set, compiled with that set's flags, -DCPU_CAPABILITY=<ATen's name> and
        -DFUSEDNORM_KERNELS=<name>.

        Objects go to build/temp (FUSEDNORM_BUILD_DIR) even for editable installs, which would
        otherwise compile in a new temporary folder each time: ninja then rebuilds only the
        sources that changed."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.environ.get("FUSEDNORM_BUILD_DIR",
                                             os.path.join(ROOT, "build", "temp"))

        def build_extension(self, ext):
            copies = getattr(ext, "cpu_capabilities", {})
            jobs = os.environ.get("MAX_JOBS") or "ninja's default number of"
            _progress(f"building fusednorm._C: {len(ext.sources)} shared sources and the plain "
                      f"copy of the CPU kernels, and {len(PER_CAPABILITY_SOURCES)} sources for "
                      f"each other copy ({', '.join(copies) or 'none'}), side by side, {jobs} "
                      f"parallel jobs each (MAX_JOBS); objects in {self.build_temp}, so a "
                      "rebuild compiles only what changed")
            started = time.monotonic()
            # Each copy is one ninja run with its own flags; run side by side with the shared
            # sources' run, they keep every core busy (one after another, the last sources of
            # each run left a core idle: 7 minutes instead of 5 for three copies on 2 cores).
            with concurrent.futures.ThreadPoolExecutor(max(1, len(copies))) as pool:
                compiling = [pool.submit(self._compile_copy, ext, name, started)
                             for name in copies]
                link = self.compiler.link_shared_object

                def link_after_the_copies(objects, *args, **kwargs):
                    copy_objects = [obj for done in compiling for obj in done.result()]
                    _progress(f"linking ({time.monotonic() - started:.0f} s so far)")
                    # After the plain objects on the link line: for inline code that every
                    # copy emits, the linker keeps the first, the one without AVX instructions.
                    return link(list(objects) + copy_objects, *args, **kwargs)

                self.compiler.link_shared_object = link_after_the_copies
                try:
                    super().build_extension(ext)
                finally:
                    self.compiler.link_shared_object = link
            _progress(f"built fusednorm._C in {time.monotonic() - started:.0f} s")

        def _compile_copy(self, ext, name, started):
            """One copy's objects, compiled with its flags, -DCPU_CAPABILITY=<ATen's name> and
            -DFUSEDNORM_KERNELS=<name>."""
            aten_capability, flags = CPU_KERNEL_COPIES[name]
            # ext.extra_compile_args already carries torch's own flags (ABI, extension name),
            # added by build_extensions before this runs. ATen's vector types follow
            # CPU_CAPABILITY; the kernels' namespace is the copy's name.
            post_args = list(ext.extra_compile_args["cxx"]) + flags + [
                f"-DCPU_CAPABILITY={aten_capability}", f"-DCPU_CAPABILITY_{aten_capability}",
                f"-DFUSEDNORM_KERNELS={name}"]
            objects = self.compiler.compile(
                PER_CAPABILITY_SOURCES, output_dir=os.path.join(self.build_temp, name.lower()),
                macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs=post_args, depends=ext.depends)
            _progress(f"compiled the {name} copy ({time.monotonic() - started:.0f} s so far)")
            return objects

    return BuildExtension


# Metadata and packages are in pyproject.toml; this file adds what must be computed at build
# time: the dependencies and the extension.
setup(install_requires=install_requires, **_extension_setup())
