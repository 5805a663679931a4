"""The Triton launch plans: which path the rule picks, how many launches, how many bytes. Read
from the plans (meta tensors, a GPU's SM count), nothing launched: the evidence, without a GPU,
that the fused paths read x once (2T forward, 3T backward) or once more from L2."""
import sys
from pathlib import Path

import pytest
import torch

from fusednorm.kernels import group_norm_proxy_act as kernels

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import launch_table  # noqa: E402

H100_SMS = 132


def _plans(shape, groups, proxy=True, channels_last=False):
    with kernels.plan_as_gpu(H100_SMS):
        return launch_table.plans(shape, groups, proxy=proxy, channels_last=channels_last)


def _totals(plan, shape):
    x_bytes = torch.Size(shape).numel() * 2  # bf16
    return launch_table.totals(plan, x_bytes)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("proxy", [True, False], ids=["pn", "no_pn"])
@pytest.mark.parametrize("shape,groups", [((32, 2048, 7, 7), 64), ((16, 512, 8, 8), 32),
                                          ((64, 64, 8, 8), 8)])
def test_resident_groups_read_x_once(shape, groups, proxy, channels_last):
    forward, backward = _plans(shape, groups, proxy, channels_last)
    assert forward.path == backward.path == "resident"
    assert _totals(forward, shape)[:3] == (1, 2, 0)   # 1 launch, x read + y written, no re-read
    assert _totals(backward, shape)[:3] == (2, 3, 0)  # x, grad read + dx written; params kernel


@pytest.mark.parametrize("shape,groups", [((32, 256, 56, 56), 32), ((32, 256, 56, 56), 8),
                                          ((32, 512, 28, 28), 8), ((32, 1024, 14, 14), 8),
                                          ((32, 2048, 7, 7), 32)])
def test_large_groups_reread_from_l2_only(shape, groups):
    forward, backward = _plans(shape, groups)
    assert forward.path == "looped"
    assert _totals(forward, shape)[:3] == (1, 2, 1)
    assert _totals(backward, shape)[:3] == (2, 3, 2)


@pytest.mark.parametrize("shape,groups,chunks", [((32, 256, 56, 56), 1, (2, 4)),
                                                 ((1, 256, 56, 56), 1, (1, 1)),
                                                 ((2, 320, 64, 64), 32, (1, 1))])
def test_few_large_groups_split_in_chunks_that_stay_in_l2(shape, groups, chunks):
    """N*G below the SM count: the statistics and partial sums are split over many programs, and
    the batch is walked in chunks of at most half the L2, so that the second kernel over a chunk
    reads it back from L2."""
    forward, backward = _plans(shape, groups)
    assert forward.path == "split"
    # proxy statistics, then per chunk: statistics, their merge, y
    assert _totals(forward, shape)[:3] == (1 + 3 * chunks[0], 2, 1)
    # proxy statistics, per chunk: partial sums, group sums, dx; then the parameter gradients
    assert _totals(backward, shape)[:3] == (2 + 3 * chunks[1], 3, 2)


def test_a_sample_larger_than_l2_is_read_twice_from_memory():
    forward, backward = _plans((1, 1024, 160, 160), 1)  # 52 MB of bf16 per sample
    assert forward.path == "split"
    assert _totals(forward, (1, 1024, 160, 160))[1:3] == (3, 0)
    assert _totals(backward, (1, 1024, 160, 160))[1:3] == (5, 0)


def test_small_traffic_is_small_where_spatial_is_large():
    forward, backward = _plans((32, 256, 56, 56), 8)
    assert _totals(forward, (32, 256, 56, 56))[3] < 0.01
    assert _totals(backward, (32, 256, 56, 56))[3] < 0.01


def test_the_table_is_made_from_the_plans():
    text = launch_table.table(H100_SMS)
    assert "| diffusion 1280x8x8 G=32 | looped | 1 | 2T + " in text
    assert "| resnet50 2048x7x7 G=32 | looped | 1 | 2T + " in text
    assert "| resnet50 256x56x56 G=8 | looped | 1 | 2T + 0.000T | 1T | 2 | 3T + " in text
