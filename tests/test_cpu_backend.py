"""What belongs to the C++ CPU kernels alone: every instruction-set copy, the shapes that reach
their task splits, results independent of the thread count, the C++ argument checks. The op
itself is checked for every backend in test_group_norm_proxy_act.py, numerics in test_numerics.py,
registration in test_ops.py."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusednorm
from fusednorm import ops
from conftest import check_against_reference, make_inputs, to_layout

pytestmark = pytest.mark.skipif(
    not ops.extension_has_kernel("cpu"),
    reason="the C++ extension fusednorm._C is not built (pip install --no-build-isolation -e .)")

LAYOUTS = {"nchw": False, "channels_last": True}


SHAPES = {
    # N*G = 1: the passes run one after another over chunks/rows; S > 4096: several chunks.
    "one_group_long": ((1, 4, 70, 70), 1),
    # channels-last with several row tasks per sample and a C that is no multiple of a vector.
    "many_rows": ((2, 20, 120, 120), 5),
    "many_groups": ((5, 64, 3, 3), 32),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("proxy", [True, False], ids=["pn", "no_pn"])
@pytest.mark.parametrize("case", SHAPES)
def test_task_split_shapes(case, proxy, layout):
    shape, groups = SHAPES[case]
    check_against_reference("cpu", shape, groups, activation="silu", proxy=proxy,
                            channels_last=LAYOUTS[layout])


def _grads(x, params, groups, grad_out):
    out = fusednorm.group_norm_proxy_act(x, groups, **params, backend="cpu")
    return (out, *torch.autograd.grad(out, [x, *params.values()], grad_out))


@pytest.mark.parametrize("shape,groups", [((4, 16, 20, 20), 4), ((1, 8, 70, 70), 1)],
                         ids=["group_per_task", "split_passes"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_results_do_not_depend_on_the_thread_count(shape, groups, layout):
    x, params = make_inputs(shape, dtype=torch.float32, channels_last=LAYOUTS[layout])
    grad_out = to_layout(torch.randn(shape), LAYOUTS[layout])
    first, second = _grads(x, params, groups, grad_out), _grads(x, params, groups, grad_out)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _grads(x, params, groups, grad_out)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reduced_precision_parameters_convert_as_torch_does(dtype, layout):
    """The op converts bf16/fp16 parameters to fp32 and their gradients back in its own loop
    (no dispatched .to()): bitwise what the same call with fp32 parameters returns, rounded by
    .to(); a NaN stays NaN."""
    x, params = make_inputs((2, 24, 5, 5), dtype=dtype, channels_last=LAYOUTS[layout])
    grad_out = to_layout(torch.randn(x.shape, dtype=torch.float64), LAYOUTS[layout]).to(dtype)
    reduced = _grads(x, params, 4, grad_out)
    as_fp32 = {name: p.detach().float().requires_grad_() for name, p in params.items()}
    full = _grads(x, as_fp32, 4, grad_out)
    assert torch.equal(reduced[0], full[0]) and torch.equal(reduced[1], full[1])
    for name, grad, grad_fp32 in zip(params, reduced[2:], full[2:]):
        assert grad.dtype == dtype, name
        torch.testing.assert_close(grad, grad_fp32.to(dtype), rtol=0, atol=0, msg=name)
    # A gradient that is NaN (a NaN weight) stays NaN after the conversion.
    params["weight"].data[3] = float("nan")
    assert torch.isnan(_grads(x, params, 4, grad_out)[2][3])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_relu_gradient_is_zero_where_relu_is_flat_whatever_flows_in(layout):
    """g * relu'(z) is 0 where z <= 0 even for an infinite g, as torch's threshold_backward (and
    so the eager reference); a multiply by 0 would make it NaN and spread NaN over the group's dx."""
    x, params = make_inputs((2, 8, 4, 4), dtype=torch.float32, channels_last=LAYOUTS[layout])
    with torch.no_grad():
        z = torch.nn.functional.group_norm(x, 2, params["weight"], params["bias"])
    flat = (z <= 0).nonzero()[0].tolist()
    grad_out = to_layout(torch.randn(x.shape), LAYOUTS[layout])
    grad_out[tuple(flat)] = float("inf")
    out = fusednorm.group_norm_proxy_act(x, 2, **params, backend="cpu")
    (dx,) = torch.autograd.grad(out, [x], grad_out)
    ref_out = fusednorm.reference.group_norm_proxy_act(x, 2, **params)
    (ref_dx,) = torch.autograd.grad(ref_out, [x], grad_out)
    assert torch.isfinite(ref_dx).all()
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5)


def test_raw_op_rejects_bad_arguments():
    x = torch.randn(2, 8, 3, 3)
    w, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match="not divisible by num_groups=3"):
        torch.ops.fusednorm.forward(x, w, b, None, None, 3, 1, 0.0, 1e-5, 0.03, 16, True)
    with pytest.raises(RuntimeError, match="unknown activation id 9"):
        torch.ops.fusednorm.forward(x, w, b, None, None, 2, 9, 0.0, 1e-5, 0.03, 16, True)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(C,\)"):
        torch.ops.fusednorm.forward(x, torch.ones(4), b, None, None, 2, 1, 0.0, 1e-5, 0.03, 16,
                                    True)
    _, mean, rstd = torch.ops.fusednorm.forward(x, w, b, None, None, 2, 1, 0.0, 1e-5, 0.03, 16,
                                                True)
    with pytest.raises(RuntimeError, match=r"mean and rstd must have shape \(N, G\)"):
        torch.ops.fusednorm.backward(x, x, w, b, None, None, mean[:1], rstd, 2, 1, 0.0, 0.03, 16,
                                     True)


def test_auto_backend_picks_cpu_kernel():
    assert fusednorm.select_backend("auto", torch.randn(2, 4)) == "cpu"


SUBPROCESS_CHECK = textwrap.dedent("""
    import sys, torch, fusednorm
    from fusednorm import _C
    from conftest import check_against_reference
    assert _C.cpu_capability() == sys.argv[1], (_C.cpu_capability(), sys.argv[1])
    for channels_last in (False, True):
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            check_against_reference("cpu", (2, 20, 9, 7), 5, activation="gelu", dtype=dtype,
                                    channels_last=channels_last)
            check_against_reference("cpu", (1, 4, 70, 70), 1, activation="relu", dtype=dtype,
                                    proxy=False, channels_last=channels_last)
            # ReLU-like with PN: channels-last derives sum g * act(z) from two other sums.
            check_against_reference("cpu", (2, 20, 9, 7), 5, activation=("leaky_relu", 0.1),
                                    dtype=dtype, channels_last=channels_last)
    # Groups of 131072 elements: statistics to a few roundings (the merges of pieces and blocks).
    from test_numerics import check_long_group_statistics
    for kind in ("uniform", "offset", "heavy_tailed"):
        for channels_last in (False, True):
            check_long_group_statistics("cpu", "cpu", kind, channels_last)
    # Rows ending in partial vectors of many lengths, odd and even: the 16-bit partial loads and
    # stores (on AVX2 masked 32-bit pairs and an odd last value), up to the tensor's last byte;
    # rows of a step or more walked flat, steps straddling two rows (3 rows per group).
    for length in (1, 2, 3, 8, 9, 15, 17, 49):
        for dtype in (torch.bfloat16, torch.float16):
            check_against_reference("cpu", (2, 4, length), 2, activation="silu", dtype=dtype)
    for length in (8, 9, 15, 16, 17, 31, 33, 49):
        for dtype in (torch.float32, torch.bfloat16):
            check_against_reference("cpu", (2, 6, length), 2, activation="gelu", dtype=dtype)
    # 3 groups on 2 threads: the statistics, then the rows in runs within a group.
    check_against_reference("cpu", (1, 9, 49), 3, activation="relu", dtype=torch.bfloat16)
    # Channels-last in blocks of 512 channels: two whole blocks and a partial one, groups across
    # block boundaries (130 channels each).
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference("cpu", (2, 1040, 3, 3), 8, activation="silu", dtype=dtype,
                                channels_last=True)
""")


def test_every_built_instruction_set():
    """Each copy of the kernels (DEFAULT, and AVX2/AVX512/AVX512_BF16 where built and supported),
    chosen with ATen's ATEN_CPU_CAPABILITY (and FUSEDNORM_NO_AVX512_BF16 for the AVX512 copy on a
    CPU with AVX512-BF16), against the reference: CI machines differ in what they use."""
    levels = ["DEFAULT", "AVX2", "AVX512", "AVX512_BF16"]
    built = fusednorm._C.built_cpu_capabilities()
    assert built[0] == "DEFAULT" and set(built) <= set(levels), built
    best = fusednorm._C.cpu_capability()
    lower = [level for level in levels[:levels.index(best)] if level in built]
    if not lower:
        pytest.skip(f"this CPU runs the {best} kernels only, or no lower copy is built "
                    f"({', '.join(built)}): no other copy to check here (the rest of the suite "
                    f"checks the {best} copy)")
    for level in lower:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=level.lower(), FUSEDNORM_NO_AVX512_BF16="1")
        result = subprocess.run([sys.executable, "-c", SUBPROCESS_CHECK, level], env=env,
                                cwd=os.path.dirname(__file__), capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{level} kernels:\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("data", ["uniform", "offset"])
def test_long_groups_as_accurate_as_torch_group_norm(data, layout):
    """PyTorch's test_GroupNorm_numeric input, (1, 8, 256, 256, 72) in 2 groups (18.9M elements
    each), fp32: the output errs against fp64 at most 2x what F.group_norm errs on the
    contiguous input (its channels-last kernel errs ~1e4x more). Statistics merged one after the
    other (NCHW: 4608 chunks; channels-last: 144 row tasks) lost ~log10 of their count in digits
    (NCHW 1.05e-5 against F.group_norm's 2.1e-7); merged as a balanced tree, 2.0e-7."""
    gen = torch.Generator().manual_seed(0)
    shape = (1, 8, 256, 256, 72)
    x = (torch.rand(shape, generator=gen) if data == "uniform"
         else 1 + 0.1 * torch.randn(shape, generator=gen))
    exact = torch.nn.functional.group_norm(x.double(), 2)
    torch_error = (torch.nn.functional.group_norm(x, 2).double() - exact).abs().max().item()
    if LAYOUTS[layout]:
        x = x.to(memory_format=torch.channels_last_3d)
    out = fusednorm.group_norm_act(x, 2, activation="identity", backend="cpu")
    error = (out.double() - exact).abs().max().item()
    assert error <= 2 * torch_error, f"max error {error:.2e}, F.group_norm's {torch_error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_channels_last_in_blocks_of_channels(dtype):
    """The channels-last passes walk 512 channels at a time: two whole blocks and a partial one,
    groups of 130 channels across the block boundaries, against the reference."""
    check_against_reference("cpu", (2, 1040, 3, 3), 8, activation="silu", dtype=dtype,
                            channels_last=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_heavy_tailed_groups_output_within_2x_torch_group_norm(layout):
    """tools/long_group_accuracy.py's heavy-tailed case, (1, 4, 512, 512) in 2 groups of 524288
    (Student-t data, its seed, weight and bias): the fp32 output errs against fp64 at most 2x
    what contiguous F.group_norm errs, with no floor. The NCHW kernel's 128 chunk states merged
    in fp32 erred 2.53x (one rounding of rstd); merged in double, 1.29x."""
    from test_numerics import _long_group_data

    gen = torch.Generator().manual_seed(0)
    x64 = _long_group_data("heavy_tailed", (1, 4, 512, 512), gen)
    weight64 = 1 + 0.3 * torch.randn(4, generator=gen, dtype=torch.float64)
    bias64 = 0.3 * torch.randn(4, generator=gen, dtype=torch.float64)
    exact = torch.nn.functional.group_norm(x64, 2, weight64, bias64)
    weight, bias = weight64.float(), bias64.float()
    torch_error = (torch.nn.functional.group_norm(x64.float(), 2, weight, bias).double()
                   - exact).abs().max().item()
    x = to_layout(x64.float(), LAYOUTS[layout])
    out = fusednorm.group_norm_act(x, 2, weight, bias, activation="identity", backend="cpu")
    error = (out.double() - exact).abs().max().item()
    assert error <= 2 * torch_error, f"max error {error:.2e}, F.group_norm's {torch_error:.2e}"


def _available_memory_bytes():
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensor_past_2_to_the_31_elements(layout):
    """bf16 (4, 32, 4096, 4100), 8 groups: 2,149,580,800 elements (past 2**31, 4.3 GB a tensor),
    so that 32-bit offsets would wrap. Forward, then backward with grad_out = y (x, y and dx:
    12.9 GB). Against F.group_norm in fp64: y and dx of the first and the last group (the last
    lies past 2**31 in both layouts), dweight and dbias of the last channel."""
    needed = 16 * 2**30
    available = _available_memory_bytes()
    if available is None or available < needed:
        pytest.skip(f"needs {needed / 2**30:.0f} GiB of available memory; this machine has "
                    f"{'an unknown amount' if available is None else f'{available / 2**30:.1f} GiB'}")
    N, C, H, W, G = 4, 32, 4096, 4100, 8
    CPG = C // G
    gen = torch.Generator().manual_seed(0)
    if LAYOUTS[layout]:
        x = torch.randn((N, H, W, C), generator=gen, dtype=torch.bfloat16).permute(0, 3, 1, 2)
    else:
        x = torch.randn((N, C, H, W), generator=gen, dtype=torch.bfloat16)
    assert x.numel() > 2**31
    weight = (1 + 0.3 * torch.randn(C, generator=gen)).requires_grad_()
    bias = (0.3 * torch.randn(C, generator=gen)).requires_grad_()
    x.requires_grad_()
    y = fusednorm.group_norm_act(x, G, weight, bias, activation="identity", backend="cpu")
    assert y.stride() == x.stride()
    dx, dweight, dbias = torch.autograd.grad(y, (x, weight, bias), y.detach())
    x, y = x.detach(), y.detach()

    for n, g in [(0, 0), (N - 1, G - 1)]:
        channels = slice(g * CPG, (g + 1) * CPG)
        xg = x[n, channels].double().requires_grad_()
        yg = torch.nn.functional.group_norm(xg[None], 1, weight[channels].double().detach(),
                                            bias[channels].double().detach())[0]
        (dxg,) = torch.autograd.grad(yg, xg, y[n, channels].double())
        torch.testing.assert_close(y[n, channels].double(), yg.detach(), rtol=1.6e-2, atol=1.6e-2,
                                   msg=lambda m: f"y of group ({n}, {g}): {m}")
        scale = dxg.abs().max().item()
        torch.testing.assert_close(dx[n, channels].double(), dxg, rtol=1.6e-2, atol=1.6e-2 * scale,
                                   msg=lambda m: f"dx of group ({n}, {g}): {m}")
    # The last channel's parameter gradients: sums of grad * xhat and of grad over every sample.
    sums = torch.zeros(4, dtype=torch.float64)
    for n in range(N):
        group = x[n, C - CPG:].double()
        xhat = (group[-1] - group.mean()) * (group.var(unbiased=False) + 1e-5).rsqrt()
        grad = y[n, C - 1].double()
        sums += torch.stack([(grad * xhat).sum(), grad.sum(), (grad * xhat).abs().sum(),
                             grad.abs().sum()])
    torch.testing.assert_close(dweight[-1].double(), sums[0], rtol=0, atol=1e-5 * sums[2].item())
    torch.testing.assert_close(dbias[-1].double(), sums[1], rtol=0, atol=1e-5 * sums[3].item())
