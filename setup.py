"""Build and install fusednorm (filled in further by the C++ extension build below)."""
import importlib.util

from setuptools import setup

install_requires = ["numpy"]
if importlib.util.find_spec("torch") is None:
    # Only when no torch is importable: never let pip re-resolve an installed torch.
    install_requires.append("torch==2.13.0")
if importlib.util.find_spec("triton") is None:
    install_requires.append("triton")

setup(
    name="fusednorm",
    version="0.1.0",
    description="Fused GroupNorm/LayerNorm + activation + Proxy Normalization for PyTorch",
    packages=["fusednorm", "fusednorm.kernels"],
    package_dir={"fusednorm": "fusednorm", "fusednorm.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=install_requires,
)
