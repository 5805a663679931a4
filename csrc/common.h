// What the CPU and CUDA op implementations share: argument checks, layouts, allocation of the
// outputs, the empty-input case, the proxy samples and the split of the parameter gradients.
// Each backend adds only its kernels (cpu/fusednorm_cpu.cpp, cuda/fusednorm_cuda.cu).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

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

// u_k = sqrt(2) erfinv(2 (k + 0.5) / K - 1), k = 0..K-1 (docs/pn-math.md, step 4), computed in
// fp64 once per (K, dtype, device) and cached; read-only.
const at::Tensor& proxy_samples(int64_t num_samples, const at::TensorOptions& options);

// A (C,) parameter or parameter gradient in `dtype`, contiguous (itself when it is one). CPU
// float <-> bf16/fp16 in a plain loop rather than a dispatched .to(): the ops convert up to four
// parameters per call and four gradients back, and with cold caches (every training step of a
// real network) each dispatched conversion costs ~5 us, a tenth of a small layer's kernel time.
at::Tensor convert_vector(const at::Tensor& t, at::ScalarType dtype);

// gamma, beta, beta~, gamma~ as contiguous (C,) tensors of the accumulation dtype; an absent
// proxy parameter is undefined (its value is zero).
struct Params {
  at::Tensor weight, bias, proxy_bias, proxy_weight;
};

// Checks and prepares a proxy_statistics call: the parameters of x's channels, in the
// accumulation dtype of x.
Params prepare_proxy_statistics(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bias,
                                const std::optional<at::Tensor>& proxy_bias,
                                const std::optional<at::Tensor>& proxy_weight,
                                int64_t activation, int64_t num_proxy_samples);

// Checks proxy statistics passed to forward/backward: (2, C), x's accumulation dtype and device;
// returns them contiguous.
at::Tensor check_proxy_stats(const char* op, const at::Tensor& proxy_stats, const at::Tensor& x);

// A checked forward call: the dense input, its problem, the parameters in the accumulation
// dtype and the allocated outputs. When x has no elements, `empty` is set and the outputs are
// already final (mean 0, rstd 1/sqrt(eps): groups without elements have variance 0).
struct ForwardCall {
  at::Tensor x;
  Problem p;
  at::TensorOptions acc_options;
  Params params;
  at::Tensor y, mean, rstd;
  bool empty;
};
ForwardCall prepare_forward(const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias, const std::optional<at::Tensor>& proxy_bias,
                            const std::optional<at::Tensor>& proxy_weight, int64_t num_groups,
                            int64_t activation, double eps, int64_t num_proxy_samples, bool proxy);

// A checked backward call: dense x, grad_out in x's layout and dtype, checked mean/rstd, the
// parameters in the accumulation dtype and the allocated dx.
struct BackwardCall {
  at::Tensor x, grad, mean, rstd;
  Problem p;
  at::TensorOptions acc_options;
  Params params;
  at::Tensor dx;
};
BackwardCall prepare_backward(const at::Tensor& grad_out, const at::Tensor& input,
                              const at::Tensor& weight, const at::Tensor& bias,
                              const std::optional<at::Tensor>& proxy_bias,
                              const std::optional<at::Tensor>& proxy_weight,
                              const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
                              int64_t activation, int64_t num_proxy_samples, bool proxy);

// The outputs of backward: dx and the rows of `grads` ((4, C): dgamma, dbeta, dbeta~, dgamma~
// in the accumulation dtype), each a tensor of its own in its parameter's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_outputs(
    const at::Tensor& dx, const at::Tensor& grads, const at::Tensor& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& proxy_bias,
    const std::optional<at::Tensor>& proxy_weight);

}  // namespace fusednorm
