#include "proxy.h"

#include <cmath>
#include <map>
#include <mutex>

namespace fusednorm {
namespace {

// erfinv in double: Giles' single-precision approximation refined by Newton steps on std::erf,
// which converge to the last bits (the standard library has no erfinv).
double erfinv(double y) {
  double w = -std::log((1.0 - y) * (1.0 + y));
  double x;
  if (w < 5.0) {
    w -= 2.5;
    x = 2.81022636e-08;
    for (double c : {3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
                     -0.00125372503, -0.00417768164, 0.246640727, 1.50140941}) {
      x = c + x * w;
    }
  } else {
    w = std::sqrt(w) - 3.0;
    x = -0.000200214257;
    for (double c : {0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
                     -0.0076224613, 0.00943887047, 1.00167406, 2.83297682}) {
      x = c + x * w;
    }
  }
  x *= y;
  const double two_over_sqrt_pi = 1.1283791670955126;
  for (int i = 0; i < 4; ++i) {
    x -= (std::erf(x) - y) / (two_over_sqrt_pi * std::exp(-x * x));
  }
  return x;
}

}  // namespace

const std::vector<double>& proxy_samples(int64_t num_samples) {
  static std::mutex mutex;
  static std::map<int64_t, std::vector<double>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(num_samples);
  if (it == cache.end()) {
    std::vector<double> samples(num_samples);
    for (int64_t k = 0; k < num_samples; ++k) {
      samples[k] = std::sqrt(2.0) * erfinv(2.0 * (k + 0.5) / num_samples - 1.0);
    }
    it = cache.emplace(num_samples, std::move(samples)).first;
  }
  // std::map never moves its elements: the reference stays valid after the lock is released.
  return it->second;
}

}  // namespace fusednorm
