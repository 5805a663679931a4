"""Installs: the extension is really built (never a silent fallback to the eager reference), a
fresh venv with the newest setuptools and its bundled pip gets the `cpu` backend, and a missing
extension is loud."""
import contextlib
import os
import shutil
import subprocess
import sys
import venv
import warnings
from pathlib import Path

import pytest
import torch

import fusednorm
from fusednorm import functional, ops

ROOT = Path(__file__).resolve().parent.parent


def test_extension_is_built():
    """CI installs with the extension (unless FUSEDNORM_NO_EXTENSION=1): assert it is there."""
    if os.environ.get("FUSEDNORM_NO_EXTENSION", "") not in ("", "0"):
        pytest.skip("FUSEDNORM_NO_EXTENSION is set: this install has no extension on purpose")
    assert ops.EXTENSION_IMPORT_ERROR is None, f"fusednorm._C did not import: {ops.EXTENSION_IMPORT_ERROR}"
    assert ops.extension_has_kernel("cpu")
    assert functional.select_backend("auto", torch.empty(1, 2)) == "cpu"


@pytest.fixture
def without_extension(monkeypatch):
    monkeypatch.setattr(ops, "_EXTENSION_KERNELS", {"cpu": False, "cuda": False})
    monkeypatch.setattr(ops, "EXTENSION_IMPORT_ERROR", ImportError("no module named fusednorm._C"))
    monkeypatch.setattr(functional, "_warned_fallback", set())
    monkeypatch.delenv("FUSEDNORM_NO_EXTENSION", raising=False)
    monkeypatch.delenv("FUSEDNORM_BACKEND", raising=False)


def test_missing_extension_warns_once(without_extension):
    x = torch.randn(2, 4, 3)
    with pytest.warns(RuntimeWarning, match=r"fusednorm\._C is not built.*eager reference.*"
                                            r"pip install --no-build-isolation"):
        y = fusednorm.group_norm_proxy_act(x, 2)
    torch.testing.assert_close(y, fusednorm.reference.group_norm_proxy_act(x, 2))
    with warnings_as_errors():
        fusednorm.group_norm_proxy_act(x, 2)  # once is enough


def test_no_extension_on_purpose_is_quiet(without_extension, monkeypatch):
    monkeypatch.setenv("FUSEDNORM_NO_EXTENSION", "1")
    with warnings_as_errors():
        fusednorm.group_norm_proxy_act(torch.randn(2, 4, 3), 2)


@contextlib.contextmanager
def warnings_as_errors():
    """A block in which any warning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_info_lists_versions_backends_and_isa():
    values = fusednorm.info()
    assert values["torch"] == torch.__version__
    assert "reference" in values["backends that run here"]
    if ops.extension_has_kernel("cpu"):
        assert "cpu" in values["backends that run here"]
        assert values["CPU instruction set (C++ kernels)"] in (
            "DEFAULT", "AVX2", "AVX512", "AVX512_BF16")
    out = subprocess.run([sys.executable, "-m", "fusednorm"], capture_output=True, text=True,
                         check=True).stdout
    assert "backends that run here" in out and torch.__version__ in out


def test_module_names_its_channel_mismatch():
    module = fusednorm.GroupNormProxyAct(5, 30)
    with pytest.raises(ValueError, match=r"GroupNormProxyAct\(5, 30\): the input has 40 channels "
                                         r".* where the module expects 30"):
        module(torch.randn(2, 40, 3, 3))
    with pytest.raises(ValueError, match=r"GroupNormAct\(4, 8\): the input has 6 channels"):
        fusednorm.GroupNormAct(4, 8)(torch.randn(2, 6, 3))


def test_analysis_help_shows_every_flag_with_its_default():
    out = subprocess.run([sys.executable, "-m", "fusednorm.analysis", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--norms", "--depth", "--width", "--groups", "--activation", "--batch", "--size",
                 "--padding", "--seed", "--out", "--dpi"):
        assert flag in out
    assert out.count("(default:") >= 11


def _venv_seeing_this_torch(env_dir):
    """A fresh venv (its bundled pip and setuptools) whose interpreter also finds this
    interpreter's site-packages, after its own: torch and triton are not downloaded again.
    Not ``--system-site-packages``: run from inside a venv, that exposes the *base* Python's
    packages (no torch there), and pip then resolves a CUDA torch of its own."""
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    ours = [path for path in sys.path if path.endswith("site-packages") and os.path.isdir(path)]
    (Path(own) / "parent_site_packages.pth").write_text("\n".join(ours) + "\n")
    return str(python)


def test_fresh_venv_with_newest_setuptools_gets_the_cpu_backend(tmp_path):
    """As a new user: a fresh venv (its bundled pip), `pip install -U setuptools`, then the
    README's `pip install --no-build-isolation -e .` of a copy of this checkout. torch and triton
    come from this interpreter's site-packages (whether it runs in a venv or not), so nothing
    large is downloaded; setuptools is the newest the package index has."""
    if os.environ.get("FUSEDNORM_NO_EXTENSION", "") not in ("", "0"):
        pytest.skip("FUSEDNORM_NO_EXTENSION is set: no extension to build")
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(
        ".git", "build", "*.so", "*.egg-info", "__pycache__", ".pytest_cache", "bench", ".venv*"))
    env_dir = tmp_path / "venv"
    try:
        python = _venv_seeing_this_torch(env_dir)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("FUSEDNORM_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        env["MAX_JOBS"] = str(os.cpu_count() or 2)
        # The install path is under test, not the kernels: the plain copy only (setup.py), a
        # third of the build time. .ci/run's own install builds every instruction-set copy.
        env["FUSEDNORM_CPU_KERNEL_COPIES"] = "none"

        def run(*args, cwd=checkout):
            done = subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True,
                                  text=True, timeout=1500)
            assert done.returncode == 0, f"{args}:\n{done.stdout[-5000:]}\n{done.stderr[-5000:]}"
            return done.stdout

        run("-m", "pip", "install", "-q", "--upgrade", "setuptools")
        run("-m", "pip", "install", "-q", "--no-build-isolation", "-e", ".")
        out = run("-c", "import fusednorm, sys, torch; from fusednorm import ops; "
                        "print(fusednorm.__file__); print(ops.extension_has_kernel('cpu')); "
                        "print(fusednorm._C.cpu_capability()); print(torch.__file__); "
                        "import setuptools; print(setuptools.__version__)", cwd=tmp_path)
        path, has_cpu, kernel_copy, torch_path, setuptools_version = out.split()
        assert Path(path).resolve().is_relative_to(checkout.resolve()), path
        assert has_cpu == "True", out
        assert kernel_copy == "DEFAULT", out
        assert Path(torch_path) == Path(torch.__file__), "the venv installed a torch of its own"
        assert int(setuptools_version.split(".")[0]) >= 64
    finally:
        shutil.rmtree(env_dir, ignore_errors=True)
        shutil.rmtree(checkout, ignore_errors=True)


def test_install_without_torch_stops_at_once_saying_how_to_get_it(tmp_path):
    """No torch: setup.py stops before pip resolves anything, with the command that installs
    torch (the CPU build too) and the one that builds fusednorm afterwards."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)  # its bundled pip and setuptools, no torch
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FUSEDNORM_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install",
                           "--no-build-isolation", "--no-deps", "-e", str(ROOT)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "torch is not importable" in output, output
    assert "--index-url https://download.pytorch.org/whl/cpu" in output, output
    assert "pip install --no-build-isolation -e ." in output, output
    assert "Successfully installed" not in output, output


def test_setup_names_an_unknown_cpu_kernel_copy():
    env = dict(os.environ, FUSEDNORM_CPU_KERNEL_COPIES="avx2,AVX9")
    done = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "FUSEDNORM_CPU_KERNEL_COPIES='avx2,AVX9': unknown AVX9" in done.stderr, done.stderr


def test_info_names_why_the_extension_is_missing(tmp_path):
    """`python -m fusednorm` in a package without the compiled library says that no library was
    built (Python alone would blame "a circular import")."""
    shutil.copytree(ROOT / "fusednorm", tmp_path / "fusednorm",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    # -S: no .pth files, so no editable install's finder serves this checkout's fusednorm._C.
    site_packages = [path for path in sys.path if path.endswith("site-packages")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *site_packages]))
    done = subprocess.run([sys.executable, "-S", "-m", "fusednorm"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "not built (no compiled extension (_C*.so) in" in done.stdout, done.stdout
    assert "circular import" not in done.stdout + done.stderr
