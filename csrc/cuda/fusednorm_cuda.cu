// fusednorm::forward / fusednorm::backward for CUDA tensors: the same checks, allocations and
// outputs as the CPU implementation (cpu/fusednorm_cpu.cpp), with the kernels of kernels.cuh
// launched on the current stream (c10::cuda::getCurrentCUDAStream, which at::cuda re-exports).
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

at::Tensor proxy_samples(int64_t num_samples, const at::TensorOptions& options) {
  at::Tensor samples = at::empty({num_samples}, options);
  const int threads = 128;
  const auto blocks = static_cast<unsigned>((num_samples + threads - 1) / threads);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(samples.scalar_type(), "fusednorm_proxy_samples", [&] {
    proxy_samples_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        samples.mutable_data_ptr<scalar_t>(), num_samples);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return samples;
}

std::pair<at::Tensor, at::Tensor> proxy_statistics(const at::Tensor& weight, const at::Tensor& bias,
                                                   const at::Tensor& proxy_bias,
                                                   const at::Tensor& proxy_weight,
                                                   const at::Tensor& samples, int64_t activation,
                                                   double slope, double proxy_eps) {
  const int64_t C = weight.size(0);
  at::Tensor mean = at::empty_like(weight), scale = at::empty_like(weight);
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
  return {mean, scale};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& proxy_bias, const std::optional<at::Tensor>& proxy_weight,
    int64_t num_groups, int64_t activation, double slope, double eps, double proxy_eps,
    int64_t num_proxy_samples, bool proxy) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor x = dense_layout(input);
  const Problem p = check_arguments("forward", x, weight, bias, proxy_bias, proxy_weight,
                                    num_groups, activation, num_proxy_samples, proxy);
  const auto acc_options = x.options().dtype(accumulation_type(x.scalar_type()));
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({p.N, p.G}, acc_options);
  at::Tensor rstd = at::empty({p.N, p.G}, acc_options);
  if (x.numel() == 0) {  // groups without elements: variance 0
    mean.zero_();
    rstd.fill_(1.0 / std::sqrt(eps));
    return {y, mean, rstd};
  }
  const at::Tensor w = param_as(weight, p.C, acc_options), b = param_as(bias, p.C, acc_options);
  at::Tensor proxy_mean, proxy_scale;
  if (proxy) {
    std::tie(proxy_mean, proxy_scale) = proxy_statistics(
        w, b, param_as(proxy_bias, p.C, acc_options), param_as(proxy_weight, p.C, acc_options),
        proxy_samples(num_proxy_samples, acc_options), activation, slope, proxy_eps);
  }
  launch_forward(p, activation, slope, eps, x, y, w, b, proxy_mean, proxy_scale, mean, rstd);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& proxy_bias,
    const std::optional<at::Tensor>& proxy_weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, int64_t activation, double slope,
    double proxy_eps, int64_t num_proxy_samples, bool proxy) {
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor x = dense_layout(input);
  const Problem p = check_arguments("backward", x, weight, bias, proxy_bias, proxy_weight,
                                    num_groups, activation, num_proxy_samples, proxy);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "fusednorm::backward: grad_out has shape ",
              grad_out.sizes(), " but x has shape ", x.sizes());
  TORCH_CHECK(grad_out.device() == x.device(), "fusednorm::backward: grad_out is on ",
              grad_out.device(), " but x is on ", x.device());
  const at::Tensor grad = match_layout(grad_out.to(x.scalar_type()), x);
  const auto [group_mean, group_rstd] = check_statistics(x, mean, rstd, num_groups);
  const auto acc_options = x.options().dtype(accumulation_type(x.scalar_type()));
  const at::Tensor w = param_as(weight, p.C, acc_options), b = param_as(bias, p.C, acc_options);
  const at::Tensor pb = param_as(proxy_bias, p.C, acc_options);
  const at::Tensor pw = param_as(proxy_weight, p.C, acc_options);

  at::Tensor dx = at::empty_like(x);
  at::Tensor grads;
  if (x.numel() == 0) {
    grads = at::zeros({4, p.C}, acc_options);
  } else {
    at::Tensor samples, proxy_scale;
    if (proxy) {
      samples = proxy_samples(num_proxy_samples, acc_options);
      proxy_scale = proxy_statistics(w, b, pb, pw, samples, activation, slope, proxy_eps).second;
    }
    grads = launch_backward(p, activation, slope, proxy_eps, proxy, proxy_bias.has_value(),
                            proxy_weight.has_value(), grad, x, dx, group_mean, group_rstd, w, b,
                            pb, pw, samples, proxy_scale);
  }
  // Each gradient a tensor of its own (op outputs may not alias), in its parameter's dtype.
  auto as = [&](int64_t i, const std::optional<at::Tensor>& param) {
    const auto dtype = (param ? *param : weight).scalar_type();
    return grads.select(0, i).to(dtype, /*non_blocking=*/false, /*copy=*/true);
  };
  return {dx, as(0, weight), as(1, bias), as(2, proxy_bias), as(3, proxy_weight)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusednorm, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("backward", &backward_cuda);
}

}  // namespace fusednorm::cuda
