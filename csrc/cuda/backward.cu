// Backward launcher: per-(split, n, c) partial sums, per-(n, g) group sums, per-channel
// parameter gradients (fixed-order reductions, no atomics), then the elementwise dx.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "kernels.cuh"
#include "launch.h"

namespace fusednorm::cuda {

namespace {

int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int ACT, bool CHANNELS_LAST, typename scalar_t, typename index_t>
at::Tensor backward_typed(const Problem& p, double slope, double proxy_eps, bool proxy,
                          bool has_proxy_bias, bool has_proxy_weight, const at::Tensor& grad,
                          const at::Tensor& x, const at::Tensor& dx, const at::Tensor& mean,
                          const at::Tensor& rstd, const at::Tensor& weight,
                          const at::Tensor& bias, const at::Tensor& proxy_bias,
                          const at::Tensor& proxy_weight, const at::Tensor& samples,
                          const at::Tensor& proxy_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = p.N, C = p.C, S = p.S, G = p.G;
  const auto acc_options = mean.options();
  const acc_t* scale_ptr = proxy ? proxy_scale.const_data_ptr<acc_t>() : nullptr;
  const auto* grad_ptr = grad.const_data_ptr<scalar_t>();
  const auto* x_ptr = x.const_data_ptr<scalar_t>();
  const auto* mean_ptr = mean.const_data_ptr<acc_t>();
  const auto* rstd_ptr = rstd.const_data_ptr<acc_t>();
  const auto* weight_ptr = weight.const_data_ptr<acc_t>();
  const auto* bias_ptr = bias.const_data_ptr<acc_t>();

  // Partial sums per (split, n, c), S split over blocks when (n, c) blocks alone are too few.
  const int64_t rows = CHANNELS_LAST ? N * divup(C, kTileC) : N * C;
  const int64_t min_per_split = CHANNELS_LAST ? 4 * kTileRows : 4 * kBlock;
  const int64_t target = target_blocks();
  int64_t splits = 1;
  if (rows < target) {
    splits = std::min<int64_t>(divup(target, rows),
                               std::max<int64_t>(1, S / min_per_split));
    splits = std::min<int64_t>(splits, 65535);
  }
  const int64_t per_split = divup(S, splits);
  splits = divup(S, per_split);
  at::Tensor partials = at::empty({4, splits, N, C}, acc_options);
  auto* partials_ptr = partials.mutable_data_ptr<acc_t>();
  auto launch_partials = [&](auto with_proxy) {
    constexpr bool PROXY = decltype(with_proxy)::value;
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(splits));
    if constexpr (CHANNELS_LAST) {
      partials_channels_last_kernel<ACT, PROXY, scalar_t, acc_t, index_t>
          <<<grid, dim3(kTileC, kTileRows), 0, stream>>>(
              grad_ptr, x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, scale_ptr, partials_ptr,
              N, C, S, G, per_split, static_cast<acc_t>(slope));
    } else {
      partials_rows_kernel<ACT, PROXY, scalar_t, acc_t, index_t><<<grid, kBlock, 0, stream>>>(
          grad_ptr, x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, scale_ptr, partials_ptr, N,
          C, S, G, per_split, static_cast<acc_t>(slope));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (proxy) {
    launch_partials(std::true_type{});
  } else {
    launch_partials(std::false_type{});
  }

  at::Tensor group_sums = at::empty({2, N * G}, acc_options);
  group_sums_kernel<acc_t><<<static_cast<unsigned>(N * G), kBlock, 0, stream>>>(
      partials_ptr, weight_ptr, group_sums.mutable_data_ptr<acc_t>(), N, C, G, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor grads = at::empty({4, C}, acc_options);
  param_grads_kernel<ACT, acc_t><<<divup(C, 128), 128, 0, stream>>>(
      partials_ptr, splits * N, C, weight_ptr, bias_ptr, proxy_bias.const_data_ptr<acc_t>(),
      proxy_weight.const_data_ptr<acc_t>(), proxy ? samples.const_data_ptr<acc_t>() : nullptr,
      proxy ? samples.numel() : 0, static_cast<acc_t>(slope), static_cast<acc_t>(proxy_eps), proxy,
      has_proxy_bias, has_proxy_weight, grads.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t total = x.numel();
  const int64_t blocks = std::min<int64_t>(divup(total, kBlock), 32 * target);
  dx_kernel<ACT, CHANNELS_LAST, scalar_t, acc_t, index_t><<<blocks, kBlock, 0, stream>>>(
      grad_ptr, x_ptr, dx.mutable_data_ptr<scalar_t>(), mean_ptr, rstd_ptr,
      group_sums.const_data_ptr<acc_t>(), weight_ptr, bias_ptr, scale_ptr, total, N, C, S, G,
      static_cast<acc_t>(slope));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grads;
}

}  // namespace

at::Tensor launch_backward(const Problem& p, int64_t activation, double slope, double proxy_eps,
                           bool proxy, bool has_proxy_bias, bool has_proxy_weight,
                           const at::Tensor& grad, const at::Tensor& x, const at::Tensor& dx,
                           const at::Tensor& mean, const at::Tensor& rstd,
                           const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor& proxy_bias, const at::Tensor& proxy_weight,
                           const at::Tensor& samples, const at::Tensor& proxy_scale) {
  const int64_t rows = p.channels_last ? p.N * ((p.C + kTileC - 1) / kTileC) : p.N * p.C;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max() &&
                  p.N * p.G <= std::numeric_limits<int32_t>::max(),
              "fusednorm::backward: N * C = ", p.N * p.C, " exceeds the CUDA grid");
  const bool index_64 = needs_index_64(x);
  at::Tensor grads;
  const auto dtype = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusednorm_backward", [&] {
    FUSEDNORM_DISPATCH_ACTIVATION(activation, [&] {
      dispatch_layout_and_index(p, index_64, [&](auto channels_last, auto index) {
        grads = backward_typed<kAct, decltype(channels_last)::value, scalar_t, decltype(index)>(
            p, slope, proxy_eps, proxy, has_proxy_bias, has_proxy_weight, grad, x, dx, mean, rstd,
            weight, bias, proxy_bias, proxy_weight, samples, proxy_scale);
      });
    });
  });
  return grads;
}

}  // namespace fusednorm::cuda
