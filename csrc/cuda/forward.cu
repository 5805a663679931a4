// Forward launcher: group statistics (split over several blocks per group when N*G blocks alone
// would leave the GPU idle), then the elementwise apply.
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
void forward_typed(const Problem& p, double slope, double eps, const at::Tensor& x,
                   const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& proxy_mean, const at::Tensor& proxy_scale,
                   const at::Tensor& mean, const at::Tensor& rstd) {
  using acc_t = at::opmath_type<scalar_t>;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t NG = p.N * p.G, M = p.C / p.G * p.S;

  // At least ~4 elements per thread in a split; as many splits as it takes to fill the GPU.
  const int64_t target = target_blocks();
  int64_t splits = 1;
  if (NG < target) {
    splits = std::min<int64_t>(divup(target, NG), std::max<int64_t>(1, M / (4 * kBlock)));
    splits = std::min<int64_t>(splits, 65535);
  }
  const int64_t per_split = divup(M, splits);
  splits = divup(M, per_split);
  const dim3 grid(static_cast<unsigned>(NG), static_cast<unsigned>(splits));
  const auto* x_ptr = x.const_data_ptr<scalar_t>();
  auto* mean_ptr = mean.mutable_data_ptr<acc_t>();
  auto* rstd_ptr = rstd.mutable_data_ptr<acc_t>();
  if (splits == 1) {
    group_stats_kernel<CHANNELS_LAST, scalar_t, acc_t, index_t><<<grid, kBlock, 0, stream>>>(
        x_ptr, p.C, p.S, p.G, per_split, static_cast<acc_t>(eps), mean_ptr, rstd_ptr, nullptr,
        nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    at::Tensor parts = at::empty({3, NG, splits}, mean.options());
    auto* part = parts.mutable_data_ptr<acc_t>();
    group_stats_kernel<CHANNELS_LAST, scalar_t, acc_t, index_t><<<grid, kBlock, 0, stream>>>(
        x_ptr, p.C, p.S, p.G, per_split, static_cast<acc_t>(eps), nullptr, nullptr, part,
        part + NG * splits, part + 2 * NG * splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    stats_combine_kernel<acc_t><<<divup(NG, kBlock), kBlock, 0, stream>>>(
        part, part + NG * splits, part + 2 * NG * splits, NG, splits, static_cast<acc_t>(eps),
        mean_ptr, rstd_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  const int64_t total = x.numel();
  const int64_t blocks = std::min<int64_t>(divup(total, kBlock), 32 * target);
  const bool proxy = proxy_scale.defined();
  apply_kernel<ACT, CHANNELS_LAST, scalar_t, acc_t, index_t><<<blocks, kBlock, 0, stream>>>(
      x_ptr, y.mutable_data_ptr<scalar_t>(), mean_ptr, rstd_ptr, weight.const_data_ptr<acc_t>(),
      bias.const_data_ptr<acc_t>(), proxy ? proxy_mean.const_data_ptr<acc_t>() : nullptr,
      proxy ? proxy_scale.const_data_ptr<acc_t>() : nullptr, total, p.C, p.S, p.G,
      static_cast<acc_t>(slope));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_forward(const Problem& p, int64_t activation, double slope, double eps,
                    const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
                    const at::Tensor& bias, const at::Tensor& proxy_mean,
                    const at::Tensor& proxy_scale, const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK(p.N * p.G <= std::numeric_limits<int32_t>::max(),
              "fusednorm::forward: N * G = ", p.N * p.G, " exceeds the CUDA grid");
  const bool index_64 = needs_index_64(x);
  const auto dtype = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusednorm_forward", [&] {
    FUSEDNORM_DISPATCH_ACTIVATION(activation, [&] {
      dispatch_layout_and_index(p, index_64, [&](auto channels_last, auto index) {
        forward_typed<kAct, decltype(channels_last)::value, scalar_t, decltype(index)>(
            p, slope, eps, x, y, weight, bias, proxy_mean, proxy_scale, mean, rstd);
      });
    });
  });
}

}  // namespace fusednorm::cuda
