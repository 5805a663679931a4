// fusednorm::forward / fusednorm::backward for CPU tensors: checks, allocation, the per-channel
// proxy statistics and parameter gradients (O(N C + C K) work), and the kernels of forward.cpp /
// backward.cpp for the O(N C S) passes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

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

// gamma, beta, beta~, gamma~ as contiguous (C,) tensors of the accumulation dtype.
struct Params {
  at::Tensor weight, bias, proxy_bias, proxy_weight;
  Params(const at::Tensor& w, const at::Tensor& b, const std::optional<at::Tensor>& pb,
         const std::optional<at::Tensor>& pw, int64_t channels, const at::TensorOptions& options)
      : weight(param_as(w, channels, options)), bias(param_as(b, channels, options)),
        proxy_bias(param_as(pb, channels, options)),
        proxy_weight(param_as(pw, channels, options)) {}
};

template <typename acc_t>
std::vector<acc_t> samples_as(int64_t num_samples) {
  const std::vector<double>& samples = proxy_samples(num_samples);
  return std::vector<acc_t>(samples.begin(), samples.end());
}

// Per-channel proxy mean m_c and scale s_c = 1 / sqrt(v_c + proxy_eps).
std::pair<at::Tensor, at::Tensor> proxy_statistics(const Params& params, int64_t activation,
                                                   double slope, double proxy_eps,
                                                   int64_t num_samples) {
  const int64_t C = params.weight.size(0);
  at::Tensor mean = at::empty_like(params.weight), scale = at::empty_like(params.weight);
  AT_DISPATCH_FLOATING_TYPES(params.weight.scalar_type(), "fusednorm_proxy_statistics", [&] {
    using acc_t = scalar_t;
    const std::vector<acc_t> u = samples_as<acc_t>(num_samples);
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
          proxy_moments<kAct>(w[c], b[c], pb[c], pw[c], u.data(), num_samples,
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
  AT_DISPATCH_FLOATING_TYPES(partials.scalar_type(), "fusednorm_parameter_gradients", [&] {
    using acc_t = scalar_t;
    const std::vector<acc_t> u = proxy ? samples_as<acc_t>(num_samples) : std::vector<acc_t>();
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
            proxy_backward<kAct>(w[c], b[c], pb[c], pw[c], u.data(), num_samples,
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
  const Params params(weight, bias, proxy_bias, proxy_weight, p.C, acc_options);
  at::Tensor proxy_mean, proxy_scale;
  if (proxy) {
    std::tie(proxy_mean, proxy_scale) =
        proxy_statistics(params, activation, slope, proxy_eps, num_proxy_samples);
  }
  ForwardArgs args;
  args.dtype = kernel_dtype(x.scalar_type());
  args.N = p.N;
  args.C = p.C;
  args.S = p.S;
  args.G = p.G;
  args.channels_last = p.channels_last;
  args.activation = activation;
  args.slope = slope;
  args.eps = eps;
  args.x = x.const_data_ptr();
  args.y = y.mutable_data_ptr();
  args.weight = params.weight.const_data_ptr();
  args.bias = params.bias.const_data_ptr();
  args.proxy_mean = proxy ? proxy_mean.const_data_ptr() : nullptr;
  args.proxy_scale = proxy ? proxy_scale.const_data_ptr() : nullptr;
  args.mean = mean.mutable_data_ptr();
  args.rstd = rstd.mutable_data_ptr();
  kernels().forward(args);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& proxy_bias,
    const std::optional<at::Tensor>& proxy_weight, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, int64_t activation, double slope,
    double proxy_eps, int64_t num_proxy_samples, bool proxy) {
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
  const Params params(weight, bias, proxy_bias, proxy_weight, p.C, acc_options);

  at::Tensor dx = at::empty_like(x);
  at::Tensor partials = at::zeros({p.N, p.C, 4}, acc_options);
  if (x.numel() > 0) {
    at::Tensor proxy_scale;
    if (proxy) {
      proxy_scale =
          proxy_statistics(params, activation, slope, proxy_eps, num_proxy_samples).second;
    }
    BackwardArgs args;
    args.dtype = kernel_dtype(x.scalar_type());
    args.N = p.N;
    args.C = p.C;
    args.S = p.S;
    args.G = p.G;
    args.channels_last = p.channels_last;
    args.activation = activation;
    args.slope = slope;
    args.grad = grad.const_data_ptr();
    args.x = x.const_data_ptr();
    args.dx = dx.mutable_data_ptr();
    args.mean = group_mean.const_data_ptr();
    args.rstd = group_rstd.const_data_ptr();
    args.weight = params.weight.const_data_ptr();
    args.bias = params.bias.const_data_ptr();
    args.proxy_scale = proxy ? proxy_scale.const_data_ptr() : nullptr;
    args.partials = partials.mutable_data_ptr();
    kernels().backward(args);
  }
  const at::Tensor grads =
      parameter_gradients(partials, params, proxy, proxy_bias.has_value(),
                          proxy_weight.has_value(), activation, slope, proxy_eps,
                          num_proxy_samples);
  // Each gradient a tensor of its own (op outputs may not alias), in its parameter's dtype.
  auto as = [&](int64_t i, const std::optional<at::Tensor>& param) {
    const auto dtype = (param ? *param : weight).scalar_type();
    return grads.select(0, i).to(dtype, /*non_blocking=*/false, /*copy=*/true);
  };
  return {dx, as(0, weight), as(1, bias), as(2, proxy_bias), as(3, proxy_weight)};
}

}  // namespace

const char* kernel_capability() { return kernels().capability; }

TORCH_LIBRARY_IMPL(fusednorm, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace fusednorm::cpu
