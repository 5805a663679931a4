"""PyTorch's own test cases for GroupNorm, run against every backend (PN off, identity activation).

The OpInfo of ``nn.functional.group_norm`` (its sample inputs, reference inputs and error inputs)
and the ModuleInfo of ``nn.GroupNorm`` from ``torch.testing._internal``: each backend's output and
gradients must err against fp64 at most 2x what PyTorch's own kernels err in the same dtype on the
same input (plus the per-dtype floor of conftest.py).

Where fusednorm differs on purpose:
- A negative ``eps`` (the sample ``eps=-0.5``) is rejected with a ValueError: PyTorch computes
  rsqrt(var - 0.5), NaN for every group whose variance is below 0.5, without a word.
- Error messages are fusednorm's own (the error inputs' regexes are PyTorch's wording); each must
  name the same problem.
- bf16 on the Triton interpreter is skipped (the interpreter computes bf16 wrongly; bf16 Triton
  runs on CUDA).
The samples are built inside the tests, not at collection: importing torch.testing._internal
queries the GPU.
"""
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusednorm
from conftest import assert_within_reference_error

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _require_torch_testing():
    """torch.testing._internal imports expecttest: requirements-test.txt has it; the lent GPU
    machine, where nothing can be installed, may not."""
    pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest "
                        "(pip install -r requirements-test.txt)")


def _opinfo():
    _require_torch_testing()
    from torch.testing._internal.common_methods_invocations import op_db

    return next(op for op in op_db if op.name == "nn.functional.group_norm")


def _skip_unsupported(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 wrongly; bf16 Triton runs on CUDA")


def _forward_backward(fn, x, weight, bias, grad_out):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (x, weight, bias)]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wanted, grad_out) if out.numel() else [torch.zeros_like(t) for t in wanted]
    names = [n for n, t in zip(("x", "weight", "bias"), leaves) if t is not None]
    return out, dict(zip(names, grads))


def _compare(backend, sample, dtype):
    """The backend's output and gradients against fp64, bounded by F.group_norm's own error."""
    x, num_groups = sample.input, sample.args[0]
    weight, bias, eps = (sample.kwargs.get(k) for k in ("weight", "bias", "eps"))
    eps = 1e-5 if eps is None else eps
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).to(x.device, dtype)

    def torch_fn(x, w, b):
        return F.group_norm(x, num_groups, w, b, eps)

    def fused_fn(x, w, b):
        return fusednorm.group_norm_act(x, num_groups, w, b, activation="identity", eps=eps,
                                        backend=backend)

    def fp64(t):
        return None if t is None else t.detach().double()

    out, grads = _forward_backward(fused_fn, x, weight, bias, grad_out)
    expected, expected_grads = _forward_backward(torch_fn, fp64(x), fp64(weight), fp64(bias),
                                                 grad_out.double())
    torch_out, torch_grads = _forward_backward(torch_fn, x, weight, bias, grad_out)
    assert out.dtype == dtype and out.shape == x.shape
    what = f"input {tuple(x.shape)}, {num_groups} groups, eps {eps}, " \
           f"weight {'yes' if weight is not None else 'no'}, bias {'yes' if bias is not None else 'no'}"
    if dtype == torch.float64:
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}: {m}")
        for name in grads:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-9, atol=1e-9,
                                       msg=lambda m, name=name: f"{what}, grad of {name}: {m}")
        return
    assert_within_reference_error(out, torch_out, expected, f"{what}: output")
    for name in grads:
        assert_within_reference_error(grads[name], torch_grads[name], expected_grads[name],
                                      f"{what}: grad of {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opinfo_reference_inputs(any_backend, dtype):
    """Every sample and reference input of the OpInfo (the reference inputs include the
    samples): output, dx, dweight and dbias."""
    backend, device = any_backend
    _skip_unsupported(backend, device, dtype)
    op = _opinfo()
    compared = rejected = 0
    for sample in op.reference_inputs(device, dtype, requires_grad=True):
        eps = sample.kwargs.get("eps", 1e-5)
        if eps < 0:  # differs on purpose: see the module docstring
            with pytest.raises(ValueError, match=r"eps must be a finite number >= 0"):
                fusednorm.group_norm_act(sample.input, *sample.args, **sample.kwargs,
                                         activation="identity", backend=backend)
            rejected += 1
            continue
        _compare(backend, sample, dtype)
        compared += 1
    assert compared >= 20 and rejected >= 1, (compared, rejected)


def test_opinfo_error_inputs(any_backend):
    """PyTorch's error inputs raise here too, with a message that names the same problem."""
    backend, device = any_backend
    problems = {"Expected at least 2 dimensions": r"at least 2 dims",
                "divisible by num_groups": r"C=\d+ is not divisible by num_groups=\d+"}
    seen = 0
    for error in _opinfo().error_inputs(device):
        sample = error.sample_input
        ours = next(ours for theirs, ours in problems.items() if theirs in error.error_regex)
        with pytest.raises(ValueError, match=ours):
            fusednorm.group_norm_act(sample.input, *sample.args, **sample.kwargs,
                                     activation="identity", backend=backend)
        seen += 1
    assert seen == len(problems)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_group_norm_act_loads_nn_group_norm(any_backend, dtype):
    """Each ModuleInfo case of nn.GroupNorm: a GroupNormAct with the identity activation loads the
    nn.GroupNorm's state_dict (strict) and matches its output and every gradient."""
    backend, device = any_backend
    _require_torch_testing()
    from torch.testing._internal.common_modules import module_db

    info = next(m for m in module_db if m.module_cls is nn.GroupNorm)
    signature = inspect.signature(nn.GroupNorm)
    gen = torch.Generator().manual_seed(0)
    cases = info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True,
                                    training=True)
    for case in cases:
        ctor = case.constructor_input
        theirs = nn.GroupNorm(*ctor.args, **ctor.kwargs, device=device, dtype=dtype)
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        args = signature.bind(*ctor.args, **ctor.kwargs).arguments
        ours = fusednorm.GroupNormAct(
            theirs.num_groups, theirs.num_channels, "identity", theirs.eps, theirs.affine,
            backend=backend, bias=args.get("bias", True), device=device, dtype=dtype)
        ours.load_state_dict(theirs.state_dict())
        x = case.forward_input.args[0].detach()
        grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device, dtype)
        results = []
        for module in (ours, theirs):
            x_leaf = x.clone().requires_grad_()
            out = module(x_leaf)
            leaves = [x_leaf, *module.parameters()]
            results.append((out, torch.autograd.grad(out, leaves, grad_out)))
        (out, grads), (expected, expected_grads) = results
        tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, expected, **tol, msg=lambda m: f"{case.desc}: {m}")
        names = ["x", *(n for n, _ in theirs.named_parameters())]
        assert len(grads) == len(expected_grads) == len(names)
        for name, grad, expected_grad in zip(names, grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, **tol,
                                       msg=lambda m, name=name: f"{case.desc}, grad of {name}: {m}")
