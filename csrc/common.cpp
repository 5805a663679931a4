#include "common.h"

#include "activations.h"

#include <cmath>

namespace fusednorm {

namespace {
// Whether t is dense in the order (N, *spatial, C), as t.movedim(1, -1).is_contiguous() says
// (size-1 dims' strides ignored), without building the view: the ops call this on every input.
bool is_channels_last_like(const at::Tensor& t) {
  if (t.dim() <= 2) return false;
  int64_t expected = 1;
  auto dense_at = [&](int64_t d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
    return true;
  };
  if (!dense_at(1)) return false;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (!dense_at(d)) return false;
  }
  return dense_at(0);
}

void check_param(const char* op, const char* name, const at::Tensor& param, const at::Tensor& x) {
  TORCH_CHECK(param.dim() == 1 && param.size(0) == x.size(1), "fusednorm::", op, ": ", name,
              " must have shape (C,) = (", x.size(1), ",), got ", param.sizes());
  TORCH_CHECK(at::isFloatingType(param.scalar_type()), "fusednorm::", op, ": ", name,
              " must be floating point, got ", param.scalar_type());
  TORCH_CHECK(param.device() == x.device(), "fusednorm::", op, ": ", name, " is on ",
              param.device(), " but x is on ", x.device());
}
}  // namespace

at::Tensor dense_layout(const at::Tensor& x) {
  if (x.is_contiguous() || is_channels_last_like(x)) return x;
  return x.contiguous();
}

at::Tensor match_layout(const at::Tensor& t, const at::Tensor& dense) {
  if (dense.is_contiguous()) return t.contiguous();
  if (is_channels_last_like(t)) return t;
  return t.movedim(1, -1).contiguous().movedim(-1, 1);
}

at::ScalarType accumulation_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {
void check_has_channels(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "fusednorm::", op, ": x must have shape (N, C, *spatial), got ",
              x.sizes());
}

void check_activation(const char* op, int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation < kNumActivations, "fusednorm::", op,
              ": unknown activation id ", activation, " (expected 0-", kNumActivations - 1, ")");
}

// The four parameters of x's channels (the proxy ones when given).
void check_params(const char* op, const at::Tensor& x, const at::Tensor& weight,
                  const at::Tensor& bias, const std::optional<at::Tensor>& proxy_bias,
                  const std::optional<at::Tensor>& proxy_weight) {
  check_param(op, "weight", weight, x);
  check_param(op, "bias", bias, x);
  if (proxy_bias) check_param(op, "proxy_bias", *proxy_bias, x);
  if (proxy_weight) check_param(op, "proxy_weight", *proxy_weight, x);
}

void check_num_proxy_samples(const char* op, int64_t num_proxy_samples) {
  TORCH_CHECK(num_proxy_samples >= 2, "fusednorm::", op,
              ": num_proxy_samples must be >= 2, got ", num_proxy_samples);
}
}  // namespace

Problem check_arguments(const char* op, const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& bias, const std::optional<at::Tensor>& proxy_bias,
                        const std::optional<at::Tensor>& proxy_weight, int64_t num_groups,
                        int64_t activation, int64_t num_proxy_samples, bool proxy) {
  check_has_channels(op, x);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "fusednorm::", op, ": x must be float16/bfloat16/float32/float64, got ", dtype);
  TORCH_CHECK(num_groups > 0 && x.size(1) % num_groups == 0, "fusednorm::", op,
              ": C=", x.size(1), " is not divisible by num_groups=", num_groups);
  check_activation(op, activation);
  if (proxy) check_num_proxy_samples(op, num_proxy_samples);
  check_params(op, x, weight, bias, proxy_bias, proxy_weight);

  Problem p;
  p.N = x.size(0);
  p.C = x.size(1);
  p.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) p.S *= x.size(d);
  p.G = num_groups;
  p.channels_last = p.S == 1 || !x.is_contiguous();
  return p;
}

std::pair<at::Tensor, at::Tensor> check_statistics(const at::Tensor& x, const at::Tensor& mean,
                                                   const at::Tensor& rstd, int64_t num_groups) {
  const auto acc = accumulation_type(x.scalar_type());
  for (const auto* t : {&mean, &rstd}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == num_groups,
                "fusednorm::backward: mean and rstd must have shape (N, G) = (", x.size(0), ", ",
                num_groups, "), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == acc, "fusednorm::backward: mean and rstd must be ", acc,
                " for ", x.scalar_type(), " input, got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), "fusednorm::backward: mean/rstd are on ", t->device(),
                " but x is on ", x.device());
  }
  return {mean.contiguous(), rstd.contiguous()};
}

at::Tensor convert_vector(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  const bool reduced_float = (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf) &&
                             dtype == at::kFloat;
  const bool float_reduced = t.scalar_type() == at::kFloat &&
                             (dtype == at::kBFloat16 || dtype == at::kHalf);
  if (!t.is_cpu() || t.dim() != 1 || !t.is_contiguous() || !(reduced_float || float_reduced)) {
    return t.to(dtype).contiguous();
  }
  at::Tensor out = at::empty({t.size(0)}, t.options().dtype(dtype));
  const int64_t n = t.size(0);
  // The same rounding as .to(): c10's conversions (round to nearest even).
  AT_DISPATCH_REDUCED_FLOATING_TYPES(reduced_float ? t.scalar_type() : dtype, "convert_vector",
                                     [&] {
    if (reduced_float) {
      const scalar_t* src = t.const_data_ptr<scalar_t>();
      float* dst = out.mutable_data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
    } else {
      const float* src = t.const_data_ptr<float>();
      scalar_t* dst = out.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
    }
  });
  return out;
}

namespace {
// `param` as a contiguous (C,) tensor of the accumulation dtype (itself when it is one).
at::Tensor param_as(const at::Tensor& param, const at::TensorOptions& options) {
  return convert_vector(param, options.dtype().toScalarType());
}

at::Tensor proxy_param_as(const std::optional<at::Tensor>& param,
                          const at::TensorOptions& options) {
  return param ? param_as(*param, options) : at::Tensor();
}

Params params_as(const at::Tensor& weight, const at::Tensor& bias,
                 const std::optional<at::Tensor>& proxy_bias,
                 const std::optional<at::Tensor>& proxy_weight,
                 const at::TensorOptions& options) {
  return {param_as(weight, options), param_as(bias, options),
          proxy_param_as(proxy_bias, options), proxy_param_as(proxy_weight, options)};
}
}  // namespace

Params prepare_proxy_statistics(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bias,
                                const std::optional<at::Tensor>& proxy_bias,
                                const std::optional<at::Tensor>& proxy_weight,
                                int64_t activation, int64_t num_proxy_samples) {
  const char* op = "proxy_statistics";
  check_has_channels(op, x);
  check_activation(op, activation);
  check_num_proxy_samples(op, num_proxy_samples);
  check_params(op, x, weight, bias, proxy_bias, proxy_weight);
  return params_as(weight, bias, proxy_bias, proxy_weight,
                   x.options().dtype(accumulation_type(x.scalar_type())));
}

at::Tensor check_proxy_stats(const char* op, const at::Tensor& proxy_stats, const at::Tensor& x) {
  const auto acc = accumulation_type(x.scalar_type());
  TORCH_CHECK(proxy_stats.dim() == 2 && proxy_stats.size(0) == 2 &&
                  proxy_stats.size(1) == x.size(1),
              "fusednorm::", op, ": proxy_stats must have shape (2, C) = (2, ", x.size(1),
              "), got ", proxy_stats.sizes());
  TORCH_CHECK(proxy_stats.scalar_type() == acc, "fusednorm::", op, ": proxy_stats must be ", acc,
              " for ", x.scalar_type(), " input, got ", proxy_stats.scalar_type());
  TORCH_CHECK(proxy_stats.device() == x.device(), "fusednorm::", op, ": proxy_stats is on ",
              proxy_stats.device(), " but x is on ", x.device());
  return proxy_stats.contiguous();
}

ForwardCall prepare_forward(const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias, const std::optional<at::Tensor>& proxy_bias,
                            const std::optional<at::Tensor>& proxy_weight, int64_t num_groups,
                            int64_t activation, double eps, int64_t num_proxy_samples,
                            bool proxy) {
  ForwardCall call;
  call.x = dense_layout(input);
  call.p = check_arguments("forward", call.x, weight, bias, proxy_bias, proxy_weight, num_groups,
                           activation, num_proxy_samples, proxy);
  call.acc_options = call.x.options().dtype(accumulation_type(call.x.scalar_type()));
  call.y = at::empty_like(call.x);
  call.mean = at::empty({call.p.N, call.p.G}, call.acc_options);
  call.rstd = at::empty({call.p.N, call.p.G}, call.acc_options);
  call.empty = call.x.numel() == 0;
  if (call.empty) {
    call.mean.zero_();
    call.rstd.fill_(1.0 / std::sqrt(eps));
    return call;
  }
  call.params = params_as(weight, bias, proxy_bias, proxy_weight, call.acc_options);
  return call;
}

BackwardCall prepare_backward(const at::Tensor& grad_out, const at::Tensor& input,
                              const at::Tensor& weight, const at::Tensor& bias,
                              const std::optional<at::Tensor>& proxy_bias,
                              const std::optional<at::Tensor>& proxy_weight,
                              const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
                              int64_t activation, int64_t num_proxy_samples, bool proxy) {
  BackwardCall call;
  call.x = dense_layout(input);
  call.p = check_arguments("backward", call.x, weight, bias, proxy_bias, proxy_weight,
                           num_groups, activation, num_proxy_samples, proxy);
  TORCH_CHECK(grad_out.sizes() == call.x.sizes(), "fusednorm::backward: grad_out has shape ",
              grad_out.sizes(), " but x has shape ", call.x.sizes());
  TORCH_CHECK(grad_out.device() == call.x.device(), "fusednorm::backward: grad_out is on ",
              grad_out.device(), " but x is on ", call.x.device());
  call.grad = match_layout(grad_out.scalar_type() == call.x.scalar_type()
                               ? grad_out
                               : grad_out.to(call.x.scalar_type()),
                           call.x);
  std::tie(call.mean, call.rstd) = check_statistics(call.x, mean, rstd, num_groups);
  call.acc_options = call.x.options().dtype(accumulation_type(call.x.scalar_type()));
  call.params = params_as(weight, bias, proxy_bias, proxy_weight, call.acc_options);
  call.dx = at::empty_like(call.x);
  return call;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_outputs(
    const at::Tensor& dx, const at::Tensor& grads, const at::Tensor& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& proxy_bias,
    const std::optional<at::Tensor>& proxy_weight) {
  // Op outputs may not alias each other: each row is copied out.
  auto row = [&](int64_t i, const std::optional<at::Tensor>& param) {
    const auto dtype = (param ? *param : weight).scalar_type();
    return grads.select(0, i).to(dtype, /*non_blocking=*/false, /*copy=*/true);
  };
  return {dx, row(0, weight), row(1, bias), row(2, proxy_bias), row(3, proxy_weight)};
}

}  // namespace fusednorm
