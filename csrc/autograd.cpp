// Autograd of fusednorm::forward, in C++ for every device the extension has kernels for: with
// PN the proxy statistics are computed once (fusednorm::proxy_statistics) and given to both
// directions; the forward saves x, the parameters, the group and proxy statistics; the backward
// calls fusednorm::backward. In C++ rather than with torch.library.register_autograd because the
// Python autograd.Function costs ~0.1 ms per training step on CPU, as much as the kernels of a
// small layer (bench/results/cpu-phases-2c-20261201.md). Fake kernels stay in fusednorm/ops.py;
// torch.compile traces through this kernel like through any C++ autograd op.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fusednorm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using OptionalTensor = std::optional<at::Tensor>;
using ForwardSchema = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
    const OptionalTensor&, int64_t, int64_t, double, double, double, int64_t, bool,
    const OptionalTensor&);
using BackwardSchema = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const OptionalTensor&, const OptionalTensor&, const at::Tensor&, const at::Tensor&, int64_t,
    int64_t, double, double, int64_t, bool, const OptionalTensor&);
using ProxyStatisticsSchema = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptionalTensor&, const OptionalTensor&, int64_t,
                                         double, double, int64_t);

const c10::TypedOperatorHandle<ForwardSchema>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusednorm::forward", "")
                             .typed<ForwardSchema>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSchema>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusednorm::backward", "")
                             .typed<BackwardSchema>();
  return op;
}

const c10::TypedOperatorHandle<ProxyStatisticsSchema>& proxy_statistics_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusednorm::proxy_statistics", "")
                             .typed<ProxyStatisticsSchema>();
  return op;
}

std::optional<at::Tensor> if_defined(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class GroupNormProxyAct : public torch::autograd::Function<GroupNormProxyAct> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& bias,
                               const std::optional<at::Tensor>& proxy_bias,
                               const std::optional<at::Tensor>& proxy_weight, int64_t num_groups,
                               int64_t activation, double slope, double eps, double proxy_eps,
                               int64_t num_proxy_samples, bool proxy,
                               const OptionalTensor& given_proxy_stats) {
    TORCH_CHECK(!given_proxy_stats || !given_proxy_stats->requires_grad(),
                "fusednorm::forward: proxy_stats is a constant of the call (no gradient flows "
                "into it); pass it detached");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    OptionalTensor proxy_stats = given_proxy_stats;
    if (proxy && !proxy_stats) {
      proxy_stats = proxy_statistics_op().call(x, weight, bias, proxy_bias, proxy_weight,
                                               activation, slope, proxy_eps, num_proxy_samples);
    }
    auto [y, mean, rstd] =
        forward_op().call(x, weight, bias, proxy_bias, proxy_weight, num_groups, activation,
                          slope, eps, proxy_eps, num_proxy_samples, proxy, proxy_stats);
    ctx->save_for_backward({x, weight, bias, proxy_bias.value_or(at::Tensor()),
                            proxy_weight.value_or(at::Tensor()), mean, rstd,
                            proxy_stats.value_or(at::Tensor())});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["proxy_eps"] = proxy_eps;
    ctx->saved_data["num_proxy_samples"] = num_proxy_samples;
    ctx->saved_data["proxy"] = proxy;
    ctx->mark_non_differentiable({mean, rstd});
    // mean and rstd never get gradients: no zero tensors for them.
    ctx->set_materialize_grads(false);
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // x, weight, bias, proxy_bias, proxy_weight, then one undefined gradient per
    // non-tensor argument and for proxy_stats (a function of the parameters computed here, or
    // given as a constant).
    variable_list result(13);
    if (!grads[0].defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    const auto& data = ctx->saved_data;
    const std::optional<at::Tensor> proxy_bias = if_defined(saved[3]);
    const std::optional<at::Tensor> proxy_weight = if_defined(saved[4]);
    auto [dx, dweight, dbias, dproxy_bias, dproxy_weight] = backward_op().call(
        grads[0], saved[0], saved[1], saved[2], proxy_bias, proxy_weight, saved[5], saved[6],
        data.at("num_groups").toInt(), data.at("activation").toInt(),
        data.at("slope").toDouble(), data.at("proxy_eps").toDouble(),
        data.at("num_proxy_samples").toInt(), data.at("proxy").toBool(), if_defined(saved[7]));
    result[0] = dx;
    result[1] = dweight;
    result[2] = dbias;
    if (proxy_bias) result[3] = dproxy_bias;
    if (proxy_weight) result[4] = dproxy_weight;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_autograd(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& proxy_bias, const std::optional<at::Tensor>& proxy_weight,
    int64_t num_groups, int64_t activation, double slope, double eps, double proxy_eps,
    int64_t num_proxy_samples, bool proxy, const OptionalTensor& proxy_stats) {
  const variable_list out =
      GroupNormProxyAct::apply(x, weight, bias, proxy_bias, proxy_weight, num_groups, activation,
                               slope, eps, proxy_eps, num_proxy_samples, proxy, proxy_stats);
  return {out[0], out[1], out[2]};
}

// fusednorm::proxy_statistics has no backward of its own (fusednorm::backward differentiates
// through the statistics): asked for a graph, it says so instead of returning a constant.
at::Tensor proxy_statistics_autograd(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& bias, const OptionalTensor& proxy_bias,
                                     const OptionalTensor& proxy_weight, int64_t activation,
                                     double slope, double proxy_eps, int64_t num_proxy_samples) {
  const bool wants_graph =
      at::GradMode::is_enabled() &&
      (weight.requires_grad() || bias.requires_grad() ||
       (proxy_bias && proxy_bias->requires_grad()) ||
       (proxy_weight && proxy_weight->requires_grad()));
  TORCH_CHECK(!wants_graph,
              "fusednorm::proxy_statistics is not differentiable (fusednorm::forward's autograd "
              "differentiates through the proxy statistics); call it under torch.no_grad() or "
              "with detached parameters");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return proxy_statistics_op().call(x, weight, bias, proxy_bias, proxy_weight, activation, slope,
                                    proxy_eps, num_proxy_samples);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusednorm, Autograd, m) {
  m.impl("forward", &forward_autograd);
  m.impl("proxy_statistics", &proxy_statistics_autograd);
}

}  // namespace fusednorm
