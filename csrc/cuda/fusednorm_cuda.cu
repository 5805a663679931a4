// fusednorm::forward / fusednorm::backward for CUDA tensors: the kernels of kernels.cuh launched
// on the current stream (c10::cuda::getCurrentCUDAStream, which at::cuda re-exports). Checks,
// allocation and outputs are shared with the CPU implementation (common.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "kernels.cuh"
#include "launch.h"

namespace fusednorm::cuda {

int64_t target_blocks() {
  const c10::DeviceIndex device = c10::cuda::current_device();
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  return 4 * static_cast<int64_t>(sm_count);
}

at::Tensor proxy_statistics(const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& proxy_bias, const at::Tensor& proxy_weight,
                            const at::Tensor& samples, int64_t activation, double slope,
                            double proxy_eps) {
  const int64_t C = weight.size(0);
  at::Tensor stats = at::empty({2, C}, weight.options());
  at::Tensor mean = stats[0], scale = stats[1];
  const int threads = 128;
  const auto blocks = static_cast<unsigned>((C + threads - 1) / threads);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "fusednorm_proxy_statistics", [&] {
    FUSEDNORM_DISPATCH_ACTIVATION(activation, [&] {
      proxy_stats_kernel<kAct, scalar_t><<<blocks, threads, 0, stream>>>(
          weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
          proxy_bias.const_data_ptr<scalar_t>(), proxy_weight.const_data_ptr<scalar_t>(),
          samples.const_data_ptr<scalar_t>(), C, samples.numel(), static_cast<scalar_t>(slope),
          static_cast<scalar_t>(proxy_eps), mean.mutable_data_ptr<scalar_t>(),
          scale.mutable_data_ptr<scalar_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return stats;
}

namespace {

// The CUDA kernels read every parameter: zeros stand in for an absent proxy parameter.
Params with_proxy_zeros(Params params) {
  for (at::Tensor* param : {&params.proxy_bias, &params.proxy_weight}) {
    if (!param->defined()) *param = at::zeros_like(params.weight);
  }
  return params;
}

// The (2, C) proxy statistics of a forward or backward call: those given (checked), else
// computed.
at::Tensor proxy_stats_of(const char* op, const std::optional<at::Tensor>& given,
                          const at::Tensor& x, const Params& params, int64_t activation,
                          double slope, double proxy_eps, int64_t num_proxy_samples) {
  if (given) return check_proxy_stats(op, *given, x);
  return proxy_statistics(params.weight, params.bias, params.proxy_bias, params.proxy_weight,
                          proxy_samples(num_proxy_samples, params.weight.options()), activation,
                          slope, proxy_eps);
}

at::Tensor proxy_statistics_cuda(const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& bias,
                                 const std::optional<at::Tensor>& proxy_bias,
                                 const std::optional<at::Tensor>& proxy_weight,
                                 int64_t activation, double slope, double proxy_eps,
                                 int64_t num_proxy_samples) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Params params = with_proxy_zeros(prepare_proxy_statistics(
      x, weight, bias, proxy_bias, proxy_weight, activation, num_proxy_samples));
  return proxy_stats_of("proxy_statistics", std::nullopt, x, params, activation, slope,
                        proxy_eps, num_proxy_samples);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& proxy_bias, const std::optional<at::Tensor>& proxy_weight,
    int64_t num_groups, int64_t activation, double slope, double eps, double proxy_eps,
    int64_t num_proxy_samples, bool proxy, const std::optional<at::Tensor>& given_proxy_stats) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  const ForwardCall call = prepare_forward(input, weight, bias, proxy_bias, proxy_weight,
                                           num_groups, activation, eps, num_proxy_samples, proxy);
  if (call.empty) return {call.y, call.mean, call.rstd};
  const Params params = with_proxy_zeros(call.params);
  at::Tensor proxy_mean, proxy_scale;
  if (proxy) {
    const at::Tensor stats = proxy_stats_of("forward", given_proxy_stats, call.x, params,
                                            activation, slope, proxy_eps, num_proxy_samples);
    proxy_mean = stats[0];
    proxy_scale = stats[1];
  }
  launch_forward(call.p, activation, slope, eps, call.x, call.y, params.weight, params.bias,
                 proxy_mean, proxy_scale, call.mean, call.rstd);
  return {call.y, call.mean, call.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& proxy_bias,
    const std::optional<at::Tensor>& proxy_weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, int64_t activation, double slope,
    double proxy_eps, int64_t num_proxy_samples, bool proxy,
    const std::optional<at::Tensor>& given_proxy_stats) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  const BackwardCall call =
      prepare_backward(grad_out, input, weight, bias, proxy_bias, proxy_weight, mean, rstd,
                       num_groups, activation, num_proxy_samples, proxy);
  const Params params = with_proxy_zeros(call.params);
  at::Tensor grads;
  if (call.x.numel() == 0) {
    grads = at::zeros({4, call.p.C}, call.acc_options);
  } else {
    at::Tensor samples, proxy_scale;
    if (proxy) {
      samples = proxy_samples(num_proxy_samples, call.acc_options);
      proxy_scale = proxy_stats_of("backward", given_proxy_stats, call.x, params, activation,
                                   slope, proxy_eps, num_proxy_samples)[1];
    }
    grads = launch_backward(call.p, activation, slope, proxy_eps, proxy, proxy_bias.has_value(),
                            proxy_weight.has_value(), call.grad, call.x, call.dx, call.mean,
                            call.rstd, params.weight, params.bias, params.proxy_bias,
                            params.proxy_weight, samples, proxy_scale);
  }
  return backward_outputs(call.dx, grads, weight, bias, proxy_bias, proxy_weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusednorm, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("backward", &backward_cuda);
  m.impl("proxy_statistics", &proxy_statistics_cuda);
}

}  // namespace fusednorm::cuda
