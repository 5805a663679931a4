"""Bad input gets a clear error naming the problem, on every path."""
import pytest
import torch

import fusednorm
from fusednorm import reference


def _call(fn, backend, x, groups=2, **kwargs):
    if backend is not None:
        kwargs["backend"] = backend
    return fn(x, groups, **kwargs)


PATHS = {
    "functional_reference": (fusednorm.group_norm_proxy_act, "reference"),
    "functional_auto": (fusednorm.group_norm_proxy_act, None),
    "reference_module": (reference.group_norm_proxy_act, None),
}
BAD_CASES = {
    "C_not_divisible": (dict(groups=3), r"C=8 is not divisible by num_groups=3"),
    "groups_zero": (dict(groups=0), r"num_groups must be a positive int"),
    "weight_shape": (dict(weight=torch.ones(4)), r"weight must have shape \(C,\) = \(8,\), got \(4,\)"),
    "bias_2d": (dict(bias=torch.zeros(8, 1)), r"bias must have shape"),
    "proxy_bias_dtype": (dict(proxy_bias=torch.zeros(8, dtype=torch.float64)),
                         r"proxy_bias dtype torch.float64 does not match input dtype torch.float32"),
    "weight_int": (dict(weight=torch.ones(8, dtype=torch.int64)), r"weight dtype torch.int64"),
    "weight_device": (dict(weight=torch.ones(8, device="meta")), r"weight is on meta but input is on cpu"),
    "weight_not_tensor": (dict(weight=[1.0] * 8), r"weight must be a torch.Tensor or None"),
    "activation": (dict(activation="tanhh"), r"unknown activation 'tanhh'"),
    "activation_type": (dict(activation=3), r"activation must be a name"),
    "eps_negative": (dict(eps=-1e-5), r"eps must be a finite number >= 0"),
    "eps_nan": (dict(eps=float("nan")), r"eps must be a finite number >= 0"),
    "proxy_eps_negative": (dict(proxy_eps=-0.1), r"proxy_eps must be a finite number >= 0"),
    "few_proxy_samples": (dict(num_proxy_samples=1), r"num_proxy_samples must be an int >= 2"),
}


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("path", PATHS)
def test_bad_arguments(path, case):
    fn, backend = PATHS[path]
    kwargs, message = BAD_CASES[case]
    kwargs = dict(kwargs)
    groups = kwargs.pop("groups", 2)
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises((ValueError, TypeError), match=message):
        _call(fn, backend, x, groups, **kwargs)


@pytest.mark.parametrize("fn", [fusednorm.group_norm_proxy_act, fusednorm.group_norm_act,
                                reference.group_norm_proxy_act, reference.group_norm_act])
def test_bad_input_tensor(fn):
    with pytest.raises(ValueError, match=r"at least 2 dims, got shape \(8,\)"):
        fn(torch.randn(8), 1)
    with pytest.raises(TypeError, match=r"input dtype must be one of"):
        fn(torch.ones(2, 8, dtype=torch.int32), 1)
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor"):
        fn([[1.0, 2.0]], 1)


def test_group_norm_act_checks_parameters():
    with pytest.raises(ValueError, match=r"weight must have shape"):
        fusednorm.group_norm_act(torch.randn(2, 8), 2, torch.ones(3))
    with pytest.raises(ValueError, match=r"unknown activation"):
        fusednorm.group_norm_act(torch.randn(2, 8), 2, activation="soft")


def test_unknown_backend_argument_and_environment(monkeypatch):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        fusednorm.group_norm_proxy_act(x, 2, backend="fast")
    monkeypatch.setenv("FUSEDNORM_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"unknown \$FUSEDNORM_BACKEND 'fast'"):
        fusednorm.group_norm_proxy_act(x, 2)
    monkeypatch.setenv("FUSEDNORM_BACKEND", "reference")
    assert fusednorm.select_backend(None, x) == "reference"


def test_triton_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend 'triton' runs on CUDA tensors"):
        fusednorm.group_norm_proxy_act(torch.randn(2, 8), 2, backend="triton")


def test_cuda_backend_on_cpu_tensor_explains():
    with pytest.raises((RuntimeError, ValueError), match=r"backend 'cuda'"):
        fusednorm.group_norm_proxy_act(torch.randn(2, 8), 2, backend="cuda")


def test_leaky_relu_slope_must_be_finite():
    with pytest.raises(ValueError, match=r"slope must be finite"):
        fusednorm.group_norm_proxy_act(torch.randn(2, 8), 2, activation=("leaky_relu", float("inf")),
                                       backend="reference")


@pytest.mark.parametrize("module", [fusednorm.GroupNormProxyAct, fusednorm.GroupNormAct])
def test_module_construction_errors(module):
    with pytest.raises(ValueError, match=r"num_channels=10 is not divisible by num_groups=4"):
        module(4, 10)
    with pytest.raises(ValueError, match=r"unknown activation"):
        module(2, 10, activation="relu6")
