// Launchers of the CUDA kernels (forward.cu, backward.cu), called by fusednorm_cuda.cu.
// Tensors: x/y/grad/dx in the input dtype and dense layout; everything else contiguous, in the
// accumulation dtype. proxy_mean/proxy_scale undefined: Proxy Normalization off.
#pragma once

#include <ATen/ATen.h>

#include "../common.h"

namespace fusednorm::cuda {

// Thread blocks that fill the current device (a few per SM); decides when to split reductions.
int64_t target_blocks();

// u_k (K,) and per-channel m_c, s_c, in the accumulation dtype.
at::Tensor proxy_samples(int64_t num_samples, const at::TensorOptions& options);
std::pair<at::Tensor, at::Tensor> proxy_statistics(const at::Tensor& weight, const at::Tensor& bias,
                                                   const at::Tensor& proxy_bias,
                                                   const at::Tensor& proxy_weight,
                                                   const at::Tensor& samples, int64_t activation,
                                                   double slope, double proxy_eps);

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
