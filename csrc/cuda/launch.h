// Launchers of the CUDA kernels (forward.cu, backward.cu), called by fusednorm_cuda.cu.
// Tensors: x/y/grad/dx in the input dtype and dense layout; everything else contiguous, in the
// accumulation dtype. proxy_mean/proxy_scale undefined: Proxy Normalization off.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../common.h"

namespace fusednorm::cuda {

// int32 indices only with headroom: grid-stride loops step past the last element.
inline bool needs_index_64(const at::Tensor& x) {
  return x.numel() > std::numeric_limits<int32_t>::max() / 2;
}

// Calls fn(std::bool_constant<channels_last>{}, index_t{}) for the layout of `p` and the index
// type (int64_t when index_64, else int32_t): the four specializations of every launcher.
template <typename Fn>
void dispatch_layout_and_index(const Problem& p, bool index_64, Fn&& fn) {
  auto with_index = [&](auto channels_last) {
    if (index_64) {
      fn(channels_last, int64_t{});
    } else {
      fn(channels_last, int32_t{});
    }
  };
  if (p.channels_last) {
    with_index(std::true_type{});
  } else {
    with_index(std::false_type{});
  }
}

// Thread blocks that fill the current device (a few per SM); decides when to split reductions.
int64_t target_blocks();

// (2, C): per-channel m_c, s_c in the accumulation dtype, from the samples u (K,) of
// proxy_samples.
at::Tensor proxy_statistics(const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& proxy_bias, const at::Tensor& proxy_weight,
                            const at::Tensor& samples, int64_t activation, double slope,
                            double proxy_eps);

void launch_forward(const Problem& p, int64_t activation, double slope, double eps,
                    const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
                    const at::Tensor& bias, const at::Tensor& proxy_mean,
                    const at::Tensor& proxy_scale, const at::Tensor& mean, const at::Tensor& rstd);

// Writes dx and returns the (4, C) parameter gradients dgamma, dbeta, dbeta~, dgamma~.
at::Tensor launch_backward(const Problem& p, int64_t activation, double slope, double proxy_eps,
                           bool proxy, bool has_proxy_bias, bool has_proxy_weight,
                           const at::Tensor& grad, const at::Tensor& x, const at::Tensor& dx,
                           const at::Tensor& mean, const at::Tensor& rstd,
                           const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& proxy_bias, const at::Tensor& proxy_weight,
                           const at::Tensor& samples, const at::Tensor& proxy_scale);

}  // namespace fusednorm::cuda
