"""What the GN+PN benchmark times: every fusednorm backend and each baseline, as providers that
build a forward from a case and say why they cannot run on a device."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fusednorm
from fusednorm import ops, reference
from fusednorm.activations import native_activation
from fusednorm.kernels.group_norm_proxy_act import PATH_ENV as TRITON_PATH_ENV
from fusednorm.kernels.group_norm_proxy_act import PATHS as TRITON_PATHS

from harness.cases import Case, Inputs
from harness.timing import Forward


# Providers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    name: str
    # build(case, inputs) -> (forward, parameters whose gradients the backward computes)
    build: Callable[[Case, Inputs], tuple[Forward, list]]
    # unavailable(device) -> why this provider cannot run on this device, or None
    unavailable: Callable[[torch.device], Optional[str]]
    fused: bool = False  # a fusednorm backend: its speedup over every baseline is reported
    env: tuple = ()  # (name, value) environment settings while this provider runs


def fused_builder(backend: str):
    def build(case, inputs):
        if case.proxy:
            return (lambda x: fusednorm.group_norm_proxy_act(
                x, case.groups, *inputs.gn_params, activation=case.activation, backend=backend),
                inputs.gn_params)
        return (lambda x: fusednorm.group_norm_act(
            x, case.groups, *inputs.gn_params, activation=case.activation, backend=backend),
            inputs.gn_params)
    return build


def build_reference(case, inputs):
    if case.proxy:
        return (lambda x: reference.group_norm_proxy_act(
            x, case.groups, *inputs.gn_params, activation=case.activation), inputs.gn_params)
    return (lambda x: reference.group_norm_act(
        x, case.groups, *inputs.gn_params, activation=case.activation), inputs.gn_params)


def build_native_group_norm(case, inputs):
    """F.group_norm + activation: the same op with PN off, the cost of GN without PN with PN on."""
    weight, bias = inputs.gn_params[:2]
    act = native_activation(case.activation)
    return (lambda x: act(F.group_norm(x, case.groups, weight, bias)), [weight, bias])


def build_batch_norm(case, inputs):
    """Training-mode BatchNorm{1,2,3}d + activation. Its parameters stay fp32 for bf16 inputs,
    as under autocast: that mixed configuration is the one cuDNN batch norm runs."""
    batch_norm_class = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(case.shape)]
    batch_norm = batch_norm_class(case.shape[1], device=inputs.x.device).train()
    act = native_activation(case.activation)
    return (lambda x: act(batch_norm(x)), list(batch_norm.parameters()))


def compiled(build):
    def build_compiled(case, inputs):
        forward, params = build(case, inputs)
        # Static shapes: each case is compiled on its own (the dynamo cache is reset per case).
        return torch.compile(forward, dynamic=False), params
    return build_compiled


def needs_device(device_type: str):
    def unavailable(device):
        return None if device.type == device_type else f"runs on {device_type} tensors only"
    return unavailable


def triton_unavailable(device):
    if not ops.triton_available():
        return f"triton is not importable: {ops.TRITON_IMPORT_ERROR}"
    # The interpreter (the only way the Triton kernels run on CPU) is far too slow to mean anything.
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: the Triton interpreter is not benchmarked"
    return needs_device("cuda")(device)


def extension_unavailable(device_type: str):
    def unavailable(device):
        if ops.EXTENSION_IMPORT_ERROR is not None:
            return ("the C++ extension fusednorm._C is not built; build it with "
                    "`pip install --no-build-isolation -e .`")
        if not ops.extension_has_kernel(device_type):
            return f"the C++ extension is built without a {device_type} kernel"
        return needs_device(device_type)(device)
    return unavailable


def always_available(device):
    return None


PROVIDERS = {p.name: p for p in (
    Provider("fusednorm-triton", fused_builder("triton"), triton_unavailable, fused=True),
    # Each path of the Triton kernels forced (kernels/group_norm_proxy_act.py, choose_path), so
    # that the rule "auto" follows can be checked against measurements.
    *(Provider(f"fusednorm-triton-{path}", fused_builder("triton"), triton_unavailable,
               fused=True, env=((TRITON_PATH_ENV, path),)) for path in TRITON_PATHS),
    Provider("fusednorm-cuda", fused_builder("cuda"), extension_unavailable("cuda"), fused=True),
    Provider("fusednorm-cpu", fused_builder("cpu"), extension_unavailable("cpu"), fused=True),
    Provider("reference", build_reference, always_available),
    Provider("reference-compiled", compiled(build_reference), always_available),
    Provider("native-gn", build_native_group_norm, always_available),
    Provider("native-gn-compiled", compiled(build_native_group_norm), always_available),
    Provider("batchnorm", build_batch_norm, always_available),
    Provider("batchnorm-compiled", compiled(build_batch_norm), always_available),
)}


# ----------------------------------------------------------------------------------------------


# about it would be repeated for every compiled case.
warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
