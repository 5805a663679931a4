"""Fused GroupNorm + affine + activation + Proxy Normalization in Triton (pn-math.md).

Every kernel sees the input as a 3-D array (N, C, S) through strides (stride_n, stride_c,
stride_s), S = product of the spatial sizes: a contiguous (NCHW) input has strides (C*S, S, 1),
a channels-last (NHWC, NDHWC) one (S*C, 1, C). Neither layout is copied.

Forward (``forward``):
  1. ``_proxy_stats_kernel``      per channel: proxy mean m_c and scale s_c from the K samples.
  2. ``_group_stats_kernel``      per (n, g) and split: Welford partials (count, mean, M2),
                                  merged tile by tile (Chan); finalises mean/rstd when unsplit.
     ``_group_stats_combine_kernel``  merges the splits of each (n, g) in a fixed order.
  3. ``_forward_apply_kernel``    y = s_c * (act(gamma_c * xhat + beta_c) - m_c).
Backward (``backward``):
  1. ``_proxy_stats_kernel``      recomputes m_c, s_c.
  2. ``_backward_partials_kernel`` per (n, c) and split: sum g_z, g_z*xhat, g, g*a.
  3. ``_backward_group_sums_kernel`` per (n, g): SA, SB = sums of gamma_c * partials.
  4. ``_backward_params_kernel``  per channel: reduce partials over splits and n in a fixed
                                  order, then the proxy gradients; writes all parameter grads.
  5. ``_backward_dx_kernel``      dx = rstd * (gamma_c * g_z - SA/M - xhat * SB/M).
No atomics anywhere: the backward is bitwise deterministic. Integer arguments that only count
(sizes of the grid, loop bounds, masks across tiles) are not specialized (``do_not_specialize``):
one compiled kernel serves many shapes; strides and the sizes that mask the contiguous axis are,
for aligned vector loads. Accumulation is fp32 (fp64 for fp64
inputs). Only x and the per-(n, g) mean/rstd come from the forward.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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
    HAS_PROXY_BIAS: tl.constexpr, HAS_PROXY_WEIGHT: tl.constexpr,
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
    mean_ptr,          # out (N*G, SPLIT) partial means, or (N*G,) group means if FINALIZE
    m2_ptr,            # out (N*G, SPLIT) partial sums of squared deviations, or (N*G,) rstd
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
    ng = tl.program_id(0)
    split = tl.program_id(1)
    n = ng // G
    g = ng % G
    if INDEX_64:
        n = n.to(tl.int64)
        g = g.to(tl.int64)
    base = x_ptr + n * stride_n + g * CPG * stride_c
    count = tl.zeros([], ACC_DTYPE)
    mean = tl.zeros([], ACC_DTYPE)
    m2 = tl.zeros([], ACC_DTYPE)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for tile in range(first, last):
        offs_c = (tile // num_s_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_s = (tile % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (offs_c < CPG)[:, None] & (offs_s < S)[None, :]
        x = tl.load(base + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s,
                    mask=mask, other=0.0).to(ACC_DTYPE)
        # Welford state of the tile from an in-register two-pass, merged with Chan's formula:
        # stable for offset data (mean 1e4, std 1), unlike E[x^2] - E[x]^2.
        tile_count = tl.sum(mask.to(ACC_DTYPE))
        tile_mean = tl.sum(x) / tile_count
        d = tl.where(mask, x - tile_mean, 0.0)
        tile_m2 = tl.sum(d * d)
        new_count = count + tile_count
        delta = tile_mean - mean
        mean += delta * (tile_count / new_count)
        m2 += tile_m2 + delta * delta * (count * tile_count / new_count)
        count = new_count
    if FINALIZE:
        tl.store(mean_ptr + ng, mean)
        tl.store(m2_ptr + ng, 1.0 / tl.sqrt(tl.maximum(m2 / count, 0.0) + tl.full([], eps, ACC_DTYPE)))
    else:
        num_splits = tl.num_programs(1)
        tl.store(count_ptr + ng * num_splits + split, count)
        tl.store(mean_ptr + ng * num_splits + split, mean)
        tl.store(m2_ptr + ng * num_splits + split, m2)


@triton.jit(do_not_specialize=["NG", "SPLIT"])
def _group_stats_combine_kernel(
    count_ptr, mean_ptr, m2_ptr,   # (NG, SPLIT) partial Welford states, ACC_DTYPE
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
    count = tl.zeros([BLOCK], ACC_DTYPE)
    mean = tl.zeros([BLOCK], ACC_DTYPE)
    m2 = tl.zeros([BLOCK], ACC_DTYPE)
    for split in range(0, SPLIT):  # fixed order: deterministic
        part_count = tl.load(count_ptr + offs * SPLIT + split, mask=mask, other=0.0)
        part_mean = tl.load(mean_ptr + offs * SPLIT + split, mask=mask, other=0.0)
        part_m2 = tl.load(m2_ptr + offs * SPLIT + split, mask=mask, other=0.0)
        new_count = count + part_count
        safe_count = tl.where(new_count > 0, new_count, 1.0)  # empty splits merge as no-ops
        delta = part_mean - mean
        mean += delta * (part_count / safe_count)
        m2 += part_m2 + delta * delta * (count * part_count / safe_count)
        count = new_count
    tl.store(group_mean_ptr + offs, mean, mask=mask)
    tl.store(group_rstd_ptr + offs, 1.0 / tl.sqrt(tl.maximum(m2 / count, 0.0) + eps), mask=mask)


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
    # (x - mean) * (gamma * rstd) rather than the folded A*x + B: one rounding of the mean
    # instead of a cancellation between two large terms on offset data.
    out = act_value((x - mean[:, None]) * (weight * rstd)[:, None] + bias[:, None], ACT, slope)
    if PROXY:
        proxy_mean = tl.load(proxy_mean_ptr + offs_c, mask=mask_c, other=0.0)
        proxy_scale = tl.load(proxy_scale_ptr + offs_c, mask=mask_c, other=0.0)
        out = proxy_scale[:, None] * (out - proxy_mean[:, None])
    tl.store(y_ptr + offsets, out.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["N", "C", "G", "CPG", "num_c_blocks", "s_per_split"])
def _backward_partials_kernel(
    grad_ptr,          # dL/dy, (N, C, S) through strides (stride_gn, stride_gc, stride_gs)
    x_ptr,             # input, (N, C, S) through strides (stride_n, stride_c, stride_s)
    group_mean_ptr,    # (N, G)
    group_rstd_ptr,    # (N, G)
    weight_ptr,        # (C,) gamma
    bias_ptr,          # (C,) beta
    proxy_mean_ptr,    # (C,) m_c (read only if PROXY)
    proxy_scale_ptr,   # (C,) s_c (read only if PROXY)
    partials_ptr,      # out (4, SPLIT, N, C): A, B, D, E = sum_s g_z, g_z*xhat, g, g*a
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
    if PROXY:
        proxy_mean = tl.load(proxy_mean_ptr + offs_c, mask=mask_c, other=0.0)
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
        xhat = (x - mean[:, None]) * rstd[:, None]
        z = weight[:, None] * xhat + bias[:, None]
        g_z = g * act_grad(z, ACT, slope)
        if PROXY:
            g_z = g_z * proxy_scale[:, None]
            sum_g += tl.sum(g, axis=1)
            sum_g_a += tl.sum(tl.where(mask, g * act_value(z, ACT, slope), 0.0), axis=1)
        g_z = tl.where(mask, g_z, 0.0)
        sum_gz += tl.sum(g_z, axis=1)
        sum_gz_xhat += tl.sum(g_z * xhat, axis=1)
    out = partials_ptr + split * N * C + n * C + offs_c
    plane = tl.num_programs(1) * N * C
    tl.store(out, sum_gz, mask=mask_c)
    tl.store(out + plane, sum_gz_xhat, mask=mask_c)
    if PROXY:
        tl.store(out + 2 * plane, sum_g, mask=mask_c)
        tl.store(out + 3 * plane, sum_g_a, mask=mask_c)


@triton.jit(do_not_specialize=["N", "C", "G", "SPLIT"])
def _backward_group_sums_kernel(
    partials_ptr,      # (4, SPLIT, N, C) from _backward_partials_kernel
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
    plane = SPLIT * N * C
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
    partials_ptr,      # (4, SPLIT, N, C) from _backward_partials_kernel
    weight_ptr,        # (C,) gamma
    bias_ptr,          # (C,) beta
    proxy_bias_ptr,    # (C,) beta~ (read only if HAS_PROXY_BIAS)
    proxy_weight_ptr,  # (C,) gamma~ (read only if HAS_PROXY_WEIGHT)
    samples_ptr,       # (K,) proxy samples u_k
    grad_params_ptr,   # out (4, C) ACC_DTYPE: dgamma, dbeta, dbeta~, dgamma~
    C,                 # channels
    K,                 # proxy samples
    ROWS,              # rows of each partials plane, SPLIT * N, reduced here
    slope: tl.float64,      # leaky_relu slope (read only if ACT is leaky_relu)
    proxy_eps: tl.float64,  # added to the proxy variance
    ACT: tl.constexpr,      # activation id (fusednorm/activations.py)
    PROXY: tl.constexpr,    # Proxy Normalization on: D, E and the proxy gradients too
    HAS_PROXY_BIAS: tl.constexpr, HAS_PROXY_WEIGHT: tl.constexpr,
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
    tl.store(grad_params_ptr + offs_c, grad_weight, mask=mask_c)
    tl.store(grad_params_ptr + C + offs_c, grad_bias, mask=mask_c)
    tl.store(grad_params_ptr + 2 * C + offs_c, grad_proxy_bias, mask=mask_c)
    tl.store(grad_params_ptr + 3 * C + offs_c, grad_proxy_weight, mask=mask_c)


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
    xhat = (x - mean[:, None]) * rstd[:, None]
    g_z = g * act_grad(weight[:, None] * xhat + bias[:, None], ACT, slope)
    if PROXY:
        proxy_scale = tl.load(proxy_scale_ptr + offs_c, mask=mask_c, other=0.0)
        g_z = g_z * proxy_scale[:, None]
    dx = rstd[:, None] * (weight[:, None] * g_z - sum_a[:, None] - xhat * sum_b[:, None])
    tl.store(dx_ptr + n * stride_n + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s,
             dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def dense_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when it is contiguous or channels-last (any number of spatial dims), else a
    contiguous copy. The output of every op has this tensor's strides."""
    if x.is_contiguous() or x.movedim(1, -1).is_contiguous():
        return x
    return x.contiguous()


def _strides_ncs(x: torch.Tensor) -> tuple[int, int, int]:
    """(stride_n, stride_c, stride_s) of a dense_layout tensor seen as (N, C, S)."""
    if x.dim() == 2:
        return x.stride(0), x.stride(1), 1
    if x.is_contiguous():
        return x.stride(0), x.stride(1), 1
    return x.stride(0), 1, x.shape[1]


def _acc_dtype(x: torch.Tensor):
    return (tl.float64, torch.float64) if x.dtype == torch.float64 else (tl.float32, torch.float32)


@dataclass(frozen=True)
class DeviceTraits:
    """What the launch plan depends on: GPU tiles or the interpreter's, and the SM count."""
    gpu: bool
    sm_count: int


_TRAITS_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("fusednorm_traits", default=None)


@contextlib.contextmanager
def plan_as_gpu(sm_count: int):
    """Launch plans (tiles, splits, warps) as for a GPU with ``sm_count`` SMs, whatever device the
    tensors are on: lets ``tools/gpu_compile.py`` compile, on a machine without a GPU, exactly the
    specializations a GPU run would launch."""
    token = _TRAITS_OVERRIDE.set(DeviceTraits(gpu=True, sm_count=sm_count))
    try:
        yield
    finally:
        _TRAITS_OVERRIDE.reset(token)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_traits(device: torch.device) -> DeviceTraits:
    override = _TRAITS_OVERRIDE.get()
    if override is not None:
        return override
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DeviceTraits(gpu=True, sm_count=_sm_count(index))
    return DeviceTraits(gpu=False, sm_count=2)


def _target_programs(traits: DeviceTraits) -> int:
    """Programs that fill the device. Under the interpreter a small number, so that the
    split-reduction paths are exercised by small test shapes."""
    return 4 * traits.sm_count if traits.gpu else 8


def _tile_shape(channels: int, spatial: int, channels_last: bool, traits: DeviceTraits):
    """(BLOCK_C, BLOCK_S) of a 2-D tile; the contiguous axis gets the larger share."""
    # 1024 elements: 8 per thread of 4 warps. The backward holds x, g and several intermediates
    # per element; 2048-element tiles spilled (ptxas kept 8-warp programs at 80 registers).
    tile = 1024 if traits.gpu else 16384  # the interpreter pays per program, not per lane
    if channels_last:
        block_c = min(triton.next_power_of_2(channels), 64)
        block_s = min(triton.next_power_of_2(spatial), max(1, tile // block_c))
    else:
        block_s = min(triton.next_power_of_2(spatial), tile)
        block_c = min(triton.next_power_of_2(channels), max(1, tile // block_s))
    return block_c, block_s


def _num_warps(block_c: int, block_s: int) -> int:
    return 8 if block_c * block_s >= 4096 else 4


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


class _Launch:
    """Shapes, strides and compile-time flags shared by the forward and backward launchers."""

    def __init__(self, x, num_groups, activation, proxy_bias, proxy_weight):
        self.N, self.C = x.shape[:2]
        self.S = x[0, 0].numel() if x.dim() > 2 else 1
        self.G = num_groups
        self.CPG = self.C // num_groups
        self.strides = _strides_ncs(x)
        self.channels_last = x.dim() > 2 and not x.is_contiguous()
        self.acc_tl, self.acc_torch = _acc_dtype(x)
        self.index_64 = x.numel() >= 2**31 - 1
        self.flags = dict(ACT=activation, ACC_DTYPE=self.acc_tl)
        self.has_proxy_bias = proxy_bias is not None
        self.has_proxy_weight = proxy_weight is not None
        self.device = x.device
        self.traits = device_traits(x.device)

    def proxy_stats(self, weight, bias, proxy_bias, proxy_weight, slope, proxy_eps, samples):
        num_samples = samples.numel()
        proxy_mean = torch.empty(self.C, dtype=self.acc_torch, device=self.device)
        proxy_scale = torch.empty_like(proxy_mean)
        block_c = min(triton.next_power_of_2(self.C), 16)
        # [16, 64] tiles: 8 samples per thread (256 wide took up to 240 registers)
        block_k = min(triton.next_power_of_2(num_samples), 64)
        _proxy_stats_kernel[(triton.cdiv(self.C, block_c),)](
            weight, bias, _or(proxy_bias, weight), _or(proxy_weight, weight), samples,
            proxy_mean, proxy_scale, self.C, num_samples, slope, proxy_eps,
            HAS_PROXY_BIAS=self.has_proxy_bias, HAS_PROXY_WEIGHT=self.has_proxy_weight,
            BLOCK_C=block_c, BLOCK_K=block_k, **self.flags)
        return proxy_mean, proxy_scale

    def elementwise_grid(self):
        block_c, block_s = _tile_shape(self.C, self.S, self.channels_last, self.traits)
        num_c_blocks, num_s_blocks = triton.cdiv(self.C, block_c), triton.cdiv(self.S, block_s)
        grid = (self.N * num_c_blocks * num_s_blocks,)
        meta = dict(num_c_blocks=num_c_blocks, num_s_blocks=num_s_blocks, BLOCK_C=block_c,
                    BLOCK_S=block_s, INDEX_64=self.index_64, num_warps=_num_warps(block_c, block_s))
        return grid, meta


def _or(tensor, fallback):
    """Kernels take a pointer for every optional tensor; a flag says whether to read it."""
    return fallback if tensor is None else tensor


def _dense_params(*params):
    """The kernels index parameters as ``ptr + c``: a strided view (``w[::2]``) is copied."""
    return tuple(None if p is None else p.contiguous() for p in params)


@_on_device(x_position=0)
def forward(x, weight, bias, proxy_bias, proxy_weight, samples, num_groups, activation, slope,
            eps, proxy_eps, proxy):
    """Returns (y, mean, rstd); y has x's dtype and layout, mean/rstd are (N, G) in fp32
    (fp64 for fp64 input). ``samples`` are the K proxy samples u_k in the accumulation dtype."""
    x = dense_layout(x)
    weight, bias, proxy_bias, proxy_weight = _dense_params(weight, bias, proxy_bias, proxy_weight)
    launch = _Launch(x, num_groups, activation, proxy_bias, proxy_weight)
    N, C, S, G, CPG = launch.N, launch.C, launch.S, launch.G, launch.CPG
    y = torch.empty_like(x)
    mean = torch.empty((N, G), dtype=launch.acc_torch, device=x.device)
    rstd = torch.empty_like(mean)
    if proxy:
        proxy_mean, proxy_scale = launch.proxy_stats(weight, bias, proxy_bias, proxy_weight,
                                                     slope, proxy_eps, samples)
    else:
        proxy_mean = proxy_scale = mean

    # Group statistics, split over programs when N*G alone would not fill the device.
    block_c, block_s = _tile_shape(CPG, S, launch.channels_last, launch.traits)
    num_s_blocks = triton.cdiv(S, block_s)
    num_tiles = triton.cdiv(CPG, block_c) * num_s_blocks
    target = _target_programs(launch.traits)
    splits = 1 if N * G >= target else min(num_tiles, triton.cdiv(target, N * G))
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)
    stats_meta = dict(G=G, CPG=CPG, S=S, stride_n=launch.strides[0], stride_c=launch.strides[1],
                      stride_s=launch.strides[2], eps=eps, tiles_per_split=tiles_per_split,
                      num_s_blocks=num_s_blocks, num_tiles=num_tiles, BLOCK_C=block_c,
                      BLOCK_S=block_s, ACC_DTYPE=launch.acc_tl, INDEX_64=launch.index_64,
                      num_warps=_num_warps(block_c, block_s))
    if splits == 1:
        _group_stats_kernel[(N * G, 1)](x, mean, mean, rstd, FINALIZE=True, **stats_meta)
    else:
        partial = torch.empty((3, N * G, splits), dtype=launch.acc_torch, device=x.device)
        _group_stats_kernel[(N * G, splits)](x, partial[0], partial[1], partial[2],
                                             FINALIZE=False, **stats_meta)
        block = min(triton.next_power_of_2(N * G), 1024)
        _group_stats_combine_kernel[(triton.cdiv(N * G, block),)](
            partial[0], partial[1], partial[2], mean, rstd, N * G, splits, eps,
            BLOCK=block, ACC_DTYPE=launch.acc_tl)

    grid, meta = launch.elementwise_grid()
    _forward_apply_kernel[grid](
        x, y, mean, rstd, weight, bias, proxy_mean, proxy_scale, C, S, G, CPG, *launch.strides,
        slope, PROXY=proxy, **launch.flags, **meta)
    return y, mean, rstd


@_on_device(x_position=1)
def backward(grad_out, x, weight, bias, proxy_bias, proxy_weight, samples, mean, rstd,
             num_groups, activation, slope, proxy_eps, proxy):
    """Returns (dx, dweight, dbias, dproxy_bias, dproxy_weight). dx has x's dtype and layout;
    parameter gradients have their parameter's dtype (dproxy_* in weight's dtype, zeros when
    PN is off or the proxy parameter is absent)."""
    x = dense_layout(x)
    grad_out = dense_layout(grad_out)
    param_dtypes = (weight.dtype, bias.dtype, _or(proxy_bias, weight).dtype,
                    _or(proxy_weight, weight).dtype)
    weight, bias, proxy_bias, proxy_weight = _dense_params(weight, bias, proxy_bias, proxy_weight)
    launch = _Launch(x, num_groups, activation, proxy_bias, proxy_weight)
    N, C, S, G, CPG = launch.N, launch.C, launch.S, launch.G, launch.CPG
    grad_strides = _strides_ncs(grad_out)
    if proxy:
        proxy_mean, proxy_scale = launch.proxy_stats(
            weight, bias, proxy_bias, proxy_weight, slope, proxy_eps, samples)
    else:
        proxy_mean = proxy_scale = mean

    # Per-(n, c) partial sums, split over S when N * C-blocks alone would not fill the device.
    block_c, block_s = _tile_shape(C, S, launch.channels_last, launch.traits)
    num_c_blocks = triton.cdiv(C, block_c)
    num_s_blocks = triton.cdiv(S, block_s)
    target = _target_programs(launch.traits)
    rows = N * num_c_blocks
    splits = 1 if rows >= target else min(num_s_blocks, triton.cdiv(target, rows))
    s_per_split = triton.cdiv(num_s_blocks, splits) * block_s
    splits = triton.cdiv(S, s_per_split)
    partials = torch.empty((4, splits, N, C), dtype=launch.acc_torch, device=x.device)
    _backward_partials_kernel[(rows, splits)](
        grad_out, x, mean, rstd, weight, bias, proxy_mean, proxy_scale, partials,
        N, C, S, G, CPG, *launch.strides, *grad_strides, slope, num_c_blocks, s_per_split,
        PROXY=proxy, BLOCK_C=block_c, BLOCK_S=block_s, INDEX_64=launch.index_64,
        num_warps=_num_warps(block_c, block_s), **launch.flags)

    group_sums = torch.empty((2, N, G), dtype=launch.acc_torch, device=x.device)
    _backward_group_sums_kernel[(N * G,)](
        partials, weight, group_sums, N, C, G, CPG, splits,
        BLOCK_C=min(triton.next_power_of_2(CPG), 1024), ACC_DTYPE=launch.acc_tl)

    grad_params = torch.empty((4, C), dtype=launch.acc_torch, device=x.device)
    # Few channels per program with PN (each evaluates K proxy samples per channel), many without.
    block_c_params = min(triton.next_power_of_2(C), 16 if proxy else 64)
    _backward_params_kernel[(triton.cdiv(C, block_c_params),)](
        partials, weight, bias, _or(proxy_bias, weight), _or(proxy_weight, weight), samples,
        grad_params, C, samples.numel(), splits * N, slope, proxy_eps,
        PROXY=proxy, HAS_PROXY_BIAS=launch.has_proxy_bias, HAS_PROXY_WEIGHT=launch.has_proxy_weight,
        BLOCK_R=min(triton.next_power_of_2(splits * N), 32), BLOCK_C=block_c_params,
        BLOCK_K=min(triton.next_power_of_2(samples.numel()), 64), **launch.flags)

    dx = torch.empty_like(x)
    grid, meta = launch.elementwise_grid()
    _backward_dx_kernel[grid](
        grad_out, x, dx, mean, rstd, group_sums, weight, bias, proxy_scale,
        N, C, S, G, CPG, *launch.strides, *grad_strides, slope, 1.0 / (CPG * S), PROXY=proxy,
        **launch.flags, **meta)
    # Separate tensors (the ops' outputs may not alias one another), each in its parameter's dtype.
    return (dx, *(grad.to(dtype, copy=True) for grad, dtype in zip(grad_params, param_dtypes)))
