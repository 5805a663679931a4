// fusednorm::forward / backward / proxy_statistics for CPU tensors: the kernels of forward.cpp and
// backward.cpp for the O(N C S) passes and of proxy_kernels.cpp for the per-channel ones (proxy
// statistics, parameter gradients: O(N C + C K)), chosen per instruction set. Checks and
// allocation: common.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../common.h"
#include "kernels.h"

namespace fusednorm::cpu {
namespace {

struct Kernels {
  void (*forward)(const ForwardArgs&);
  void (*backward)(const BackwardArgs&);
  void (*proxy_stats)(const ProxyArgs&);
  void (*parameter_grads)(const ParameterArgs&);
  const char* capability;
};

#define FUSEDNORM_KERNELS_OF(CAPABILITY)                                                     \
  Kernels {                                                                                  \
    CAPABILITY::forward, CAPABILITY::backward, CAPABILITY::proxy_stats,                      \
        CAPABILITY::parameter_grads, #CAPABILITY                                             \
  }

const Kernels& kernels() {
  static const Kernels chosen = [] {
    const std::string capability = at::get_cpu_capability();
#ifdef FUSEDNORM_HAVE_AVX512_BF16
    const char* no_bf16 = std::getenv("FUSEDNORM_NO_AVX512_BF16");
    const bool bf16_off = no_bf16 != nullptr && std::string(no_bf16) == "1";
    if (capability == "AVX512" && __builtin_cpu_supports("avx512bf16") && !bf16_off) {
      return FUSEDNORM_KERNELS_OF(AVX512_BF16);
    }
#endif
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

// Row i of the (2, C) proxy statistics: 0 m_c, 1 s_c.
void* proxy_row(const at::Tensor& proxy_stats, int i) {
  return static_cast<char*>(proxy_stats.mutable_data_ptr()) +
         i * proxy_stats.size(1) * proxy_stats.element_size();
}

// The parameters and, with PN, the samples and the proxy statistics (2, C): m_c, s_c.
void fill_proxy_args(ProxyArgs& args, const Params& params, int64_t activation, double slope,
                     double proxy_eps, int64_t num_samples, const at::Tensor& proxy_stats) {
  args.is_double = params.weight.scalar_type() == at::kDouble;
  args.C = params.weight.size(0);
  args.activation = activation;
  args.slope = slope;
  args.proxy_eps = proxy_eps;
  args.weight = params.weight.const_data_ptr();
  args.bias = params.bias.const_data_ptr();
  args.proxy_bias = params.proxy_bias.defined() ? params.proxy_bias.const_data_ptr() : nullptr;
  args.proxy_weight =
      params.proxy_weight.defined() ? params.proxy_weight.const_data_ptr() : nullptr;
  if (proxy_stats.defined()) {
    const at::Tensor& samples = proxy_samples(num_samples, params.weight.options());
    args.K = samples.size(0);
    args.samples = samples.const_data_ptr();
    args.proxy_mean = proxy_row(proxy_stats, 0);
    args.proxy_scale = proxy_row(proxy_stats, 1);
  }
}

// (2, C): the per-channel proxy mean m_c and scale s_c = 1 / sqrt(v_c + proxy_eps).
at::Tensor proxy_statistics(const Params& params, int64_t activation, double slope,
                            double proxy_eps, int64_t num_samples) {
  at::Tensor stats = at::empty({2, params.weight.size(0)}, params.weight.options());
  ProxyArgs args{};
  fill_proxy_args(args, params, activation, slope, proxy_eps, num_samples, stats);
  kernels().proxy_stats(args);
  return stats;
}

// The proxy statistics of a forward or backward call: those given (checked), else computed;
// undefined without PN.
at::Tensor proxy_stats_of(const char* op, const std::optional<at::Tensor>& given,
                          const at::Tensor& x, const Params& params, bool proxy,
                          int64_t activation, double slope, double proxy_eps,
                          int64_t num_samples) {
  if (!proxy) return at::Tensor();
  if (given) return check_proxy_stats(op, *given, x);
  return proxy_statistics(params, activation, slope, proxy_eps, num_samples);
}

at::Tensor proxy_statistics_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bias,
                                const std::optional<at::Tensor>& proxy_bias,
                                const std::optional<at::Tensor>& proxy_weight, int64_t activation,
                                double slope, double proxy_eps, int64_t num_proxy_samples) {
  const Params params = prepare_proxy_statistics(x, weight, bias, proxy_bias, proxy_weight,
                                                 activation, num_proxy_samples);
  return proxy_statistics(params, activation, slope, proxy_eps, num_proxy_samples);
}

// A parameter's gradient: written by the kernel in the accumulation dtype, returned in the
// parameter's (the weight's for an absent proxy parameter).
struct ParameterGradient {
  at::Tensor acc;
  at::ScalarType dtype;
  ParameterGradient(const std::optional<at::Tensor>& param, const at::Tensor& weight,
                    const at::TensorOptions& acc_options)
      : acc(at::empty({weight.size(0)}, acc_options)),
        dtype((param ? *param : weight).scalar_type()) {}
  at::Tensor result() const { return convert_vector(acc, dtype); }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& proxy_bias, const std::optional<at::Tensor>& proxy_weight,
    int64_t num_groups, int64_t activation, double slope, double eps, double proxy_eps,
    int64_t num_proxy_samples, bool proxy, const std::optional<at::Tensor>& given_proxy_stats) {
  const ForwardCall call = prepare_forward(input, weight, bias, proxy_bias, proxy_weight,
                                           num_groups, activation, eps, num_proxy_samples, proxy);
  if (call.empty) return {call.y, call.mean, call.rstd};
  const at::Tensor proxy_stats = proxy_stats_of("forward", given_proxy_stats, call.x, call.params,
                                                proxy, activation, slope, proxy_eps,
                                                num_proxy_samples);
  ForwardArgs args;
  static_cast<ProblemArgs&>(args) = problem_args(call.p, call.x, activation, slope);
  args.eps = eps;
  args.x = call.x.const_data_ptr();
  args.y = call.y.mutable_data_ptr();
  args.weight = call.params.weight.const_data_ptr();
  args.bias = call.params.bias.const_data_ptr();
  args.proxy_mean = proxy ? proxy_row(proxy_stats, 0) : nullptr;
  args.proxy_scale = proxy ? proxy_row(proxy_stats, 1) : nullptr;
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
    double proxy_eps, int64_t num_proxy_samples, bool proxy,
    const std::optional<at::Tensor>& given_proxy_stats) {
  const BackwardCall call =
      prepare_backward(grad_out, input, weight, bias, proxy_bias, proxy_weight, mean, rstd,
                       num_groups, activation, num_proxy_samples, proxy);
  const Problem& p = call.p;
  // The kernel writes every (n, c) entry; without elements (S = 0) the sums are zeros.
  at::Tensor partials = call.x.numel() > 0 ? at::empty({p.N, 4, p.C}, call.acc_options)
                                           : at::zeros({p.N, 4, p.C}, call.acc_options);
  const at::Tensor proxy_stats = proxy_stats_of("backward", given_proxy_stats, call.x,
                                                call.params, proxy, activation, slope, proxy_eps,
                                                num_proxy_samples);
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
    args.proxy_scale = proxy ? proxy_row(proxy_stats, 1) : nullptr;
    args.partials = partials.mutable_data_ptr();
    kernels().backward(args);
  }
  const ParameterGradient dweight(weight, weight, call.acc_options),
      dbias(bias, weight, call.acc_options), dproxy_bias(proxy_bias, weight, call.acc_options),
      dproxy_weight(proxy_weight, weight, call.acc_options);
  ParameterArgs args{};
  fill_proxy_args(args, call.params, activation, slope, proxy_eps, num_proxy_samples,
                  proxy_stats);
  args.N = p.N;
  args.proxy = proxy;
  args.partials = partials.const_data_ptr();
  args.dweight = dweight.acc.mutable_data_ptr();
  args.dbias = dbias.acc.mutable_data_ptr();
  args.dproxy_bias = dproxy_bias.acc.mutable_data_ptr();
  args.dproxy_weight = dproxy_weight.acc.mutable_data_ptr();
  kernels().parameter_grads(args);
  return {call.dx, dweight.result(), dbias.result(), dproxy_bias.result(),
          dproxy_weight.result()};
}

}  // namespace

const char* kernel_capability() { return kernels().capability; }

std::vector<std::string> built_capabilities() {
  std::vector<std::string> built{"DEFAULT"};
#ifdef FUSEDNORM_HAVE_AVX2
  built.push_back("AVX2");
#endif
#ifdef FUSEDNORM_HAVE_AVX512
  built.push_back("AVX512");
#endif
#ifdef FUSEDNORM_HAVE_AVX512_BF16
  built.push_back("AVX512_BF16");
#endif
  return built;
}

TORCH_LIBRARY_IMPL(fusednorm, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
  m.impl("proxy_statistics", &proxy_statistics_cpu);
}

}  // namespace fusednorm::cpu
