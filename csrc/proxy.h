// Proxy Normalization's per-channel math (docs/pn-math.md, steps 4-5 and the proxy gradients),
// shared by the CPU and CUDA backends: one call handles one channel, on the host or the device.
// The samples u come from proxy_samples (common.h).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "activations.h"

namespace fusednorm {

// Proxy mean m_c and population variance v_c of P_ck = act(w X_ck + b),
// X_ck = pb + (1 + pw) u_k. Two passes over the samples, like the Triton kernel.
template <int ACT, typename T>
C10_HOST_DEVICE inline void proxy_moments(T w, T b, T pb, T pw, const T* u, int64_t K, T slope,
                                          T& mean, T& var) {
  T total = 0;
  for (int64_t k = 0; k < K; ++k) {
    total += act_value<ACT>(w * (pb + (T(1) + pw) * u[k]) + b, slope);
  }
  mean = total / T(K);
  T squares = 0;
  for (int64_t k = 0; k < K; ++k) {
    T d = act_value<ACT>(w * (pb + (T(1) + pw) * u[k]) + b, slope) - mean;
    squares += d * d;
  }
  var = squares / T(K);
}

// Gradients through the proxy statistics of one channel, given D_c = sum_ns g and
// E_c = sum_ns g * a. Adds sum_k h_ck X_ck to dw and sum_k h_ck to db; sets dpb, dpw.
template <int ACT, typename T>
C10_HOST_DEVICE inline void proxy_backward(T w, T b, T pb, T pw, const T* u, int64_t K, T slope,
                                           T proxy_eps, T sum_d, T sum_e, T& dw, T& db, T& dpb,
                                           T& dpw) {
  T mean, var;
  proxy_moments<ACT>(w, b, pb, pw, u, K, slope, mean, var);
  T scale = T(1) / math::sqrt(var + proxy_eps);
  T grad_mean = -scale * sum_d;
  T grad_var = T(-0.5) * scale * scale * scale * (sum_e - mean * sum_d);
  T sum_h = 0, sum_h_x = 0, sum_h_u = 0;
  for (int64_t k = 0; k < K; ++k) {
    T proxy_x = pb + (T(1) + pw) * u[k];
    T p = w * proxy_x + b;
    const T centered = act_value<ACT>(p, slope) - mean;
    T h = act_grad<ACT>(p, slope) * (grad_mean + T(2) * grad_var * centered);
    sum_h += h;
    sum_h_x += h * proxy_x;
    sum_h_u += h * u[k];
  }
  dw += sum_h_x / T(K);
  db += sum_h / T(K);
  dpb = w * sum_h / T(K);
  dpw = w * sum_h_u / T(K);
}

}  // namespace fusednorm
