"""Fused GroupNorm + affine + activation + Proxy Normalization in Triton (docs/pn-math.md).

Every kernel sees the input as a 3-D array (N, C, S) through strides (stride_n, stride_c,
stride_s), S = product of the spatial sizes: a contiguous (NCHW) input has strides (C*S, S, 1),
a channels-last (NHWC, NDHWC) one (S*C, 1, C). Neither layout is copied.

Three paths; ``choose_path`` picks one per call ($FUSEDNORM_TRITON_PATH forces one), and the
launchers build a ``Plan`` (the launches and the bytes each moves) before launching it:

resident / looped (one program per (n, g) group):
  forward   ``_forward_group_kernel``   statistics, affine, activation, PN: 1 launch. The proxy
                                        statistics of the group's channels in its prologue.
  backward  ``_backward_group_kernel``  per-channel partials A, B, D, E, group sums SA, SB, dx.
            ``_backward_params_kernel`` per channel: the partials reduced over n, then the proxy
                                        gradients; every parameter gradient. 2 launches.
  resident keeps the group in registers (x read once: 2T forward, 3T backward); looped walks
  it twice, the second time from L2.
split (few, large groups: N*G below the SM count):
  forward   ``_proxy_stats_kernel`` (m_c, s_c), ``_group_stats_kernel`` (moments per (n, g)
            and split: count, sum of x - shift, M2, merged tile by tile with Chan's formula),
            ``_group_stats_combine_kernel`` (fixed-order merge), ``_forward_apply_kernel``.
  backward  ``_proxy_stats_kernel``, ``_backward_partials_kernel`` (per (n, c) and split),
            ``_backward_group_sums_kernel`` (SA, SB), ``_backward_dx_kernel``,
            ``_backward_params_kernel``.
No atomics anywhere: the backward is bitwise deterministic. Integer arguments that only count
(sizes of the grid, loop bounds, masks across tiles) are not specialized (``do_not_specialize``):
one compiled kernel serves many shapes; strides and the sizes that mask the contiguous axis are,
for aligned vector loads. Accumulation is fp32 (fp64 for fp64 inputs); float scalars (eps,
slope) arrive as fp64 and are rounded to the accumulation dtype in the kernel. Only x and the
per-(n, g) mean/rstd come from the forward.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..layout import accumulation_dtype, dense_layout
from .activations import act_grad, act_value


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _proxy_values(weight, bias, proxy_bias, proxy_weight, samples_ptr, k0, K, slope,
                  ACT: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One [BLOCK_C, BLOCK_K] tile of proxy samples for the channels whose parameters are given.
    Returns (u, X, p, mask_k): u_k, X_ck = beta~ + (1 + gamma~) u_k, p_ck = gamma X + beta."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    u = tl.load(samples_ptr + offs_k, mask=mask_k, other=0.0).to(ACC_DTYPE)
    proxy_x = proxy_bias[:, None] + (1.0 + proxy_weight[:, None]) * u[None, :]
    p = weight[:, None] * proxy_x + bias[:, None]
    return u, proxy_x, p, mask_k


@triton.jit
def _proxy_moments(weight, bias, proxy_bias, proxy_weight, samples_ptr, K, slope,
                   ACT: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Proxy mean m_c and population variance v_c (two passes over the K samples)."""
    total = tl.zeros(weight.shape, ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        u, proxy_x, p, mask_k = _proxy_values(weight, bias, proxy_bias, proxy_weight, samples_ptr,
                                              k0, K, slope, ACT, BLOCK_K, ACC_DTYPE)
        total += tl.sum(tl.where(mask_k[None, :], act_value(p, ACT, slope), 0.0), axis=1)
    mean = total / K
    total = tl.zeros(weight.shape, ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        u, proxy_x, p, mask_k = _proxy_values(weight, bias, proxy_bias, proxy_weight, samples_ptr,
                                              k0, K, slope, ACT, BLOCK_K, ACC_DTYPE)
        d = tl.where(mask_k[None, :], act_value(p, ACT, slope) - mean[:, None], 0.0)
        total += tl.sum(d * d, axis=1)
    return mean, total / K


@triton.jit
def _load_channel_params(weight_ptr, bias_ptr, proxy_bias_ptr, proxy_weight_ptr, offs_c, mask_c,
                         HAS_PROXY_BIAS: tl.constexpr, HAS_PROXY_WEIGHT: tl.constexpr,
                         ACC_DTYPE: tl.constexpr):
    weight = tl.load(weight_ptr + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
    bias = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
    if HAS_PROXY_BIAS:
        proxy_bias = tl.load(proxy_bias_ptr + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
    else:
        proxy_bias = tl.zeros(weight.shape, ACC_DTYPE)
    if HAS_PROXY_WEIGHT:
        proxy_weight = tl.load(proxy_weight_ptr + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
    else:
        proxy_weight = tl.zeros(weight.shape, ACC_DTYPE)
    return weight, bias, proxy_bias, proxy_weight


@triton.jit
def _channel_params(weight_ptr, bias_ptr, proxy_bias_ptr, proxy_weight_ptr, samples_ptr, offs_c,
                    mask_c, K, slope, proxy_eps, ACT: tl.constexpr, PROXY: tl.constexpr,
                    HAS_PROXY_BIAS: tl.constexpr, HAS_PROXY_WEIGHT: tl.constexpr,
                    BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """gamma, beta, proxy mean m_c and scale s_c of the channels ``offs_c``. The proxy statistics
    are computed here, in the prologue of the kernel that needs them, rather than by a launch of
    their own (m = 0, s = 1 when PN is off)."""
    weight, bias, proxy_bias, proxy_weight = _load_channel_params(
        weight_ptr, bias_ptr, proxy_bias_ptr, proxy_weight_ptr, offs_c, mask_c,
        HAS_PROXY_BIAS, HAS_PROXY_WEIGHT, ACC_DTYPE)
    if PROXY:
        proxy_mean, proxy_var = _proxy_moments(weight, bias, proxy_bias, proxy_weight, samples_ptr,
                                               K, slope, ACT, BLOCK_K, ACC_DTYPE)
        proxy_scale = 1.0 / tl.sqrt(proxy_var + proxy_eps)
    else:
        proxy_mean = tl.zeros(weight.shape, ACC_DTYPE)
        proxy_scale = tl.zeros(weight.shape, ACC_DTYPE) + 1.0
    return weight, bias, proxy_mean, proxy_scale


@triton.jit
def _add_compensated(total, error, value):
    """total + value, with the add's rounding error accumulated in ``error`` (Neumaier's variant
    of Kahan's sum): a running sum of thousands of tiles' sums errs like a few adds, where a plain
    one erred with the tile count (a 75M-element group: rstd 8e-6 off, against 3e-8)."""
    new_total = total + value
    lost = tl.where(tl.abs(total) >= tl.abs(value), (total - new_total) + value,
                    (value - new_total) + total)
    return new_total, error + lost


@triton.jit
def _tile_moments(x, mask):
    """(count, sum, mean, M2) of a tile of x (zero where not mask), M2 by an in-register
    two-pass."""
    count = tl.sum(mask.to(tl.int32))
    total = tl.sum(x)
    mean = total / tl.maximum(count, 1).to(x.dtype)
    d = tl.where(mask, x - mean, 0.0)
    return count, total, mean, tl.sum(d * d)


@triton.jit
def _merge_moments(count, mean, m2, m2_error, part_count, part_mean, part_m2):
    """Chan's merge of a part's moments (count, mean, M2) into running ones:
    exact for any split of the data; an empty part is a no-op. The data are x - shift, shift
    near the group's mean (the first tile's mean, or the first element and the sum kept apart):
    the running mean stays small and loses no digits to the group's offset. Integer counts (exact
    past 2**24); M2 compensated, a sum of thousands of tiles' terms."""
    new_count = count + part_count
    inv_new_count = 1.0 / tl.maximum(new_count, 1).to(mean.dtype)
    delta = part_mean - mean
    m2, m2_error = _add_compensated(
        m2, m2_error, part_m2 + delta * delta * (count.to(mean.dtype) * part_count.to(mean.dtype))
        * inv_new_count)
    return new_count, mean + delta * part_count.to(mean.dtype) * inv_new_count, m2, m2_error


@triton.jit
def _apply(x, mean, rstd, weight, bias, proxy_mean, proxy_scale, slope, ACT: tl.constexpr,
           PROXY: tl.constexpr):
    """y of a [BLOCK_C, BLOCK_S] tile, per-channel vectors broadcast along S."""
    # (x - mean) * (gamma * rstd) rather than the folded A*x + B: one rounding of the mean
    # instead of a cancellation between two large terms on offset data.
    out = act_value((x - mean) * (weight * rstd)[:, None] + bias[:, None], ACT, slope)
    if PROXY:
        out = proxy_scale[:, None] * (out - proxy_mean[:, None])
    return out


@triton.jit
def _grad_tile(x, g, mean, rstd, weight, bias, proxy_scale, mask, slope, ACT: tl.constexpr,
               PROXY: tl.constexpr):
    """xhat, g_z = s_c g phi'(z) (0 outside the mask) and a = phi(z) of a [BLOCK_C, BLOCK_S]
    tile; mean/rstd are the group's (scalars or per-channel vectors broadcast along S)."""
    xhat = (x - mean) * rstd
    z = weight[:, None] * xhat + bias[:, None]
    g_z = g * act_grad(z, ACT, slope)
    if PROXY:
        g_z = g_z * proxy_scale[:, None]
    return xhat, tl.where(mask, g_z, 0.0), z


@triton.jit
def _group_of_program(G, INDEX_64: tl.constexpr):
    """(ng, n, g) of a program of a grid with one program per (n, g) along axis 0."""
    ng = tl.program_id(0)
    n = ng // G
    g = ng % G
    if INDEX_64:
        n = n.to(tl.int64)
        g = g.to(tl.int64)
    return ng, n, g


@triton.jit
def _tile_in_group(c0, s0, CPG, S, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Channel and spatial offsets of the [BLOCK_C, BLOCK_S] tile at (c0, s0) of a group of CPG
    channels and S positions, the channel mask and the tile mask."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_s = s0 + tl.arange(0, BLOCK_S)
    mask_c = offs_c < CPG
    return offs_c, offs_s, mask_c, mask_c[:, None] & (offs_s < S)[None, :]


@triton.jit
def _load_tile(base, offs_c, offs_s, stride_c, stride_s, mask, ACC_DTYPE: tl.constexpr):
    return tl.load(base + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s, mask=mask,
                   other=0.0).to(ACC_DTYPE)


@triton.jit
def _store_partials(partials, plane, offs_c, mask_c, sum_gz, sum_gz_xhat, sum_g, sum_g_a,
                    PROXY: tl.constexpr):
    """A, B (and with PN D, E) of a block of channels into the 4 planes of the partials."""
    tl.store(partials + offs_c, sum_gz, mask=mask_c)
    tl.store(partials + plane + offs_c, sum_gz_xhat, mask=mask_c)
    if PROXY:
        tl.store(partials + 2 * plane + offs_c, sum_g, mask=mask_c)
        tl.store(partials + 3 * plane + offs_c, sum_g_a, mask=mask_c)


@triton.jit
def _load_norm_params(group_mean_ptr, group_rstd_ptr, weight_ptr, bias_ptr, n, offs_c, mask_c,
                      G, CPG, ACC_DTYPE: tl.constexpr):
    """Per channel of a tile: its (n, g) row index, the group's mean and rstd, gamma and beta."""
    group = n * G + offs_c // CPG
    mean = tl.load(group_mean_ptr + group, mask=mask_c, other=0.0)
    rstd = tl.load(group_rstd_ptr + group, mask=mask_c, other=0.0)
    weight = tl.load(weight_ptr + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
    bias = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
    return group, mean, rstd, weight, bias


@triton.jit
def _tile_coords(pid, num_c_blocks, num_s_blocks, C, S, BLOCK_C: tl.constexpr,
                 BLOCK_S: tl.constexpr, INDEX_64: tl.constexpr):
    """Program id of a 1-D grid over (n, c-block, s-block) -> n, channel and spatial offsets."""
    pid_s = pid % num_s_blocks
    rest = pid // num_s_blocks
    pid_c = rest % num_c_blocks
    n = rest // num_c_blocks
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    if INDEX_64:
        n = n.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
        offs_s = offs_s.to(tl.int64)
    return n, offs_c, offs_s, offs_c < C, offs_s < S


# ----------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["C", "K"])
def _proxy_stats_kernel(
    weight_ptr,        # (C,) gamma
    bias_ptr,          # (C,) beta
    proxy_bias_ptr,    # (C,) beta~ (read only if HAS_PROXY_BIAS)
    proxy_weight_ptr,  # (C,) gamma~ (read only if HAS_PROXY_WEIGHT)
    samples_ptr,       # (K,) proxy samples u_k, ACC_DTYPE
    proxy_mean_ptr,    # out (C,) m_c, ACC_DTYPE
    proxy_scale_ptr,   # out (C,) s_c = 1/sqrt(v_c + proxy_eps), ACC_DTYPE
    C,                 # channels
    K,                 # proxy samples
    slope: tl.float64,      # leaky_relu slope (read only if ACT is leaky_relu)
    proxy_eps: tl.float64,  # added to the proxy variance
    ACT: tl.constexpr,      # activation id (fusednorm/activations.py)
    HAS_PROXY_BIAS: tl.constexpr, HAS_PROXY_WEIGHT: tl.constexpr,  # beta~ / gamma~ given (else 0)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_K: tl.constexpr,  # samples per step
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 input
):
    slope = tl.full([], slope, ACC_DTYPE)
    proxy_eps = tl.full([], proxy_eps, ACC_DTYPE)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    weight, bias, proxy_bias, proxy_weight = _load_channel_params(
        weight_ptr, bias_ptr, proxy_bias_ptr, proxy_weight_ptr, offs_c, mask_c,
        HAS_PROXY_BIAS, HAS_PROXY_WEIGHT, ACC_DTYPE)
    mean, var = _proxy_moments(weight, bias, proxy_bias, proxy_weight, samples_ptr, K, slope,
                               ACT, BLOCK_K, ACC_DTYPE)
    tl.store(proxy_mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(proxy_scale_ptr + offs_c, 1.0 / tl.sqrt(var + proxy_eps), mask=mask_c)


@triton.jit(do_not_specialize=["G", "tiles_per_split", "num_s_blocks", "num_tiles"])
def _group_stats_kernel(
    x_ptr,             # input, (N, C, S) through strides
    count_ptr,         # out (N*G, SPLIT) partial element counts, ACC_DTYPE   (unused if FINALIZE)
    mean_ptr,          # out (N*G, SPLIT) sums of x - shift, or (N*G,) group means if FINALIZE
    m2_ptr,            # out (N*G, SPLIT) partial sums of squared deviations, or (N*G,) rstd
    shift_ptr,         # out (N*G, SPLIT) the group's first element (unused if FINALIZE)
    G,                 # groups
    CPG,               # channels per group, C // G
    S,                 # spatial size, product of the spatial dims
    stride_n, stride_c, stride_s,  # x's strides in elements, seen as (N, C, S)
    eps: tl.float64,   # added to the group variance (used only if FINALIZE)
    tiles_per_split,   # (c-block, s-block) tiles of one group handled by each split
    num_s_blocks,      # s-blocks per group
    num_tiles,         # c-blocks * s-blocks per group
    FINALIZE: tl.constexpr,  # one split per group: write mean/rstd, not partial states
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,  # tile shape
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 input
    INDEX_64: tl.constexpr,   # x has 2**31 elements or more: 64-bit offsets
):
    ng, n, g = _group_of_program(G, INDEX_64)
    split = tl.program_id(1)
    base = x_ptr + n * stride_n + g * CPG * stride_c
    shift = tl.load(base).to(ACC_DTYPE)  # the group's first element, the same in every split
    count = tl.zeros([], tl.int64)
    mean = tl.zeros([], ACC_DTYPE)
    m2 = tl.zeros([], ACC_DTYPE)
    m2_error = tl.zeros([], ACC_DTYPE)
    total = tl.zeros([], ACC_DTYPE)  # compensated: the combine's mean comes from the sums
    total_error = tl.zeros([], ACC_DTYPE)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for tile in range(first, last):
        offs_c = (tile // num_s_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_s = (tile % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (offs_c < CPG)[:, None] & (offs_s < S)[None, :]
        x = tl.load(base + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s,
                    mask=mask, other=0.0).to(ACC_DTYPE)
        tile_count, tile_total, tile_mean, tile_m2 = _tile_moments(
            tl.where(mask, x - shift, 0.0), mask)
        count, mean, m2, m2_error = _merge_moments(count, mean, m2, m2_error, tile_count,
                                                   tile_mean, tile_m2)
        total, total_error = _add_compensated(total, total_error, tile_total)
    total += total_error
    m2 += m2_error
    if FINALIZE:
        tl.store(mean_ptr + ng, shift + total / count.to(ACC_DTYPE))
        tl.store(m2_ptr + ng, 1.0 / tl.sqrt(tl.maximum(m2 / count.to(ACC_DTYPE), 0.0)
                                            + tl.full([], eps, ACC_DTYPE)))
    else:
        # A split's count is exact in ACC_DTYPE: the plan keeps splits under 2**24 elements.
        num_splits = tl.num_programs(1)
        tl.store(count_ptr + ng * num_splits + split, count.to(ACC_DTYPE))
        tl.store(mean_ptr + ng * num_splits + split, total)
        tl.store(m2_ptr + ng * num_splits + split, m2)
        tl.store(shift_ptr + ng * num_splits + split, shift)


@triton.jit(do_not_specialize=["NG", "SPLIT"])
def _group_stats_combine_kernel(
    count_ptr, total_ptr, m2_ptr,  # (NG, SPLIT) partial states: count, sum of x - shift, M2
    shift_ptr,                     # (NG, SPLIT) the group's shift (the same in every split)
    group_mean_ptr,                # out (NG,) mean, ACC_DTYPE
    group_rstd_ptr,                # out (NG,) 1/sqrt(var + eps), ACC_DTYPE
    NG,                # groups in all, N * G
    SPLIT,             # partial states per group
    eps: tl.float64,   # added to the group variance
    BLOCK: tl.constexpr,      # groups per program
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 input
):
    eps = tl.full([], eps, ACC_DTYPE)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NG
    count = tl.zeros([BLOCK], tl.int64)
    mean = tl.zeros([BLOCK], ACC_DTYPE)
    m2 = tl.zeros([BLOCK], ACC_DTYPE)
    m2_error = tl.zeros([BLOCK], ACC_DTYPE)
    total = tl.zeros([BLOCK], ACC_DTYPE)
    total_error = tl.zeros([BLOCK], ACC_DTYPE)
    for split in range(0, SPLIT):  # fixed order: deterministic
        part_count = tl.load(count_ptr + offs * SPLIT + split, mask=mask, other=0.0)
        part_total = tl.load(total_ptr + offs * SPLIT + split, mask=mask, other=0.0)
        part_m2 = tl.load(m2_ptr + offs * SPLIT + split, mask=mask, other=0.0)
        count, mean, m2, m2_error = _merge_moments(
            count, mean, m2, m2_error, part_count.to(tl.int64),
            part_total / tl.maximum(part_count, 1.0), part_m2)
        total, total_error = _add_compensated(total, total_error, part_total)
    shift = tl.load(shift_ptr + offs * SPLIT, mask=mask, other=0.0)
    inv_count = 1.0 / tl.maximum(count, 1).to(ACC_DTYPE)
    tl.store(group_mean_ptr + offs, shift + (total + total_error) * inv_count, mask=mask)
    tl.store(group_rstd_ptr + offs,
             1.0 / tl.sqrt(tl.maximum((m2 + m2_error) * inv_count, 0.0) + eps), mask=mask)


@triton.jit(do_not_specialize=["C", "G", "CPG", "num_c_blocks", "num_s_blocks"])
def _forward_apply_kernel(
    x_ptr,             # input, (N, C, S) through strides (stride_n, stride_c, stride_s)
    y_ptr,             # out, same shape and strides as x
    group_mean_ptr,    # (N, G) ACC_DTYPE
    group_rstd_ptr,    # (N, G) ACC_DTYPE
    weight_ptr,        # (C,) gamma
    bias_ptr,          # (C,) beta
    proxy_mean_ptr,    # (C,) m_c (read only if PROXY)
    proxy_scale_ptr,   # (C,) s_c (read only if PROXY)
    C, S, G, CPG,      # channels, spatial size, groups, channels per group
    stride_n, stride_c, stride_s,  # x's (and y's) strides in elements, seen as (N, C, S)
    slope: tl.float64,  # leaky_relu slope (read only if ACT is leaky_relu)
    num_c_blocks, num_s_blocks,  # tiles along C and S: the grid is N * num_c_blocks * num_s_blocks
    ACT: tl.constexpr,  # activation id (fusednorm/activations.py)
    PROXY: tl.constexpr,  # Proxy Normalization on
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,  # tile shape
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 input
    INDEX_64: tl.constexpr,   # x has 2**31 elements or more: 64-bit offsets
):
    slope = tl.full([], slope, ACC_DTYPE)
    n, offs_c, offs_s, mask_c, mask_s = _tile_coords(
        tl.program_id(0), num_c_blocks, num_s_blocks, C, S, BLOCK_C, BLOCK_S, INDEX_64)
    mask = mask_c[:, None] & mask_s[None, :]
    group, mean, rstd, weight, bias = _load_norm_params(
        group_mean_ptr, group_rstd_ptr, weight_ptr, bias_ptr, n, offs_c, mask_c, G, CPG, ACC_DTYPE)
    offsets = n * stride_n + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    proxy_mean = mean  # unused placeholders when PN is off
    proxy_scale = rstd
    if PROXY:
        proxy_mean = tl.load(proxy_mean_ptr + offs_c, mask=mask_c, other=0.0)
        proxy_scale = tl.load(proxy_scale_ptr + offs_c, mask=mask_c, other=0.0)
    out = _apply(x, mean[:, None], rstd, weight, bias, proxy_mean, proxy_scale, slope, ACT, PROXY)
    tl.store(y_ptr + offsets, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["C", "G", "K"])
def _forward_group_kernel(
    x_ptr,             # input, (N, C, S) through strides (stride_n, stride_c, stride_s)
    y_ptr,             # out, same shape and strides as x
    group_mean_ptr,    # out (N, G) ACC_DTYPE
    group_rstd_ptr,    # out (N, G) ACC_DTYPE
    weight_ptr,        # (C,) gamma
    bias_ptr,          # (C,) beta
    proxy_bias_ptr,    # (C,) beta~ (read only if HAS_PROXY_BIAS)
    proxy_weight_ptr,  # (C,) gamma~ (read only if HAS_PROXY_WEIGHT)
    samples_ptr,       # (K,) proxy samples u_k, ACC_DTYPE (read only if PROXY)
    C, G, CPG, S,      # channels, groups, channels per group, spatial size
    stride_n, stride_c, stride_s,  # x's (and y's) strides in elements, seen as (N, C, S)
    K,                 # proxy samples
    slope: tl.float64,      # leaky_relu slope (read only if ACT is leaky_relu)
    eps: tl.float64,        # added to the group variance
    proxy_eps: tl.float64,  # added to the proxy variance
    inv_m: tl.float64,      # 1 / (CPG * S), from the host
    ACT: tl.constexpr,      # activation id (fusednorm/activations.py)
    PROXY: tl.constexpr,    # Proxy Normalization on
    HAS_PROXY_BIAS: tl.constexpr, HAS_PROXY_WEIGHT: tl.constexpr,  # beta~ / gamma~ given (else 0)
    RESIDENT: tl.constexpr,  # the group is one [BLOCK_C, BLOCK_S] tile (else: loop over tiles)
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,  # tile shape
    BLOCK_K: tl.constexpr,  # proxy samples per step of the prologue
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 input
    INDEX_64: tl.constexpr,   # x has 2**31 elements or more: 64-bit offsets
):
    """The whole forward of one (n, g) group in one program, one launch for the whole op.

    RESIDENT: the group is loaded once into registers; mean and variance by two passes over the
    registers (numerically stable), then y: x is read once from memory (2T in all).
    Otherwise the program walks the group twice, Chan's merge over tiles (_merge_moments), then
    y. The second walk follows the first within the same program, so it reads the group back
    from L2 while the programs running at once hold less than L2 (N*G programs, a few per SM,
    each group read shortly before): 2T from memory plus T from L2. A persistent walk was chosen
    over a thread-block-cluster reduction because Triton does not expose clusters' distributed
    shared memory; groups too large for the per-group grid to fill the GPU take the split path."""
    slope = tl.full([], slope, ACC_DTYPE)
    eps = tl.full([], eps, ACC_DTYPE)
    proxy_eps = tl.full([], proxy_eps, ACC_DTYPE)
    inv_m = tl.full([], inv_m, ACC_DTYPE)
    ng, n, g = _group_of_program(G, INDEX_64)
    x_base = x_ptr + n * stride_n + g * CPG * stride_c
    y_base = y_ptr + n * stride_n + g * CPG * stride_c
    if RESIDENT:
        offs_c, offs_s, mask_c, mask = _tile_in_group(0, 0, CPG, S, BLOCK_C, BLOCK_S)
        offsets = offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
        x = tl.load(x_base + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        mean = tl.sum(x) * inv_m
        d = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d) * inv_m + eps)
        weight, bias, proxy_mean, proxy_scale = _channel_params(
            weight_ptr, bias_ptr, proxy_bias_ptr, proxy_weight_ptr, samples_ptr, g * CPG + offs_c,
            mask_c, K, slope, proxy_eps, ACT, PROXY, HAS_PROXY_BIAS, HAS_PROXY_WEIGHT, BLOCK_K,
            ACC_DTYPE)
        out = _apply(x, mean, rstd, weight, bias, proxy_mean, proxy_scale, slope, ACT, PROXY)
        tl.store(y_base + offsets, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Shift: the mean of the group's first tile (read again from L1 by the loop).
        offs_c, offs_s, mask_c, mask = _tile_in_group(0, 0, CPG, S, BLOCK_C, BLOCK_S)
        x = _load_tile(x_base, offs_c, offs_s, stride_c, stride_s, mask, ACC_DTYPE)
        shift = tl.sum(x) / tl.sum(mask.to(ACC_DTYPE))
        count = tl.zeros([], tl.int64)
        mean = tl.zeros([], ACC_DTYPE)
        m2 = tl.zeros([], ACC_DTYPE)
        m2_error = tl.zeros([], ACC_DTYPE)
        for c0 in range(0, CPG, BLOCK_C):
            for s0 in range(0, S, BLOCK_S):
                offs_c, offs_s, mask_c, mask = _tile_in_group(c0, s0, CPG, S, BLOCK_C, BLOCK_S)
                x = _load_tile(x_base, offs_c, offs_s, stride_c, stride_s, mask, ACC_DTYPE)
                tile_count, _, tile_mean, tile_m2 = _tile_moments(
                    tl.where(mask, x - shift, 0.0), mask)
                count, mean, m2, m2_error = _merge_moments(count, mean, m2, m2_error, tile_count,
                                                           tile_mean, tile_m2)
        mean += shift
        rstd = 1.0 / tl.sqrt(tl.maximum((m2 + m2_error) * inv_m, 0.0) + eps)
        for c0 in range(0, CPG, BLOCK_C):
            offs_c, offs_s, mask_c, mask = _tile_in_group(c0, 0, CPG, S, BLOCK_C, BLOCK_S)
            weight, bias, proxy_mean, proxy_scale = _channel_params(
                weight_ptr, bias_ptr, proxy_bias_ptr, proxy_weight_ptr, samples_ptr,
                g * CPG + offs_c, mask_c, K, slope, proxy_eps, ACT, PROXY, HAS_PROXY_BIAS,
                HAS_PROXY_WEIGHT, BLOCK_K, ACC_DTYPE)
            for s0 in range(0, S, BLOCK_S):
                offs_c, offs_s, mask_c, mask = _tile_in_group(c0, s0, CPG, S, BLOCK_C, BLOCK_S)
                offsets = offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
                x = tl.load(x_base + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
                out = _apply(x, mean, rstd, weight, bias, proxy_mean, proxy_scale, slope, ACT,
                             PROXY)
                tl.store(y_base + offsets, out.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(group_mean_ptr + ng, mean)
    tl.store(group_rstd_ptr + ng, rstd)


# ----------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["N", "C", "G", "CPG", "num_c_blocks", "s_per_split", "plane"])
def _backward_partials_kernel(
    grad_ptr,          # dL/dy, (N, C, S) through strides (stride_gn, stride_gc, stride_gs)
    x_ptr,             # input, (N, C, S) through strides (stride_n, stride_c, stride_s)
    group_mean_ptr,    # (N, G)
    group_rstd_ptr,    # (N, G)
    weight_ptr,        # (C,) gamma
    bias_ptr,          # (C,) beta
    proxy_scale_ptr,   # (C,) s_c (read only if PROXY)
    partials_ptr,      # out (SPLIT, N, C) in each of 4 planes: A, B, D, E = sum_s g_z,
                       # g_z*xhat, g, g*a
    plane,             # elements from one plane to the next (a chunk writes part of each)
    N, C, S, G, CPG,   # batch, channels, spatial size, groups, channels per group
    stride_n, stride_c, stride_s,     # x's strides in elements, seen as (N, C, S)
    stride_gn, stride_gc, stride_gs,  # grad's strides likewise
    slope: tl.float64,  # leaky_relu slope (read only if ACT is leaky_relu)
    num_c_blocks,      # channel tiles: the grid is (N * num_c_blocks, SPLIT)
    s_per_split,       # spatial positions reduced by each split (a multiple of BLOCK_S)
    ACT: tl.constexpr,  # activation id (fusednorm/activations.py)
    PROXY: tl.constexpr,  # Proxy Normalization on: also D and E, and g_z scaled by s_c
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,  # tile shape
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 input
    INDEX_64: tl.constexpr,   # x has 2**31 elements or more: 64-bit offsets
):
    slope = tl.full([], slope, ACC_DTYPE)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = pid // num_c_blocks
    offs_c = (pid % num_c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    if INDEX_64:
        n = n.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    mask_c = offs_c < C
    group, mean, rstd, weight, bias = _load_norm_params(
        group_mean_ptr, group_rstd_ptr, weight_ptr, bias_ptr, n, offs_c, mask_c, G, CPG, ACC_DTYPE)
    proxy_scale = rstd
    if PROXY:
        proxy_scale = tl.load(proxy_scale_ptr + offs_c, mask=mask_c, other=0.0)
    # Per-channel accumulators: each tile is reduced along S before it is added, so that the
    # loop carries 4 * BLOCK_C values, not four full tiles (registers; no spills).
    sum_gz = tl.zeros([BLOCK_C], ACC_DTYPE)
    sum_gz_xhat = tl.zeros([BLOCK_C], ACC_DTYPE)
    sum_g = tl.zeros([BLOCK_C], ACC_DTYPE)
    sum_g_a = tl.zeros([BLOCK_C], ACC_DTYPE)
    s_start = split * s_per_split
    s_end = tl.minimum(s_start + s_per_split, S)
    for s0 in range(s_start, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        if INDEX_64:
            offs_s = offs_s.to(tl.int64)
        mask = mask_c[:, None] & (offs_s < s_end)[None, :]
        x = tl.load(x_ptr + n * stride_n + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s,
                    mask=mask, other=0.0).to(ACC_DTYPE)
        g = tl.load(grad_ptr + n * stride_gn + offs_c[:, None] * stride_gc + offs_s[None, :] * stride_gs,
                    mask=mask, other=0.0).to(ACC_DTYPE)
        xhat, g_z, z = _grad_tile(x, g, mean[:, None], rstd[:, None], weight, bias, proxy_scale,
                                  mask, slope, ACT, PROXY)
        if PROXY:
            sum_g += tl.sum(g, axis=1)
            sum_g_a += tl.sum(tl.where(mask, g * act_value(z, ACT, slope), 0.0), axis=1)
        sum_gz += tl.sum(g_z, axis=1)
        sum_gz_xhat += tl.sum(g_z * xhat, axis=1)
    out = partials_ptr + split * N * C + n * C + offs_c
    tl.store(out, sum_gz, mask=mask_c)
    tl.store(out + plane, sum_gz_xhat, mask=mask_c)
    if PROXY:
        tl.store(out + 2 * plane, sum_g, mask=mask_c)
        tl.store(out + 3 * plane, sum_g_a, mask=mask_c)


@triton.jit(do_not_specialize=["N", "C", "G", "SPLIT", "plane"])
def _backward_group_sums_kernel(
    partials_ptr,      # (SPLIT, N, C) in each plane, from _backward_partials_kernel
    plane,             # elements from one plane to the next
    weight_ptr,        # (C,) gamma
    group_sums_ptr,    # out (2, N, G): SA = sum_{c in g} gamma_c A_nc, SB likewise with B_nc
    N, C, G, CPG,      # batch, channels, groups, channels per group
    SPLIT,             # spatial splits of the partials, summed here in a fixed order
    BLOCK_C: tl.constexpr,    # channels per step
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 input
):
    ng = tl.program_id(0)
    n = ng // G
    g = ng % G
    sum_a = tl.zeros([BLOCK_C], ACC_DTYPE)
    sum_b = tl.zeros([BLOCK_C], ACC_DTYPE)
    for c0 in range(0, CPG, BLOCK_C):
        offs_c = g * CPG + c0 + tl.arange(0, BLOCK_C)
        mask_c = (c0 + tl.arange(0, BLOCK_C)) < CPG
        weight = tl.load(weight_ptr + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)
        part_a = tl.zeros([BLOCK_C], ACC_DTYPE)
        part_b = tl.zeros([BLOCK_C], ACC_DTYPE)
        for split in range(0, SPLIT):
            ptr = partials_ptr + split * N * C + n * C + offs_c
            part_a += tl.load(ptr, mask=mask_c, other=0.0)
            part_b += tl.load(ptr + plane, mask=mask_c, other=0.0)
        sum_a += weight * part_a
        sum_b += weight * part_b
    tl.store(group_sums_ptr + ng, tl.sum(sum_a))
    tl.store(group_sums_ptr + N * G + ng, tl.sum(sum_b))


@triton.jit(do_not_specialize=["C", "K", "ROWS"])
def _backward_params_kernel(
    partials_ptr,      # (4, ROWS, C): A, B, D, E per (split, n) row, from the partials kernel
    weight_ptr,        # (C,) gamma
    bias_ptr,          # (C,) beta
    proxy_bias_ptr,    # (C,) beta~ (read only if HAS_PROXY_BIAS)
    proxy_weight_ptr,  # (C,) gamma~ (read only if HAS_PROXY_WEIGHT)
    samples_ptr,       # (K,) proxy samples u_k
    grad_weight_ptr,        # out (C,) dgamma, in gamma's dtype
    grad_bias_ptr,          # out (C,) dbeta, in beta's dtype
    grad_proxy_bias_ptr,    # out (C,) dbeta~ (zeros without PN or beta~)
    grad_proxy_weight_ptr,  # out (C,) dgamma~ (zeros without PN or gamma~)
    C,                 # channels
    K,                 # proxy samples
    ROWS,              # rows of each partials plane, SPLIT * N, reduced here
    slope: tl.float64,      # leaky_relu slope (read only if ACT is leaky_relu)
    proxy_eps: tl.float64,  # added to the proxy variance
    ACT: tl.constexpr,      # activation id (fusednorm/activations.py)
    PROXY: tl.constexpr,    # Proxy Normalization on: D, E and the proxy gradients too
    HAS_PROXY_BIAS: tl.constexpr, HAS_PROXY_WEIGHT: tl.constexpr,  # beta~ / gamma~ given (else 0)
    BLOCK_R: tl.constexpr,  # rows per step of the reduction
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_K: tl.constexpr,  # proxy samples per step
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 input
):
    slope = tl.full([], slope, ACC_DTYPE)
    proxy_eps = tl.full([], proxy_eps, ACC_DTYPE)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    plane = ROWS * C
    sum_a = tl.zeros([BLOCK_C], ACC_DTYPE)
    sum_b = tl.zeros([BLOCK_C], ACC_DTYPE)
    sum_d = tl.zeros([BLOCK_C], ACC_DTYPE)
    sum_e = tl.zeros([BLOCK_C], ACC_DTYPE)
    # [BLOCK_R, BLOCK_C] tiles of the (ROWS, C) planes, each reduced over its rows: a fixed
    # order for a given launch plan, so the result is deterministic.
    for r0 in range(0, ROWS, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask = (offs_r < ROWS)[:, None] & mask_c[None, :]
        ptr = partials_ptr + offs_r[:, None] * C + offs_c[None, :]
        sum_a += tl.sum(tl.load(ptr, mask=mask, other=0.0), axis=0)
        sum_b += tl.sum(tl.load(ptr + plane, mask=mask, other=0.0), axis=0)
        if PROXY:
            sum_d += tl.sum(tl.load(ptr + 2 * plane, mask=mask, other=0.0), axis=0)
            sum_e += tl.sum(tl.load(ptr + 3 * plane, mask=mask, other=0.0), axis=0)
    grad_weight = sum_b
    grad_bias = sum_a
    grad_proxy_bias = tl.zeros([BLOCK_C], ACC_DTYPE)
    grad_proxy_weight = tl.zeros([BLOCK_C], ACC_DTYPE)
    if PROXY:
        weight, bias, proxy_bias, proxy_weight = _load_channel_params(
            weight_ptr, bias_ptr, proxy_bias_ptr, proxy_weight_ptr, offs_c, mask_c,
            HAS_PROXY_BIAS, HAS_PROXY_WEIGHT, ACC_DTYPE)
        proxy_mean, proxy_var = _proxy_moments(weight, bias, proxy_bias, proxy_weight,
                                               samples_ptr, K, slope, ACT, BLOCK_K, ACC_DTYPE)
        proxy_scale = 1.0 / tl.sqrt(proxy_var + proxy_eps)
        grad_mean = -proxy_scale * sum_d
        grad_var = -0.5 * proxy_scale * proxy_scale * proxy_scale * (sum_e - proxy_mean * sum_d)
        sum_h = tl.zeros([BLOCK_C], ACC_DTYPE)
        sum_h_x = tl.zeros([BLOCK_C], ACC_DTYPE)
        sum_h_u = tl.zeros([BLOCK_C], ACC_DTYPE)
        for k0 in range(0, K, BLOCK_K):
            u, proxy_x, p, mask_k = _proxy_values(weight, bias, proxy_bias, proxy_weight,
                                                  samples_ptr, k0, K, slope, ACT, BLOCK_K,
                                                  ACC_DTYPE)
            centered = act_value(p, ACT, slope) - proxy_mean[:, None]
            h = act_grad(p, ACT, slope) * (grad_mean[:, None] + 2.0 * grad_var[:, None] * centered)
            h = tl.where(mask_k[None, :], h, 0.0)
            sum_h += tl.sum(h, axis=1)
            sum_h_x += tl.sum(h * proxy_x, axis=1)
            sum_h_u += tl.sum(h * u[None, :], axis=1)
        grad_weight += sum_h_x / K
        grad_bias += sum_h / K
        if HAS_PROXY_BIAS:
            grad_proxy_bias = weight * sum_h / K
        if HAS_PROXY_WEIGHT:
            grad_proxy_weight = weight * sum_h_u / K
    # Each gradient straight into its parameter's dtype: no cast launches after this kernel.
    tl.store(grad_weight_ptr + offs_c, grad_weight.to(grad_weight_ptr.dtype.element_ty),
             mask=mask_c)
    tl.store(grad_bias_ptr + offs_c, grad_bias.to(grad_bias_ptr.dtype.element_ty), mask=mask_c)
    tl.store(grad_proxy_bias_ptr + offs_c,
             grad_proxy_bias.to(grad_proxy_bias_ptr.dtype.element_ty), mask=mask_c)
    tl.store(grad_proxy_weight_ptr + offs_c,
             grad_proxy_weight.to(grad_proxy_weight_ptr.dtype.element_ty), mask=mask_c)


@triton.jit(do_not_specialize=["N", "C", "G", "CPG", "num_c_blocks", "num_s_blocks"])
def _backward_dx_kernel(
    grad_ptr,          # dL/dy, (N, C, S) through strides (stride_gn, stride_gc, stride_gs)
    x_ptr,             # input, (N, C, S) through strides (stride_n, stride_c, stride_s)
    dx_ptr,            # out dL/dx, same strides as x
    group_mean_ptr,    # (N, G)
    group_rstd_ptr,    # (N, G)
    group_sums_ptr,    # (2, N, G) SA, SB
    weight_ptr,        # (C,) gamma
    bias_ptr,          # (C,) beta
    proxy_scale_ptr,   # (C,) s_c (read only if PROXY)
    N, C, S, G, CPG,   # batch, channels, spatial size, groups, channels per group
    stride_n, stride_c, stride_s,     # x's (and dx's) strides in elements, seen as (N, C, S)
    stride_gn, stride_gc, stride_gs,  # grad's strides likewise
    slope: tl.float64,  # leaky_relu slope (read only if ACT is leaky_relu)
    inv_m: tl.float64,  # 1 / M, M = CPG * S elements per group (from the host: CPG and S may
                        # both be the compile-time constant 1)
    num_c_blocks, num_s_blocks,  # tiles along C and S: the grid is N * num_c_blocks * num_s_blocks
    ACT: tl.constexpr,  # activation id (fusednorm/activations.py)
    PROXY: tl.constexpr,  # Proxy Normalization on
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,  # tile shape
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 input
    INDEX_64: tl.constexpr,   # x has 2**31 elements or more: 64-bit offsets
):
    slope = tl.full([], slope, ACC_DTYPE)
    inv_m = tl.full([], inv_m, ACC_DTYPE)
    n, offs_c, offs_s, mask_c, mask_s = _tile_coords(
        tl.program_id(0), num_c_blocks, num_s_blocks, C, S, BLOCK_C, BLOCK_S, INDEX_64)
    mask = mask_c[:, None] & mask_s[None, :]
    group, mean, rstd, weight, bias = _load_norm_params(
        group_mean_ptr, group_rstd_ptr, weight_ptr, bias_ptr, n, offs_c, mask_c, G, CPG, ACC_DTYPE)
    sum_a = tl.load(group_sums_ptr + group, mask=mask_c, other=0.0) * inv_m
    sum_b = tl.load(group_sums_ptr + N * G + group, mask=mask_c, other=0.0) * inv_m
    x = tl.load(x_ptr + n * stride_n + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s,
                mask=mask, other=0.0).to(ACC_DTYPE)
    g = tl.load(grad_ptr + n * stride_gn + offs_c[:, None] * stride_gc + offs_s[None, :] * stride_gs,
                mask=mask, other=0.0).to(ACC_DTYPE)
    proxy_scale = rstd
    if PROXY:
        proxy_scale = tl.load(proxy_scale_ptr + offs_c, mask=mask_c, other=0.0)
    xhat, g_z, z = _grad_tile(x, g, mean[:, None], rstd[:, None], weight, bias, proxy_scale, mask,
                              slope, ACT, PROXY)
    dx = rstd[:, None] * (weight[:, None] * g_z - sum_a[:, None] - xhat * sum_b[:, None])
    tl.store(dx_ptr + n * stride_n + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s,
             dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "C", "G", "K"])
def _backward_group_kernel(
    grad_ptr,          # dL/dy, (N, C, S) through strides (stride_gn, stride_gc, stride_gs)
    x_ptr,             # input, (N, C, S) through strides (stride_n, stride_c, stride_s)
    dx_ptr,            # out dL/dx, same strides as x
    group_mean_ptr,    # (N, G) ACC_DTYPE, from the forward
    group_rstd_ptr,    # (N, G) ACC_DTYPE, from the forward
    weight_ptr,        # (C,) gamma
    bias_ptr,          # (C,) beta
    proxy_bias_ptr,    # (C,) beta~ (read only if HAS_PROXY_BIAS)
    proxy_weight_ptr,  # (C,) gamma~ (read only if HAS_PROXY_WEIGHT)
    samples_ptr,       # (K,) proxy samples u_k, ACC_DTYPE (read only if PROXY)
    partials_ptr,      # out (4, N, C) ACC_DTYPE: A, B, D, E = sum_s g_z, g_z*xhat, g, g*a
    N, C, G, CPG, S,   # batch, channels, groups, channels per group, spatial size
    stride_n, stride_c, stride_s,     # x's (and dx's) strides in elements, seen as (N, C, S)
    stride_gn, stride_gc, stride_gs,  # grad's strides likewise
    K,                 # proxy samples
    slope: tl.float64,      # leaky_relu slope (read only if ACT is leaky_relu)
    proxy_eps: tl.float64,  # added to the proxy variance
    inv_m: tl.float64,      # 1 / (CPG * S), from the host
    ACT: tl.constexpr,      # activation id (fusednorm/activations.py)
    PROXY: tl.constexpr,    # Proxy Normalization on: D and E too, g_z scaled by s_c
    HAS_PROXY_BIAS: tl.constexpr, HAS_PROXY_WEIGHT: tl.constexpr,  # beta~ / gamma~ given (else 0)
    RESIDENT: tl.constexpr,  # the group is one [BLOCK_C, BLOCK_S] tile (else: loop over tiles)
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,  # tile shape
    BLOCK_K: tl.constexpr,  # proxy samples per step of the prologue
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 input
    INDEX_64: tl.constexpr,   # x has 2**31 elements or more: 64-bit offsets
):
    """The backward of one (n, g) group in one program: the per-channel partials A, B, D, E, the
    group sums SA = sum_c gamma_c A_c and SB likewise, then dx = rstd (gamma g_z - SA/M -
    xhat SB/M). RESIDENT reads x and g once (3T with dx); otherwise a second walk over the group
    re-reads them from L2 (3T from memory + 2T from L2), as in the forward."""
    slope = tl.full([], slope, ACC_DTYPE)
    proxy_eps = tl.full([], proxy_eps, ACC_DTYPE)
    inv_m = tl.full([], inv_m, ACC_DTYPE)
    ng, n, g_idx = _group_of_program(G, INDEX_64)
    mean = tl.load(group_mean_ptr + ng)
    rstd = tl.load(group_rstd_ptr + ng)
    c_first = g_idx * CPG
    x_base = x_ptr + n * stride_n + c_first * stride_c
    g_base = grad_ptr + n * stride_gn + c_first * stride_gc
    dx_base = dx_ptr + n * stride_n + c_first * stride_c
    partials = partials_ptr + n * C + c_first
    plane = N * C
    if RESIDENT:
        offs_c, offs_s, mask_c, mask = _tile_in_group(0, 0, CPG, S, BLOCK_C, BLOCK_S)
        offsets = offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
        x = tl.load(x_base + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        g = _load_tile(g_base, offs_c, offs_s, stride_gc, stride_gs, mask, ACC_DTYPE)
        weight, bias, proxy_mean, proxy_scale = _channel_params(
            weight_ptr, bias_ptr, proxy_bias_ptr, proxy_weight_ptr, samples_ptr, c_first + offs_c,
            mask_c, K, slope, proxy_eps, ACT, PROXY, HAS_PROXY_BIAS, HAS_PROXY_WEIGHT, BLOCK_K,
            ACC_DTYPE)
        xhat, g_z, z = _grad_tile(x, g, mean, rstd, weight, bias, proxy_scale, mask, slope, ACT,
                                  PROXY)
        sum_gz = tl.sum(g_z, axis=1)
        sum_gz_xhat = tl.sum(g_z * xhat, axis=1)
        sum_g = sum_gz
        sum_g_a = sum_gz
        if PROXY:
            sum_g = tl.sum(g, axis=1)
            sum_g_a = tl.sum(tl.where(mask, g * act_value(z, ACT, slope), 0.0), axis=1)
        _store_partials(partials, plane, offs_c, mask_c, sum_gz, sum_gz_xhat, sum_g, sum_g_a,
                        PROXY)
        group_a = tl.sum(weight * sum_gz) * inv_m
        group_b = tl.sum(weight * sum_gz_xhat) * inv_m
        dx = rstd * (weight[:, None] * g_z - group_a - xhat * group_b)
        tl.store(dx_base + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        group_a = tl.zeros([], ACC_DTYPE)
        group_b = tl.zeros([], ACC_DTYPE)
        for c0 in range(0, CPG, BLOCK_C):
            offs_c, offs_s, mask_c, mask = _tile_in_group(c0, 0, CPG, S, BLOCK_C, BLOCK_S)
            weight, bias, proxy_mean, proxy_scale = _channel_params(
                weight_ptr, bias_ptr, proxy_bias_ptr, proxy_weight_ptr, samples_ptr,
                c_first + offs_c, mask_c, K, slope, proxy_eps, ACT, PROXY, HAS_PROXY_BIAS,
                HAS_PROXY_WEIGHT, BLOCK_K, ACC_DTYPE)
            sum_gz = tl.zeros([BLOCK_C], ACC_DTYPE)
            sum_gz_xhat = tl.zeros([BLOCK_C], ACC_DTYPE)
            sum_g = tl.zeros([BLOCK_C], ACC_DTYPE)
            sum_g_a = tl.zeros([BLOCK_C], ACC_DTYPE)
            for s0 in range(0, S, BLOCK_S):
                offs_c, offs_s, mask_c, mask = _tile_in_group(c0, s0, CPG, S, BLOCK_C, BLOCK_S)
                x = _load_tile(x_base, offs_c, offs_s, stride_c, stride_s, mask, ACC_DTYPE)
                g = _load_tile(g_base, offs_c, offs_s, stride_gc, stride_gs, mask, ACC_DTYPE)
                xhat, g_z, z = _grad_tile(x, g, mean, rstd, weight, bias, proxy_scale, mask, slope,
                                          ACT, PROXY)
                sum_gz += tl.sum(g_z, axis=1)
                sum_gz_xhat += tl.sum(g_z * xhat, axis=1)
                if PROXY:
                    sum_g += tl.sum(g, axis=1)
                    sum_g_a += tl.sum(tl.where(mask, g * act_value(z, ACT, slope), 0.0), axis=1)
            _store_partials(partials, plane, offs_c, mask_c, sum_gz, sum_gz_xhat, sum_g, sum_g_a,
                            PROXY)
            group_a += tl.sum(weight * sum_gz)
            group_b += tl.sum(weight * sum_gz_xhat)
        group_a = group_a * inv_m
        group_b = group_b * inv_m
        for c0 in range(0, CPG, BLOCK_C):
            offs_c, offs_s, mask_c, mask = _tile_in_group(c0, 0, CPG, S, BLOCK_C, BLOCK_S)
            weight, bias, proxy_mean, proxy_scale = _channel_params(
                weight_ptr, bias_ptr, proxy_bias_ptr, proxy_weight_ptr, samples_ptr,
                c_first + offs_c, mask_c, K, slope, proxy_eps, ACT, PROXY, HAS_PROXY_BIAS,
                HAS_PROXY_WEIGHT, BLOCK_K, ACC_DTYPE)
            for s0 in range(0, S, BLOCK_S):
                offs_c, offs_s, mask_c, mask = _tile_in_group(c0, s0, CPG, S, BLOCK_C, BLOCK_S)
                offsets = offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
                x = tl.load(x_base + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
                g = _load_tile(g_base, offs_c, offs_s, stride_gc, stride_gs, mask, ACC_DTYPE)
                xhat, g_z, z = _grad_tile(x, g, mean, rstd, weight, bias, proxy_scale, mask, slope,
                                          ACT, PROXY)
                dx = rstd * (weight[:, None] * g_z - group_a - xhat * group_b)
                tl.store(dx_base + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _strides_ncs(x: torch.Tensor) -> tuple[int, int, int]:
    """(stride_n, stride_c, stride_s) of a dense_layout tensor seen as (N, C, S)."""
    if x.dim() == 2:
        return x.stride(0), x.stride(1), 1
    if x.is_contiguous():
        return x.stride(0), x.stride(1), 1
    return x.stride(0), 1, x.shape[1]


@dataclass(frozen=True)
class DeviceTraits:
    """What the launch plan depends on: GPU tiles or the interpreter's, the SM count, and the L2
    size (the split path walks the batch in chunks that stay in L2 between two kernels)."""
    gpu: bool
    sm_count: int
    l2_bytes: int


_TRAITS_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("fusednorm_traits", default=None)


@contextlib.contextmanager
def plan_as_gpu(sm_count: int, l2_bytes: int = 50 * 2**20):
    """Launch plans (tiles, splits, warps) as for a GPU with ``sm_count`` SMs and ``l2_bytes`` of
    L2 (default: an H100's), whatever device the tensors are on: lets ``tools/gpu_compile.py``
    compile, on a machine without a GPU, exactly the specializations a GPU run would launch."""
    token = _TRAITS_OVERRIDE.set(DeviceTraits(gpu=True, sm_count=sm_count, l2_bytes=l2_bytes))
    try:
        yield
    finally:
        _TRAITS_OVERRIDE.reset(token)


@functools.lru_cache(maxsize=None)
def _gpu_traits(device_index: int) -> DeviceTraits:
    props = torch.cuda.get_device_properties(device_index)
    l2_bytes = getattr(props, "L2_cache_size", 0) or 40 * 2**20
    return DeviceTraits(gpu=True, sm_count=props.multi_processor_count, l2_bytes=l2_bytes)


def device_traits(device: torch.device) -> DeviceTraits:
    override = _TRAITS_OVERRIDE.get()
    if override is not None:
        return override
    if device.type == "cuda":
        return _gpu_traits(device.index if device.index is not None else torch.cuda.current_device())
    # The interpreter: 2 "SMs" and an 8 KB "L2", so that small test shapes reach the split path
    # and its chunking.
    return DeviceTraits(gpu=False, sm_count=2, l2_bytes=8 * 2**10)


def _target_programs(traits: DeviceTraits) -> int:
    """Programs that fill the device. Under the interpreter a small number, so that the
    split-reduction paths are exercised by small test shapes."""
    return 4 * traits.sm_count if traits.gpu else 8


def _tile_shape(channels: int, spatial: int, channels_last: bool, traits: DeviceTraits):
    """(BLOCK_C, BLOCK_S) of a 2-D tile; the contiguous axis gets the larger share."""
    # 1024 elements: the backward holds x, g and several intermediates per element; 2048-element
    # tiles spilled (ptxas kept 8-warp programs at 80 registers).
    tile = 1024 if traits.gpu else 16384  # the interpreter pays per program, not per lane
    if channels_last:
        block_c = min(triton.next_power_of_2(channels), 64)
        block_s = min(triton.next_power_of_2(spatial), max(1, tile // block_c))
    else:
        block_s = min(triton.next_power_of_2(spatial), tile)
        block_c = min(triton.next_power_of_2(channels), max(1, tile // block_s))
    return block_c, block_s


def _num_warps(block_c: int, block_s: int) -> int:
    # 4 elements per thread of a 1024-element tile: at 8 per thread ptxas held some fp16
    # backward specializations to 80 registers and spilled.
    return 8 if block_c * block_s >= 1024 else 4


def _on_device(x_position: int):
    """Runs a launcher with its x argument's CUDA device current: Triton launches on the current
    device, which need not be the tensor's."""
    def decorate(launcher):
        @functools.wraps(launcher)
        def wrapper(*args, **kwargs):
            x = args[x_position]
            if not x.is_cuda:
                return launcher(*args, **kwargs)
            with torch.cuda.device(x.device):
                return launcher(*args, **kwargs)
        return wrapper
    return decorate


PATHS = ("resident", "looped", "split")
PATH_ENV = "FUSEDNORM_TRITON_PATH"
# Inputs with this many elements or more get 64-bit offsets (INDEX_64): int32 products of a
# program's (n, g) or tile coordinates with the strides overflow at 2**31.
INDEX_64_ELEMENTS = 2**31 - 1


def _group_tile(cpg: int, spatial: int, traits: DeviceTraits):
    """(BLOCK_C, BLOCK_S, num_warps) of a tile holding a whole group, or None when the group is
    larger than a program keeps in registers: 2048 elements on a GPU, at most 4 per thread (16
    warps), the density at which the GELU backward compiled without spills on sm_80/sm_90 (at 8
    per thread ptxas capped some at 64-128 registers and spilled; see
    bench/results/triton-resources-sm90.md); 256 under the interpreter, so that small test shapes
    reach the looped and split paths too."""
    block_c, block_s = triton.next_power_of_2(cpg), triton.next_power_of_2(spatial)
    limit = 2048 if traits.gpu else 256
    if block_c * block_s > limit:
        return None
    return block_c, block_s, max(4, min(16, block_c * block_s // 128))


def choose_path(N: int, G: int, CPG: int, S: int, traits: DeviceTraits) -> str:
    """The one rule that picks a path, unless ``$FUSEDNORM_TRITON_PATH`` forces one:
    - resident: the group fits one program's registers: x read once (fwd 2T, bwd 3T), 1 launch
      forward, 2 backward;
    - looped: one program per group walks it twice, the second walk from L2 (fwd 2T + T from L2,
      bwd 3T + 2T from L2), same launches; taken when the N*G programs fill the SMs;
    - split: few large groups (N*G below the SM count): the statistics and the partial sums are
      split over many programs (fwd 3T in 3-4 launches, bwd 5T in 5)."""
    forced = os.environ.get(PATH_ENV, "auto").strip().lower() or "auto"
    if forced not in PATHS + ("auto",):
        raise ValueError(f"${PATH_ENV}={forced!r}: expected one of {PATHS + ('auto',)}")
    fits = _group_tile(CPG, S, traits) is not None
    if forced == "resident" and not fits:
        raise ValueError(f"${PATH_ENV}=resident: a group of {CPG}x{S} elements does not fit one "
                         f"program (limit {'2048' if traits.gpu else '256'} after rounding up to "
                         f"powers of two)")
    if forced != "auto":
        return forced
    if fits:
        return "resident"
    return "looped" if N * G >= traits.sm_count else "split"


@dataclass
class Step:
    """One kernel launch of a plan and what it moves: ``x_passes`` x-sized tensors read or written
    in memory (x, y, grad, dx: T bytes each), ``l2_passes`` x-sized tensors read a second time by
    the same program shortly after (expected from L2), and ``small_bytes`` of the (N, G), (N, C)
    and (C,) statistics, partial sums and parameters."""
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict
    x_passes: float  # a kernel over a chunk of the batch moves that share of each tensor
    small_bytes: int
    l2_passes: float = 0

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__.lstrip("_")


@dataclass
class Plan:
    """What one call launches, in order, and the tensors it returns. ``run`` launches; the
    byte and launch tables (tools/launch_table.py) read ``steps`` without launching."""
    path: str
    steps: list
    outputs: tuple

    def run(self):
        for step in self.steps:
            step.kernel[step.grid](*step.args, **step.kwargs)
        return self.outputs


class _Launch:
    """Shapes, strides and compile-time flags shared by the forward and backward plans."""

    def __init__(self, x, num_groups, activation, proxy_bias, proxy_weight):
        self.N, self.C = x.shape[:2]
        self.S = x[0, 0].numel() if x.dim() > 2 else 1
        self.G = num_groups
        self.CPG = self.C // num_groups
        self.strides = _strides_ncs(x)
        self.channels_last = x.dim() > 2 and not x.is_contiguous()
        self.acc_torch = accumulation_dtype(x.dtype)
        self.acc_tl = tl.float64 if self.acc_torch == torch.float64 else tl.float32
        self.acc_size = self.acc_torch.itemsize
        self.index_64 = x.numel() >= INDEX_64_ELEMENTS
        self.flags = dict(ACT=activation, ACC_DTYPE=self.acc_tl)
        self.has_proxy_bias = proxy_bias is not None
        self.has_proxy_weight = proxy_weight is not None
        self.proxy_flags = dict(HAS_PROXY_BIAS=self.has_proxy_bias,
                                HAS_PROXY_WEIGHT=self.has_proxy_weight)
        self.device = x.device
        self.traits = device_traits(x.device)
        self.path = choose_path(self.N, self.G, self.CPG, self.S, self.traits)
        self.inv_m = 1.0 / (self.CPG * self.S)
        self.elem_size = x.element_size()
        self.param_bytes = 4 * self.C * self.acc_size  # gamma, beta, beta~, gamma~ at most

    def group_step(self, kernel, args, small_bytes, num_tensors):
        """The per-group kernel (resident or looped) over num_tensors x-sized tensors."""
        group_tile = _group_tile(self.CPG, self.S, self.traits)
        resident = self.path == "resident"
        if resident:
            block_c, block_s, warps = group_tile
        else:
            block_c, block_s = _tile_shape(self.CPG, self.S, self.channels_last, self.traits)
            # 4 warps (8 elements per thread of a 1024-element tile): at 8 or 16 warps ptxas
            # held some specializations to 32-64 registers and spilled.
            warps = 4 if self.traits.gpu else _num_warps(block_c, block_s)
        # Each program walks a looped group twice: every x-sized input is read a second time.
        return Step(kernel, (self.N * self.G,), args,
                    dict(RESIDENT=resident, BLOCK_C=block_c, BLOCK_S=block_s,
                         BLOCK_K=_proxy_block_k(block_c), INDEX_64=self.index_64,
                         num_warps=warps, **self.proxy_flags, **self.flags),
                    num_tensors, small_bytes + self.param_bytes,
                    0 if resident else num_tensors - 1)

    def proxy_stats_steps(self, proxy, weight, bias, proxy_bias, proxy_weight, slope, proxy_eps,
                          samples, placeholder):
        """([the proxy statistics launch], m_c, s_c) of the split path; with PN off no launch,
        and ``placeholder`` for the pointers the kernels then do not read."""
        if not proxy:
            return [], placeholder, placeholder
        num_samples = samples.numel()
        proxy_mean = torch.empty(self.C, dtype=self.acc_torch, device=self.device)
        proxy_scale = torch.empty_like(proxy_mean)
        block_c = min(triton.next_power_of_2(self.C), 16)
        step = Step(_proxy_stats_kernel, (triton.cdiv(self.C, block_c),),
                    (weight, bias, _or(proxy_bias, weight), _or(proxy_weight, weight), samples,
                     proxy_mean, proxy_scale, self.C, num_samples, slope, proxy_eps),
                    dict(BLOCK_C=block_c, BLOCK_K=_proxy_block_k(block_c), **self.proxy_flags,
                         **self.flags), 0, 2 * self.C * self.acc_size + self.param_bytes)
        return [step], proxy_mean, proxy_scale

    def elementwise_meta(self, batch: int):
        """Grid and meta-parameters of an elementwise kernel over ``batch`` samples."""
        block_c, block_s = _tile_shape(self.C, self.S, self.channels_last, self.traits)
        num_c_blocks, num_s_blocks = triton.cdiv(self.C, block_c), triton.cdiv(self.S, block_s)
        grid = (batch * num_c_blocks * num_s_blocks,)
        meta = dict(num_c_blocks=num_c_blocks, num_s_blocks=num_s_blocks, BLOCK_C=block_c,
                    BLOCK_S=block_s, INDEX_64=self.index_64, num_warps=_num_warps(block_c, block_s))
        return grid, meta

    def l2_chunks(self, num_tensors: int):
        """(n0, n1, fits) for chunks of the batch whose ``num_tensors`` x-sized tensors take at
        most half the L2 (the other half for everything else), so that a second kernel over the
        chunk reads them from L2; ``fits`` is False for a chunk of one sample that is larger."""
        per_sample = num_tensors * self.C * self.S * self.elem_size
        chunk = max(1, (self.traits.l2_bytes // 2) // max(per_sample, 1))
        for n0 in range(0, self.N, chunk):
            n1 = min(self.N, n0 + chunk)
            yield n0, n1, (n1 - n0) * per_sample <= self.traits.l2_bytes // 2


def _proxy_block_k(block_c: int) -> int:
    """Samples per step of a [block_c, BLOCK_K] proxy tile: about 1024 elements, 8 per thread
    (256-wide tiles took up to 240 registers)."""
    return max(1, min(64, 1024 // block_c))


def _or(tensor, fallback):
    """Kernels take a pointer for every optional tensor; a flag says whether to read it."""
    return fallback if tensor is None else tensor


def _dense_params(*params):
    """The kernels index parameters as ``ptr + c``: a strided view (``w[::2]``) is copied."""
    return tuple(None if p is None else p.contiguous() for p in params)


def forward_plan(x, weight, bias, proxy_bias, proxy_weight, samples, num_groups, activation,
                 slope, eps, proxy_eps, proxy) -> Plan:
    """The launches of one forward; ``plan.run()`` returns (y, mean, rstd)."""
    x = dense_layout(x)
    if x.numel() == 0:  # nothing to launch: groups without elements have variance 0
        mean = torch.zeros((x.shape[0], num_groups), dtype=accumulation_dtype(x.dtype),
                           device=x.device)
        return Plan("empty", [], (torch.empty_like(x), mean, torch.full_like(mean, eps ** -0.5)))
    weight, bias, proxy_bias, proxy_weight = _dense_params(weight, bias, proxy_bias, proxy_weight)
    launch = _Launch(x, num_groups, activation, proxy_bias, proxy_weight)
    N, C, S, G, CPG = launch.N, launch.C, launch.S, launch.G, launch.CPG
    y = torch.empty_like(x)
    mean = torch.empty((N, G), dtype=launch.acc_torch, device=x.device)
    rstd = torch.empty_like(mean)
    stats_bytes = 2 * N * G * launch.acc_size
    if launch.path != "split":
        step = launch.group_step(
            _forward_group_kernel,
            (x, y, mean, rstd, weight, bias, _or(proxy_bias, weight), _or(proxy_weight, weight),
             samples, C, G, CPG, S, *launch.strides, samples.numel(), slope, eps, proxy_eps,
             launch.inv_m),
            stats_bytes, num_tensors=2)
        step.kwargs["PROXY"] = proxy
        return Plan(launch.path, [step], (y, mean, rstd))

    steps, proxy_mean, proxy_scale = launch.proxy_stats_steps(
        proxy, weight, bias, proxy_bias, proxy_weight, slope, proxy_eps, samples, mean)
    # Group statistics split over programs (N*G alone would not fill the device), merged in a
    # fixed order by a second small kernel, then y. Batch chunks small enough to stay in L2
    # between the statistics and the apply kernel: the apply reads x again from L2.
    block_c, block_s = _tile_shape(CPG, S, launch.channels_last, launch.traits)
    num_s_blocks = triton.cdiv(S, block_s)
    num_tiles = triton.cdiv(CPG, block_c) * num_s_blocks
    target = _target_programs(launch.traits)
    for n0, n1, in_l2 in launch.l2_chunks(num_tensors=1):
        chunk, share = slice(n0, n1), (n1 - n0) / N  # share: of the x-sized tensors
        xc, yc, mc, rc = x[chunk], y[chunk], mean[chunk], rstd[chunk]
        ngc = (n1 - n0) * G
        # Enough splits to fill the device; each under 2**24 elements, so that its count is
        # exact in fp32 (the group's own count is an integer).
        tile_elements = block_c * block_s
        splits = min(num_tiles, triton.cdiv(target, ngc))
        if splits > 1:
            splits = min(num_tiles, max(splits, triton.cdiv(num_tiles * tile_elements, 2**24)))
        tiles_per_split = triton.cdiv(num_tiles, splits)
        splits = triton.cdiv(num_tiles, tiles_per_split)
        stats_meta = dict(G=G, CPG=CPG, S=S, stride_n=launch.strides[0],
                          stride_c=launch.strides[1], stride_s=launch.strides[2], eps=eps,
                          tiles_per_split=tiles_per_split, num_s_blocks=num_s_blocks,
                          num_tiles=num_tiles, BLOCK_C=block_c, BLOCK_S=block_s,
                          ACC_DTYPE=launch.acc_tl, INDEX_64=launch.index_64,
                          num_warps=_num_warps(block_c, block_s))
        chunk_stats_bytes = 2 * ngc * launch.acc_size
        if splits == 1:
            steps.append(Step(_group_stats_kernel, (ngc, 1), (xc, mc, mc, rc, rc),
                              dict(FINALIZE=True, **stats_meta), share, chunk_stats_bytes))
        else:
            # Planes: count, sum of x - shift, M2, shift.
            partial = torch.empty((4, ngc, splits), dtype=launch.acc_torch, device=x.device)
            partial_bytes = partial.numel() * launch.acc_size
            steps.append(Step(_group_stats_kernel, (ngc, splits), (xc, *partial),
                              dict(FINALIZE=False, **stats_meta), share, partial_bytes))
            block = min(triton.next_power_of_2(ngc), 1024)
            steps.append(Step(_group_stats_combine_kernel, (triton.cdiv(ngc, block),),
                              (*partial, mc, rc, ngc, splits, eps),
                              dict(BLOCK=block, ACC_DTYPE=launch.acc_tl), 0,
                              partial_bytes + chunk_stats_bytes))
        grid, meta = launch.elementwise_meta(n1 - n0)
        steps.append(Step(_forward_apply_kernel, grid,
                          (xc, yc, mc, rc, weight, bias, proxy_mean, proxy_scale, C, S, G, CPG,
                           *launch.strides, slope),
                          dict(PROXY=proxy, **launch.flags, **meta), share * (1 if in_l2 else 2),
                          chunk_stats_bytes + launch.param_bytes, share if in_l2 else 0))
    return Plan("split", steps, (y, mean, rstd))


def backward_plan(grad_out, x, weight, bias, proxy_bias, proxy_weight, samples, mean, rstd,
                  num_groups, activation, slope, proxy_eps, proxy) -> Plan:
    """The launches of one backward; ``plan.run()`` returns (dx, dweight, dbias, dproxy_bias,
    dproxy_weight)."""
    x = dense_layout(x)
    grad_out = dense_layout(grad_out)
    param_dtypes = (weight.dtype, bias.dtype, _or(proxy_bias, weight).dtype,
                    _or(proxy_weight, weight).dtype)
    if x.numel() == 0:  # no elements: every sum, and so every parameter gradient, is 0
        return Plan("empty", [], (torch.empty_like(x), *(
            torch.zeros(x.shape[1], dtype=dtype, device=x.device) for dtype in param_dtypes)))
    weight, bias, proxy_bias, proxy_weight = _dense_params(weight, bias, proxy_bias, proxy_weight)
    launch = _Launch(x, num_groups, activation, proxy_bias, proxy_weight)
    N, C, S, G, CPG = launch.N, launch.C, launch.S, launch.G, launch.CPG
    grad_strides = _strides_ncs(grad_out)
    dx = torch.empty_like(x)
    # Separate tensors (the ops' outputs may not alias one another), each in its parameter's
    # dtype, written by the parameter kernel.
    grads = [torch.empty(C, dtype=dtype, device=x.device) for dtype in param_dtypes]
    stats_bytes = 2 * N * G * launch.acc_size
    steps = []
    if launch.path != "split":
        partials = torch.empty((4, 1, N, C), dtype=launch.acc_torch, device=x.device)
        partial_bytes = partials.numel() * launch.acc_size
        step = launch.group_step(
            _backward_group_kernel,
            (grad_out, x, dx, mean, rstd, weight, bias, _or(proxy_bias, weight),
             _or(proxy_weight, weight), samples, partials, N, C, G, CPG, S, *launch.strides,
             *grad_strides, samples.numel(), slope, proxy_eps, launch.inv_m),
            stats_bytes + partial_bytes, num_tensors=3)
        step.kwargs["PROXY"] = proxy
        steps.append(step)
        rows = N
    else:
        steps, _, proxy_scale = launch.proxy_stats_steps(
            proxy, weight, bias, proxy_bias, proxy_weight, slope, proxy_eps, samples, mean)
        # Per chunk of the batch that x and grad fit L2 with: per-(n, c) partial sums split over
        # S so that the programs fill the device, the group sums SA, SB, then dx, which reads x
        # and grad again from L2. Each chunk fills its own rows of the partials.
        block_c, block_s = _tile_shape(C, S, launch.channels_last, launch.traits)
        num_c_blocks = triton.cdiv(C, block_c)
        num_s_blocks = triton.cdiv(S, block_s)
        target = _target_programs(launch.traits)
        chunks = []
        for n0, n1, in_l2 in launch.l2_chunks(num_tensors=2):
            row_blocks = (n1 - n0) * num_c_blocks
            splits = 1 if row_blocks >= target else min(num_s_blocks,
                                                        triton.cdiv(target, row_blocks))
            s_per_split = triton.cdiv(num_s_blocks, splits) * block_s
            chunks.append((n0, n1, in_l2, triton.cdiv(S, s_per_split), s_per_split))
        rows = sum(splits * (n1 - n0) for n0, n1, _, splits, _ in chunks)
        partials = torch.empty((4, rows, C), dtype=launch.acc_torch, device=x.device)
        partial_bytes = partials.numel() * launch.acc_size
        row0 = 0
        for n0, n1, in_l2, splits, s_per_split in chunks:
            chunk, nc = slice(n0, n1), n1 - n0
            share = nc / N  # of the x-sized tensors
            xc, gc, dxc, mc, rc = x[chunk], grad_out[chunk], dx[chunk], mean[chunk], rstd[chunk]
            pc = partials[:, row0:row0 + splits * nc]
            row0 += splits * nc
            chunk_partial_bytes = pc.numel() * launch.acc_size
            chunk_stats_bytes = 2 * nc * G * launch.acc_size
            steps.append(Step(
                _backward_partials_kernel, (nc * num_c_blocks, splits),
                (gc, xc, mc, rc, weight, bias, proxy_scale, pc, rows * C, nc, C, S, G, CPG,
                 *launch.strides, *grad_strides, slope, num_c_blocks, s_per_split),
                dict(PROXY=proxy, BLOCK_C=block_c, BLOCK_S=block_s, INDEX_64=launch.index_64,
                     num_warps=_num_warps(block_c, block_s), **launch.flags),
                2 * share, chunk_stats_bytes + chunk_partial_bytes + launch.param_bytes))
            group_sums = torch.empty((2, nc, G), dtype=launch.acc_torch, device=x.device)
            steps.append(Step(
                _backward_group_sums_kernel, (nc * G,),
                (pc, rows * C, weight, group_sums, nc, C, G, CPG, splits),
                dict(BLOCK_C=min(triton.next_power_of_2(CPG), 1024), ACC_DTYPE=launch.acc_tl),
                0, chunk_partial_bytes // 2 + chunk_stats_bytes))
            grid, meta = launch.elementwise_meta(nc)
            steps.append(Step(
                _backward_dx_kernel, grid,
                (gc, xc, dxc, mc, rc, group_sums, weight, bias, proxy_scale, nc, C, S, G, CPG,
                 *launch.strides, *grad_strides, slope, launch.inv_m),
                dict(PROXY=proxy, **launch.flags, **meta), share * (1 if in_l2 else 3),
                2 * chunk_stats_bytes + launch.param_bytes, 2 * share if in_l2 else 0))
    # Few channels per program with PN (each evaluates K proxy samples per channel), many without.
    block_c_params = min(triton.next_power_of_2(C), 16 if proxy else 64)
    steps.append(Step(
        _backward_params_kernel, (triton.cdiv(C, block_c_params),),
        (partials, weight, bias, _or(proxy_bias, weight), _or(proxy_weight, weight), samples,
         *grads, C, samples.numel(), rows, slope, proxy_eps),
        dict(PROXY=proxy, BLOCK_R=min(triton.next_power_of_2(rows), 32), BLOCK_C=block_c_params,
             BLOCK_K=_proxy_block_k(block_c_params), **launch.proxy_flags, **launch.flags),
        0, partial_bytes + 2 * launch.param_bytes))
    return Plan(launch.path, steps, (dx, *grads))


@_on_device(x_position=0)
def forward(x, weight, bias, proxy_bias, proxy_weight, samples, num_groups, activation, slope,
            eps, proxy_eps, proxy):
    """Returns (y, mean, rstd); y has x's dtype and layout, mean/rstd are (N, G) in fp32
    (fp64 for fp64 input). ``samples`` are the K proxy samples u_k in the accumulation dtype."""
    return forward_plan(x, weight, bias, proxy_bias, proxy_weight, samples, num_groups,
                        activation, slope, eps, proxy_eps, proxy).run()


@_on_device(x_position=1)
def backward(grad_out, x, weight, bias, proxy_bias, proxy_weight, samples, mean, rstd,
             num_groups, activation, slope, proxy_eps, proxy):
    """Returns (dx, dweight, dbias, dproxy_bias, dproxy_weight). dx has x's dtype and layout;
    parameter gradients have their parameter's dtype (dproxy_* in weight's dtype, zeros when
    PN is off or the proxy parameter is absent)."""
    return backward_plan(grad_out, x, weight, bias, proxy_bias, proxy_weight, samples, mean, rstd,
                         num_groups, activation, slope, proxy_eps, proxy).run()
