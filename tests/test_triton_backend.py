"""What belongs to the Triton backend alone: its launch paths (resident, looped, split) forced one
by one on every odd shape, their determinism, split against unsplit statistics, shapes that reach
the split path, CUDA-sized tiles, devices. The op itself is checked for every backend in
test_group_norm_proxy_act.py."""
import pytest
import torch

import fusednorm
from fusednorm.kernels import group_norm_proxy_act as kernels
from conftest import ODD_SHAPES, check_against_reference, make_inputs, triton_device

SHAPES = {
    "split_reduction": ((1, 8, 64, 64), 1),  # N*G=1: the group is reduced by several programs
    "many_groups": ((5, 64, 3, 3), 32),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("proxy", [True, False], ids=["pn", "no_pn"])
@pytest.mark.parametrize("case", SHAPES)
def test_path_shapes(case, proxy, channels_last):
    shape, groups = SHAPES[case]
    check_against_reference("triton", shape, groups, activation="silu", proxy=proxy,
                            channels_last=channels_last, device=triton_device())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("proxy", [True, False], ids=["pn", "no_pn"])
def test_cuda_tiles_every_dtype(dtype, channels_last, proxy):
    """On a CUDA device: every dtype (bf16 only here: the interpreter gets bf16 wrong) and both
    memory formats, on shapes large enough for the real tile sizes and split paths."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (bf16 is not supported by the Triton interpreter)")
    for shape, groups in [((4, 64, 28, 28), 8), ((1, 256, 56, 56), 1), ((8, 96, 7, 7), 32)]:
        check_against_reference("triton", shape, groups, activation="relu", proxy=proxy,
                                dtype=dtype, param_dtype=torch.float32,
                                channels_last=channels_last, device="cuda")


def test_split_and_unsplit_statistics_agree():
    """The same group reduced by one program (N*G large) and by several (N*G = 1)."""
    device = triton_device()
    x, params = make_inputs((8, 4, 64, 48), dtype=torch.float32, device=device)
    batched = fusednorm.group_norm_proxy_act(x, 1, **params, backend="triton")
    single = torch.cat([fusednorm.group_norm_proxy_act(x[i:i + 1], 1, **params, backend="triton")
                        for i in range(x.shape[0])])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_tensor_on_a_device_that_is_not_current():
    """Triton launches on the current CUDA device: the launchers make x's device current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    x, params = make_inputs((2, 8, 5, 5), dtype=torch.float32, device="cuda:1")
    assert torch.cuda.current_device() == 0
    y = fusednorm.group_norm_proxy_act(x, 4, **params, backend="triton")
    y.backward(torch.ones_like(y))
    ref = fusednorm.reference.group_norm_proxy_act(x.detach().cpu(), 4,
                                                   **{k: v.detach().cpu() for k, v in params.items()})
    torch.testing.assert_close(y.cpu(), ref.float(), rtol=1e-4, atol=1e-4)
    assert x.grad.device == x.device and torch.isfinite(x.grad).all()


PATH_SHAPES = {
    **ODD_SHAPES,
    "large_groups": ((3, 16, 9, 10), 2),  # over the interpreter's resident limit
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("proxy", [True, False], ids=["pn", "no_pn"])
@pytest.mark.parametrize("case", PATH_SHAPES)
@pytest.mark.parametrize("path", kernels.PATHS)
def test_every_path(path, case, proxy, channels_last, monkeypatch):
    """Each path of the launch rule forced through $FUSEDNORM_TRITON_PATH (the knob the
    benchmark uses), on every odd shape; resident refuses a group it cannot hold, saying so."""
    monkeypatch.setenv(kernels.PATH_ENV, path)
    shape, groups = PATH_SHAPES[case]
    device = triton_device()
    traits = kernels.device_traits(torch.device(device))
    spatial = torch.Size(shape[2:]).numel()
    if path == "resident" and kernels._group_tile(shape[1] // groups, spatial, traits) is None:
        x = torch.randn(shape, device=device)
        with pytest.raises(ValueError, match="does not fit one program"):
            fusednorm.group_norm_proxy_act(x, groups, backend="triton")
        return
    check_against_reference("triton", shape, groups, activation="gelu", proxy=proxy,
                            channels_last=channels_last, device=device)


@pytest.mark.parametrize("path", kernels.PATHS)
def test_every_path_is_bitwise_deterministic(path, monkeypatch):
    monkeypatch.setenv(kernels.PATH_ENV, path)
    shape = (2, 8, 6, 5) if path == "resident" else (3, 16, 9, 10)
    x, params = make_inputs(shape, dtype=torch.float32, device=triton_device())
    grad_out = torch.randn_like(x)
    runs = [torch.autograd.grad(fusednorm.group_norm_proxy_act(x, 2, **params, backend="triton"),
                                [x, *params.values()], grad_out) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_unknown_path_is_an_error(monkeypatch):
    monkeypatch.setenv(kernels.PATH_ENV, "fastest")
    x = torch.randn(2, 4, 3, device=triton_device())
    with pytest.raises(ValueError, match="FUSEDNORM_TRITON_PATH"):
        fusednorm.group_norm_proxy_act(x, 2, backend="triton")


@pytest.mark.parametrize("path", kernels.PATHS)
def test_every_path_with_64_bit_offsets(path, monkeypatch):
    """The INDEX_64 specializations (inputs of 2**31 elements or more) on a small input: the
    threshold lowered to 0, each path against the reference, both layouts. A tensor that large
    is out of the interpreter's reach; the C++ kernel runs one in test_cpu_backend.py."""
    monkeypatch.setattr(kernels, "INDEX_64_ELEMENTS", 0)
    monkeypatch.setenv(kernels.PATH_ENV, path)
    launched = []
    run = kernels.Plan.run
    monkeypatch.setattr(kernels.Plan, "run", lambda plan: launched.extend(plan.steps) or run(plan))
    shape = (2, 8, 6, 5) if path == "resident" else (3, 16, 9, 10)
    for channels_last in (False, True):
        check_against_reference("triton", shape, 2, activation="silu",
                                channels_last=channels_last, device=triton_device())
    flags = {step.name: step.kwargs["INDEX_64"] for step in launched if "INDEX_64" in step.kwargs}
    assert flags and all(flags.values()), flags
