// fusednorm::forward / fusednorm::backward for CPU tensors: the per-channel proxy statistics and
// parameter gradients (O(N C + C K) work) and the kernels of forward.cpp / backward.cpp for the
// O(N C S) passes, chosen per instruction set. Checks and allocation: common.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "../activations.h"
#include "../common.h"
#include "../proxy.h"
#include "kernels.h"

namespace fusednorm::cpu {
namespace {

struct Kernels {
  void (*forward)(const ForwardArgs&);
  void (*backward)(const BackwardArgs&);
  const char* capability;
};

const Kernels& kernels() {
  static const Kernels chosen = [] {
    const std::string capability = at::get_cpu_capability();
#ifdef FUSEDNORM_HAVE_AVX512
    if (capability == "AVX512") return Kernels{AVX512::forward, AVX512::backward, "AVX512"};
#endif
#ifdef FUSEDNORM_HAVE_AVX2
    if (capability == "AVX2" || capability == "AVX512") {
      return Kernels{AVX2::forward, AVX2::backward, "AVX2"};
    }
#endif
    return Kernels{DEFAULT::forward, DEFAULT::backward, "DEFAULT"};
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

// Per-channel proxy mean m_c and scale s_c = 1 / sqrt(v_c + proxy_eps).
std::pair<at::Tensor, at::Tensor> proxy_statistics(const Params& params, int64_t activation,
                                                   double slope, double proxy_eps,
                                                   int64_t num_samples) {
  const int64_t C = params.weight.size(0);
  at::Tensor mean = at::empty_like(params.weight), scale = at::empty_like(params.weight);
  const at::Tensor& samples = proxy_samples(num_samples, params.weight.options());
  AT_DISPATCH_FLOATING_TYPES(params.weight.scalar_type(), "fusednorm_proxy_statistics", [&] {
    using acc_t = scalar_t;
    const acc_t* u = samples.const_data_ptr<acc_t>();
    const acc_t* w = params.weight.data_ptr<acc_t>();
    const acc_t* b = params.bias.data_ptr<acc_t>();
    const acc_t* pb = params.proxy_bias.data_ptr<acc_t>();
    const acc_t* pw = params.proxy_weight.data_ptr<acc_t>();
    acc_t* m = mean.data_ptr<acc_t>();
    acc_t* s = scale.data_ptr<acc_t>();
    FUSEDNORM_DISPATCH_ACTIVATION(activation, [&] {
      at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          acc_t var;
          proxy_moments<kAct>(w[c], b[c], pb[c], pw[c], u, num_samples,
                              static_cast<acc_t>(slope), m[c], var);
          s[c] = acc_t(1) / std::sqrt(var + static_cast<acc_t>(proxy_eps));
        }
      });
    });
  });
  return {mean, scale};
}

// (4, C): dgamma, dbeta, dbeta~, dgamma~ from the (N, C, 4) partials, reduced over n in order.
at::Tensor parameter_gradients(const at::Tensor& partials, const Params& params, bool proxy,
                               bool has_proxy_bias, bool has_proxy_weight, int64_t activation,
                               double slope, double proxy_eps, int64_t num_samples) {
  const int64_t N = partials.size(0), C = partials.size(1);
  at::Tensor grads = at::empty({4, C}, partials.options());
  const at::Tensor samples = proxy ? proxy_samples(num_samples, partials.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(partials.scalar_type(), "fusednorm_parameter_gradients", [&] {
    using acc_t = scalar_t;
    const acc_t* u = proxy ? samples.const_data_ptr<acc_t>() : nullptr;
    const acc_t* part = partials.data_ptr<acc_t>();
    const acc_t* w = params.weight.data_ptr<acc_t>();
    const acc_t* b = params.bias.data_ptr<acc_t>();
    const acc_t* pb = params.proxy_bias.data_ptr<acc_t>();
    const acc_t* pw = params.proxy_weight.data_ptr<acc_t>();
    acc_t* out = grads.data_ptr<acc_t>();
    FUSEDNORM_DISPATCH_ACTIVATION(activation, [&] {
      at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          acc_t sum_a = 0, sum_b = 0, sum_d = 0, sum_e = 0;
          for (int64_t n = 0; n < N; ++n) {
            const acc_t* p = part + (n * C + c) * 4;
            sum_a += p[0];
            sum_b += p[1];
            sum_d += p[2];
            sum_e += p[3];
          }
          acc_t dweight = sum_b, dbias = sum_a, dproxy_bias = 0, dproxy_weight = 0;
          if (proxy) {
            proxy_backward<kAct>(w[c], b[c], pb[c], pw[c], u, num_samples,
                                 static_cast<acc_t>(slope), static_cast<acc_t>(proxy_eps), sum_d,
                                 sum_e, dweight, dbias, dproxy_bias, dproxy_weight);
          }
          out[c] = dweight;
          out[C + c] = dbias;
          out[2 * C + c] = has_proxy_bias ? dproxy_bias : acc_t(0);
          out[3 * C + c] = has_proxy_weight ? dproxy_weight : acc_t(0);
        }
      });
    });
  });
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
  at::Tensor partials = at::zeros({p.N, p.C, 4}, call.acc_options);
  if (call.x.numel() > 0) {
    at::Tensor proxy_scale;
    if (proxy) {
      proxy_scale =
          proxy_statistics(call.params, activation, slope, proxy_eps, num_proxy_samples).second;
    }
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
                          num_proxy_samples);
  return backward_outputs(call.dx, grads, weight, bias, proxy_bias, proxy_weight);
}

}  // namespace

const char* kernel_capability() { return kernels().capability; }

TORCH_LIBRARY_IMPL(fusednorm, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace fusednorm::cpu
