// CUDA kernels of fusednorm: the algorithm of the CPU kernels and of
// kernels/group_norm_proxy_act.py (docs/pn-math.md), with warp/block reductions.
//
// The input is seen as (N, C, S): memory (N, C, S), or (N, S, C) when channels_last (a
// channels-last input, or any input with S = 1). acc_t is float (double for double input).
//
// Forward:  proxy_stats_kernel (per channel m_c, s_c) -> group_stats_kernel (per (n, g) and
//           split: Welford, merged in the block by shuffles in a fixed order) ->
//           [stats_combine_kernel: merges the splits of a group in order] -> apply_kernel.
// Backward: proxy_stats_kernel -> partials_rows_kernel / partials_channels_last_kernel
//           (per (split, n, c): sum g_z, g_z xhat, g, g a) -> group_sums_kernel (SA, SB per
//           (n, g)) -> param_grads_kernel (per channel, reduces (split, n) in order) ->
//           dx_kernel.
// No atomics: every reduction has a fixed order, so results are bitwise reproducible on a given
// GPU (the number of splits depends on its SM count). Index arithmetic is index_t: int32_t when
// the tensor has fewer than 2^30 elements (headroom for grid-stride loops), else int64_t.
#pragma once

#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../activations.h"
#include "../proxy.h"
#include "../welford.h"

namespace fusednorm::cuda {

constexpr int kWarpSize = 32;
constexpr int kBlock = 256;  // threads of every 1-D reduction block (block_* below rely on it)
constexpr int kTileC = 32;   // channels-last partials: channels per block (one warp wide) ...
constexpr int kTileRows = 8;  // ... and rows of S reduced side by side

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> warp_merge(Welford<acc_t> s) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const Welford<acc_t> other{__shfl_down_sync(0xffffffffu, s.count, offset),
                               __shfl_down_sync(0xffffffffu, s.mean, offset),
                               __shfl_down_sync(0xffffffffu, s.m2, offset)};
    s = welford_merge(s, other);
  }
  return s;
}

// Merges the states of a kBlock-thread 1-D block; the result is valid in thread 0.
template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> block_merge(Welford<acc_t> s) {
  __shared__ Welford<acc_t> warps[kBlock / kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  s = warp_merge(s);
  if (lane == 0) warps[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kBlock / kWarpSize ? warps[lane] : Welford<acc_t>{0, 0, 0};
    s = warp_merge(s);
  }
  return s;
}

// Sums each of the NV values over a kBlock-thread 1-D block; valid in thread 0.
template <int NV, typename acc_t>
__device__ __forceinline__ void block_sum(acc_t (&v)[NV]) {
  __shared__ acc_t warps[NV][kBlock / kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
      v[i] += __shfl_down_sync(0xffffffffu, v[i], offset);
    }
    if (lane == 0) warps[i][warp] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      v[i] = lane < kBlock / kWarpSize ? warps[i][lane] : acc_t(0);
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
        v[i] += __shfl_down_sync(0xffffffffu, v[i], offset);
      }
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t inverse_std(acc_t m2, acc_t count, acc_t eps) {
  const acc_t var = m2 / count;
  // var < 0 ? 0 : var rather than fmax: fmax(NaN, 0) is 0, and NaN must reach the output.
  return acc_t(1) / math::sqrt((var < acc_t(0) ? acc_t(0) : var) + eps);
}

// ---------------------------------------------------------------------------------------------
// Proxy statistics
// ---------------------------------------------------------------------------------------------
// One thread per channel: m_c and s_c = 1 / sqrt(v_c + proxy_eps).
template <int ACT, typename acc_t>
__global__ void proxy_stats_kernel(const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                   const acc_t* __restrict__ proxy_bias,
                                   const acc_t* __restrict__ proxy_weight,
                                   const acc_t* __restrict__ samples, int64_t C, int64_t K,
                                   acc_t slope, acc_t proxy_eps, acc_t* __restrict__ proxy_mean,
                                   acc_t* __restrict__ proxy_scale) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc_t mean, var;
  proxy_moments<ACT>(weight[c], bias[c], proxy_bias[c], proxy_weight[c], samples, K, slope, mean,
                     var);
  proxy_mean[c] = mean;
  proxy_scale[c] = acc_t(1) / math::sqrt(var + proxy_eps);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
// Grid (N*G, splits), kBlock threads: block (ng, split) reduces elements
// [split * per_split, (split + 1) * per_split) of group ng (M = C/G * S elements, numbered
// channel-major for NCHW, row-major for channels-last). With one split it writes mean/rstd,
// else its Welford state to part_* (NG, splits).
template <bool CHANNELS_LAST, typename scalar_t, typename acc_t, typename index_t>
__global__ void group_stats_kernel(const scalar_t* __restrict__ x, index_t C, index_t S, index_t G,
                                   index_t per_split, acc_t eps, acc_t* __restrict__ mean,
                                   acc_t* __restrict__ rstd, acc_t* __restrict__ part_count,
                                   acc_t* __restrict__ part_mean, acc_t* __restrict__ part_m2) {
  const index_t ng = blockIdx.x, split = blockIdx.y;
  const index_t n = ng / G, g = ng % G, CPG = C / G, M = CPG * S;
  const index_t begin = split * per_split;
  const index_t end = begin + per_split < M ? begin + per_split : M;
  Welford<acc_t> s{0, 0, 0};
  for (index_t j = begin + static_cast<index_t>(threadIdx.x); j < end; j += kBlock) {
    const index_t offset =
        CHANNELS_LAST ? (n * S + j / CPG) * C + g * CPG + j % CPG : ng * M + j;
    const acc_t v = static_cast<acc_t>(x[offset]);
    s.count += acc_t(1);
    const acc_t delta = v - s.mean;
    s.mean += delta / s.count;
    s.m2 += delta * (v - s.mean);
  }
  s = block_merge(s);
  if (threadIdx.x != 0) return;
  if (gridDim.y == 1) {
    mean[ng] = s.mean;
    rstd[ng] = inverse_std(s.m2, s.count, eps);
  } else {
    const index_t i = ng * gridDim.y + split;
    part_count[i] = s.count;
    part_mean[i] = s.mean;
    part_m2[i] = s.m2;
  }
}

// One thread per group: merges its splits in order. Integer counts (a group's count passes
// 2**24, where float adds round), and means relative to the first split's: merged from raw means
// (offset data, 1e4 + randn) each step would round at 1e4's precision.
template <typename acc_t>
__global__ void stats_combine_kernel(const acc_t* __restrict__ part_count,
                                     const acc_t* __restrict__ part_mean,
                                     const acc_t* __restrict__ part_m2, int64_t NG, int64_t splits,
                                     acc_t eps, acc_t* __restrict__ mean,
                                     acc_t* __restrict__ rstd) {
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ng >= NG) return;
  const acc_t shift = part_mean[ng * splits];
  Welford<acc_t, int64_t> s{0, 0, 0};
  for (int64_t i = ng * splits; i < (ng + 1) * splits; ++i) {
    s = welford_merge(s, Welford<acc_t, int64_t>{static_cast<int64_t>(part_count[i]),
                                                 part_mean[i] - shift, part_m2[i]});
  }
  mean[ng] = shift + s.mean;
  rstd[ng] = inverse_std(s.m2, static_cast<acc_t>(s.count), eps);
}

// y = s_c * act((x - mean) * gamma_c * rstd + beta_c) - s_c * m_c, grid-stride over elements.
// proxy_mean == nullptr: PN off, y = act(...).
template <int ACT, bool CHANNELS_LAST, typename scalar_t, typename acc_t, typename index_t>
__global__ void apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                             const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                             const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                             const acc_t* __restrict__ proxy_mean,
                             const acc_t* __restrict__ proxy_scale, index_t total, index_t C,
                             index_t S, index_t G, acc_t slope) {
  const index_t CPG = C / G;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const index_t c = CHANNELS_LAST ? i % C : (i / S) % C;
    const index_t ng = i / (C * S) * G + c / CPG;
    const acc_t z =
        (static_cast<acc_t>(x[i]) - mean[ng]) * (weight[c] * rstd[ng]) + bias[c];
    acc_t out = act_value<ACT>(z, slope);
    if (proxy_scale != nullptr) out = proxy_scale[c] * out - proxy_scale[c] * proxy_mean[c];
    y[i] = static_cast<scalar_t>(out);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
// The four per-(n, c) sums of one element, added to v: g_z, g_z * xhat, and with PN g, g * a.
template <int ACT, bool PROXY, typename acc_t>
__device__ __forceinline__ void add_partials(acc_t x, acc_t g, acc_t mean, acc_t rstd, acc_t w,
                                             acc_t b, acc_t scale, acc_t slope, acc_t (&v)[4]) {
  const acc_t xhat = (x - mean) * rstd;
  const acc_t z = w * xhat + b;
  const acc_t g_z = scale * g * act_grad<ACT>(z, slope);
  v[0] += g_z;
  v[1] += g_z * xhat;
  if (PROXY) {
    v[2] += g;
    v[3] += g * act_value<ACT>(z, slope);
  }
}

// Contiguous input. Grid (N*C, splits), kBlock threads: block (row, split) sums the row's
// positions [split * per_split, ...) into partials (4, splits, N, C).
template <int ACT, bool PROXY, typename scalar_t, typename acc_t, typename index_t>
__global__ void partials_rows_kernel(const scalar_t* __restrict__ grad,
                                     const scalar_t* __restrict__ x,
                                     const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                     const acc_t* __restrict__ weight,
                                     const acc_t* __restrict__ bias,
                                     const acc_t* __restrict__ proxy_scale,
                                     acc_t* __restrict__ partials, index_t N, index_t C, index_t S,
                                     index_t G, index_t per_split, acc_t slope) {
  const index_t row = blockIdx.x, split = blockIdx.y;
  const index_t n = row / C, c = row % C, ng = n * G + c / (C / G);
  const acc_t mu = mean[ng], r = rstd[ng], w = weight[c], b = bias[c];
  const acc_t scale = PROXY ? proxy_scale[c] : acc_t(1);
  const index_t begin = split * per_split;
  const index_t end = begin + per_split < S ? begin + per_split : S;
  acc_t v[4] = {0, 0, 0, 0};
  for (index_t s = begin + static_cast<index_t>(threadIdx.x); s < end; s += kBlock) {
    const index_t offset = row * S + s;
    add_partials<ACT, PROXY>(static_cast<acc_t>(x[offset]), static_cast<acc_t>(grad[offset]), mu,
                             r, w, b, scale, slope, v);
  }
  block_sum(v);
  if (threadIdx.x == 0) {
    const index_t plane = static_cast<index_t>(gridDim.y) * N * C;
    const index_t i = split * N * C + row;
#pragma unroll
    for (int q = 0; q < 4; ++q) partials[q * plane + i] = v[q];
  }
}

// Channels-last input. Grid (N * ceil(C / kTileC), splits), block (kTileC, kTileRows): a warp
// reads kTileC adjacent channels of one row (coalesced); the kTileRows partial sums of a
// channel are added in row order through shared memory.
template <int ACT, bool PROXY, typename scalar_t, typename acc_t, typename index_t>
__global__ void partials_channels_last_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
    const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
    const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
    const acc_t* __restrict__ proxy_scale, acc_t* __restrict__ partials, index_t N, index_t C,
    index_t S, index_t G, index_t per_split, acc_t slope) {
  __shared__ acc_t shared[4][kTileRows][kTileC];
  const index_t c_blocks = (C + kTileC - 1) / kTileC;
  const index_t n = blockIdx.x / c_blocks;
  const index_t c = blockIdx.x % c_blocks * kTileC + threadIdx.x;
  const index_t split = blockIdx.y;
  acc_t v[4] = {0, 0, 0, 0};
  if (c < C) {
    const index_t ng = n * G + c / (C / G);
    const acc_t mu = mean[ng], r = rstd[ng], w = weight[c], b = bias[c];
    const acc_t scale = PROXY ? proxy_scale[c] : acc_t(1);
    const index_t begin = split * per_split;
    const index_t end = begin + per_split < S ? begin + per_split : S;
    for (index_t s = begin + static_cast<index_t>(threadIdx.y); s < end; s += kTileRows) {
      const index_t offset = (n * S + s) * C + c;
      add_partials<ACT, PROXY>(static_cast<acc_t>(x[offset]), static_cast<acc_t>(grad[offset]),
                               mu, r, w, b, scale, slope, v);
    }
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) shared[q][threadIdx.y][threadIdx.x] = v[q];
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    const index_t plane = static_cast<index_t>(gridDim.y) * N * C;
    const index_t i = (split * N + n) * C + c;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      acc_t total = 0;
#pragma unroll
      for (int r = 0; r < kTileRows; ++r) total += shared[q][r][threadIdx.x];
      partials[q * plane + i] = total;
    }
  }
}

// Block per (n, g), kBlock threads: SA = sum_{c in g} gamma_c A_nc and SB likewise with B_nc,
// A_nc and B_nc summed over the splits in order; written to group_sums (2, N*G).
template <typename acc_t>
__global__ void group_sums_kernel(const acc_t* __restrict__ partials,
                                  const acc_t* __restrict__ weight,
                                  acc_t* __restrict__ group_sums, int64_t N, int64_t C, int64_t G,
                                  int64_t splits) {
  const int64_t ng = blockIdx.x, n = ng / G, g = ng % G, CPG = C / G;
  const int64_t plane = splits * N * C;
  acc_t v[2] = {0, 0};
  for (int64_t cc = threadIdx.x; cc < CPG; cc += kBlock) {
    const int64_t c = g * CPG + cc;
    acc_t a = 0, b = 0;
    for (int64_t split = 0; split < splits; ++split) {
      a += partials[(split * N + n) * C + c];
      b += partials[plane + (split * N + n) * C + c];
    }
    v[0] += weight[c] * a;
    v[1] += weight[c] * b;
  }
  block_sum(v);
  if (threadIdx.x == 0) {
    group_sums[ng] = v[0];
    group_sums[N * G + ng] = v[1];
  }
}

// One thread per channel: sums over (split, n) in order, then the proxy gradients. Writes
// grads (4, C): dgamma, dbeta, dbeta~, dgamma~ (the last two zero without PN or the parameter).
template <int ACT, typename acc_t>
__global__ void param_grads_kernel(const acc_t* __restrict__ partials, int64_t rows, int64_t C,
                                   const acc_t* __restrict__ weight,
                                   const acc_t* __restrict__ bias,
                                   const acc_t* __restrict__ proxy_bias,
                                   const acc_t* __restrict__ proxy_weight,
                                   const acc_t* __restrict__ samples, int64_t K, acc_t slope,
                                   acc_t proxy_eps, bool proxy, bool has_proxy_bias,
                                   bool has_proxy_weight, acc_t* __restrict__ grads) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t plane = rows * C;
  acc_t sums[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < rows; ++i) {
#pragma unroll
    for (int q = 0; q < 4; ++q) sums[q] += partials[q * plane + i * C + c];
  }
  acc_t dweight = sums[1], dbias = sums[0], dproxy_bias = 0, dproxy_weight = 0;
  if (proxy) {
    proxy_backward<ACT>(weight[c], bias[c], proxy_bias[c], proxy_weight[c], samples, K, slope,
                        proxy_eps, sums[2], sums[3], dweight, dbias, dproxy_bias, dproxy_weight);
  }
  grads[c] = dweight;
  grads[C + c] = dbias;
  grads[2 * C + c] = has_proxy_bias ? dproxy_bias : acc_t(0);
  grads[3 * C + c] = has_proxy_weight ? dproxy_weight : acc_t(0);
}

// dx = rstd * (gamma_c g_z - SA / M - xhat SB / M), grid-stride over elements.
template <int ACT, bool CHANNELS_LAST, typename scalar_t, typename acc_t, typename index_t>
__global__ void dx_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                          scalar_t* __restrict__ dx, const acc_t* __restrict__ mean,
                          const acc_t* __restrict__ rstd, const acc_t* __restrict__ group_sums,
                          const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                          const acc_t* __restrict__ proxy_scale, index_t total, index_t N,
                          index_t C, index_t S, index_t G, acc_t slope) {
  const index_t CPG = C / G;
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(CPG * S);
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const index_t c = CHANNELS_LAST ? i % C : (i / S) % C;
    const index_t ng = i / (C * S) * G + c / CPG;
    const acc_t r = rstd[ng], w = weight[c];
    const acc_t xhat = (static_cast<acc_t>(x[i]) - mean[ng]) * r;
    acc_t g_z = static_cast<acc_t>(grad[i]) * act_grad<ACT>(w * xhat + bias[c], slope);
    if (proxy_scale != nullptr) g_z *= proxy_scale[c];
    const acc_t out =
        r * (w * g_z - group_sums[ng] * inv_m - xhat * group_sums[N * G + ng] * inv_m);
    dx[i] = static_cast<scalar_t>(out);
  }
}

}  // namespace fusednorm::cuda
