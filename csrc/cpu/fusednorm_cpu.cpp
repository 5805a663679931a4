// fusednorm::forward / fusednorm::backward for CPU tensors: the per-channel proxy statistics and
// parameter gradients (O(N C + C K) work) and the kernels of forward.cpp / backward.cpp for the
// O(N C S) passes, chosen per instruction set. Checks and allocation: common.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <string>

#include "../common.h"
#include "kernels.h"

namespace fusednorm::cpu {
namespace {

struct Kernels {
  void (*forward)(const ForwardArgs&);
  void (*backward)(const BackwardArgs&);
  void (*proxy_stats)(const ProxyArgs&);
  void (*proxy_grads)(const ProxyArgs&);
  const char* capability;
};

#define FUSEDNORM_KERNELS_OF(CAPABILITY)                                                     \
  Kernels {                                                                                  \
    CAPABILITY::forward, CAPABILITY::backward, CAPABILITY::proxy_stats,                      \
        CAPABILITY::proxy_grads, #CAPABILITY                                                 \
  }

const Kernels& kernels() {
  static const Kernels chosen = [] {
    const std::string capability = at::get_cpu_capability();
#ifdef FUSEDNORM_HAVE_AVX512
    if (capability == "AVX512") return FUSEDNORM_KERNELS_OF(AVX512);
#endif
#ifdef FUSEDNORM_HAVE_AVX2
    if (capability == "AVX2" || capability == "AVX512") {
      return FUSEDNORM_KERNELS_OF(AVX2);
    }
#endif
    return FUSEDNORM_KERNELS_OF(DEFAULT);
  }();
  return chosen;
}

Dtype kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return Dtype::kDouble;
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: return Dtype::kFloat;
  }
}

ProblemArgs problem_args(const Problem& p, const at::Tensor& x, int64_t activation,
                         double slope) {
  return {kernel_dtype(x.scalar_type()), p.N, p.C, p.S, p.G, p.channels_last, activation, slope};
}

ProxyArgs proxy_args(const Params& params, int64_t activation, double slope, double proxy_eps,
                     const at::Tensor& samples) {
  ProxyArgs args{};
  args.is_double = params.weight.scalar_type() == at::kDouble;
  args.C = params.weight.size(0);
  args.K = samples.size(0);
  args.activation = activation;
  args.slope = slope;
  args.proxy_eps = proxy_eps;
  args.weight = params.weight.const_data_ptr();
  args.bias = params.bias.const_data_ptr();
  args.proxy_bias = params.proxy_bias.const_data_ptr();
  args.proxy_weight = params.proxy_weight.const_data_ptr();
  args.samples = samples.const_data_ptr();
  return args;
}

// Per-channel proxy mean m_c and scale s_c = 1 / sqrt(v_c + proxy_eps).
std::pair<at::Tensor, at::Tensor> proxy_statistics(const Params& params, int64_t activation,
                                                   double slope, double proxy_eps,
                                                   int64_t num_samples) {
  at::Tensor mean = at::empty_like(params.weight), scale = at::empty_like(params.weight);
  ProxyArgs args = proxy_args(params, activation, slope, proxy_eps,
                              proxy_samples(num_samples, params.weight.options()));
  args.proxy_mean = mean.mutable_data_ptr();
  args.proxy_scale = scale.mutable_data_ptr();
  kernels().proxy_stats(args);
  return {mean, scale};
}

// (4, C): dgamma, dbeta, dbeta~, dgamma~ from the (N, C, 4) partials, reduced over n in order,
// plus (with PN) the proxy terms, given the proxy statistics of the forward's parameters.
at::Tensor parameter_gradients(const at::Tensor& partials, const Params& params, bool proxy,
                               bool has_proxy_bias, bool has_proxy_weight, int64_t activation,
                               double slope, double proxy_eps, int64_t num_samples,
                               const at::Tensor& proxy_mean, const at::Tensor& proxy_scale) {
  RECORD_FUNCTION("fusednorm_cpu::parameter_gradients", c10::ArrayRef<const c10::IValue>{});
  const int64_t N = partials.size(0), C = partials.size(1);
  // Rows dweight (sum B), dbias (sum A), D, E; with PN rows 2 and 3 become the proxy gradients.
  at::Tensor grads = at::empty({4, C}, partials.options());
  AT_DISPATCH_FLOATING_TYPES(partials.scalar_type(), "fusednorm_parameter_gradients", [&] {
    using acc_t = scalar_t;
    const acc_t* part = partials.const_data_ptr<acc_t>();
    acc_t* out = grads.mutable_data_ptr<acc_t>();
    at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        acc_t sum_a = 0, sum_b = 0, sum_d = 0, sum_e = 0;
        for (int64_t n = 0; n < N; ++n) {
          const acc_t* p = part + (n * C + c) * 4;
          sum_a += p[0];
          sum_b += p[1];
          sum_d += p[2];
          sum_e += p[3];
        }
        out[c] = sum_b;
        out[C + c] = sum_a;
        out[2 * C + c] = sum_d;
        out[3 * C + c] = sum_e;
      }
    });
  });
  if (!proxy) {
    grads.narrow(0, 2, 2).zero_();
    return grads;
  }
  const at::Tensor sums = grads.narrow(0, 2, 2).clone();  // D_c, E_c: read while rows 2-3 change
  ProxyArgs args = proxy_args(params, activation, slope, proxy_eps,
                              proxy_samples(num_samples, params.weight.options()));
  args.proxy_mean = proxy_mean.mutable_data_ptr();
  args.proxy_scale = proxy_scale.mutable_data_ptr();
  args.sum_d = sums[0].const_data_ptr();
  args.sum_e = sums[1].const_data_ptr();
  args.dweight = grads[0].mutable_data_ptr();
  args.dbias = grads[1].mutable_data_ptr();
  args.dproxy_bias = grads[2].mutable_data_ptr();
  args.dproxy_weight = grads[3].mutable_data_ptr();
  kernels().proxy_grads(args);
  if (!has_proxy_bias) grads[2].zero_();
  if (!has_proxy_weight) grads[3].zero_();
  return grads;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& proxy_bias, const std::optional<at::Tensor>& proxy_weight,
    int64_t num_groups, int64_t activation, double slope, double eps, double proxy_eps,
    int64_t num_proxy_samples, bool proxy) {
  const ForwardCall call = prepare_forward(input, weight, bias, proxy_bias, proxy_weight,
                                           num_groups, activation, eps, num_proxy_samples, proxy);
  if (call.empty) return {call.y, call.mean, call.rstd};
  at::Tensor proxy_mean, proxy_scale;
  if (proxy) {
    std::tie(proxy_mean, proxy_scale) =
        proxy_statistics(call.params, activation, slope, proxy_eps, num_proxy_samples);
  }
  ForwardArgs args;
  static_cast<ProblemArgs&>(args) = problem_args(call.p, call.x, activation, slope);
  args.eps = eps;
  args.x = call.x.const_data_ptr();
  args.y = call.y.mutable_data_ptr();
  args.weight = call.params.weight.const_data_ptr();
  args.bias = call.params.bias.const_data_ptr();
  args.proxy_mean = proxy ? proxy_mean.const_data_ptr() : nullptr;
  args.proxy_scale = proxy ? proxy_scale.const_data_ptr() : nullptr;
  args.mean = call.mean.mutable_data_ptr();
  args.rstd = call.rstd.mutable_data_ptr();
  kernels().forward(args);
  return {call.y, call.mean, call.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& proxy_bias,
    const std::optional<at::Tensor>& proxy_weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, int64_t activation, double slope,
    double proxy_eps, int64_t num_proxy_samples, bool proxy) {
  const BackwardCall call =
      prepare_backward(grad_out, input, weight, bias, proxy_bias, proxy_weight, mean, rstd,
                       num_groups, activation, num_proxy_samples, proxy);
  const Problem& p = call.p;
  // The kernel writes every (n, c) entry; without elements (S = 0) the sums are zeros.
  at::Tensor partials = call.x.numel() > 0 ? at::empty({p.N, p.C, 4}, call.acc_options)
                                           : at::zeros({p.N, p.C, 4}, call.acc_options);
  at::Tensor proxy_mean, proxy_scale;
  if (proxy) {
    std::tie(proxy_mean, proxy_scale) =
        proxy_statistics(call.params, activation, slope, proxy_eps, num_proxy_samples);
  }
  if (call.x.numel() > 0) {
    BackwardArgs args;
    static_cast<ProblemArgs&>(args) = problem_args(p, call.x, activation, slope);
    args.grad = call.grad.const_data_ptr();
    args.x = call.x.const_data_ptr();
    args.dx = call.dx.mutable_data_ptr();
    args.mean = call.mean.const_data_ptr();
    args.rstd = call.rstd.const_data_ptr();
    args.weight = call.params.weight.const_data_ptr();
    args.bias = call.params.bias.const_data_ptr();
    args.proxy_scale = proxy ? proxy_scale.const_data_ptr() : nullptr;
    args.partials = partials.mutable_data_ptr();
    kernels().backward(args);
  }
  const at::Tensor grads =
      parameter_gradients(partials, call.params, proxy, proxy_bias.has_value(),
                          proxy_weight.has_value(), activation, slope, proxy_eps,
                          num_proxy_samples, proxy_mean, proxy_scale);
  return backward_outputs(call.dx, grads, weight, bias, proxy_bias, proxy_weight);
}

}  // namespace

const char* kernel_capability() { return kernels().capability; }

TORCH_LIBRARY_IMPL(fusednorm, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace fusednorm::cpu
