// Argument checks and layout handling shared by the CPU and CUDA op implementations.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fusednorm {

// The input seen as (N, C, S), S = product of the spatial sizes.
struct Problem {
  int64_t N, C, S, G;
  // The memory is (N, S, C) rather than (N, C, S): a channels-last input, or any input with S = 1.
  bool channels_last;
};

// x itself when it is contiguous or channels-last (any number of spatial dims), else a
// contiguous copy. Every op computes in, and returns tensors with, this tensor's strides.
at::Tensor dense_layout(const at::Tensor& x);

// `t` in the memory layout of `dense` (a dense_layout tensor of the same shape), copying only
// when it differs.
at::Tensor match_layout(const at::Tensor& t, const at::Tensor& dense);

// fp64 for fp64 input, fp32 otherwise: the dtype of mean/rstd and of every accumulation.
at::ScalarType accumulation_type(at::ScalarType dtype);

// Checks the arguments shared by forward and backward; returns the problem of `x` (dense).
Problem check_arguments(const char* op, const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& bias, const std::optional<at::Tensor>& proxy_bias,
                        const std::optional<at::Tensor>& proxy_weight, int64_t num_groups,
                        int64_t activation, int64_t num_proxy_samples, bool proxy);

// Checks mean/rstd from the forward, returns them contiguous.
std::pair<at::Tensor, at::Tensor> check_statistics(const at::Tensor& x, const at::Tensor& mean,
                                                   const at::Tensor& rstd, int64_t num_groups);

// `param` (or zeros when absent) as a contiguous (C,) tensor of the accumulation dtype.
at::Tensor param_as(const std::optional<at::Tensor>& param, int64_t channels,
                    const at::TensorOptions& options);

}  // namespace fusednorm
