// A Welford state and Chan's merge, one definition for the CPU kernels (host) and the CUDA
// kernels (device).
#pragma once

#include <c10/macros/Macros.h>

namespace fusednorm {

// Element count, mean, and sum of squared deviations from the mean. Plain data (no
// constructor), so that it can live in CUDA shared memory: initialize it as {0, 0, 0}.
// count_t is int64_t on the CPU (exact for any group size), acc_t on the GPU (warp shuffles
// move floats).
template <typename acc_t, typename count_t = acc_t>
struct Welford {
  count_t count;
  acc_t mean;
  acc_t m2;
};

// Chan's merge of two states: exact for any split of the data, and stable for offset data
// (mean 1e4, std 1), unlike sums of squares.
template <typename acc_t, typename count_t>
C10_HOST_DEVICE inline Welford<acc_t, count_t> welford_merge(const Welford<acc_t, count_t>& a,
                                                             const Welford<acc_t, count_t>& b) {
  const count_t count = a.count + b.count;
  if (count == count_t(0)) return a;
  const acc_t weight_b = static_cast<acc_t>(b.count) / static_cast<acc_t>(count);
  const acc_t delta = b.mean - a.mean;
  return {count, a.mean + delta * weight_b,
          a.m2 + b.m2 + delta * delta * static_cast<acc_t>(a.count) * weight_b};
}

}  // namespace fusednorm
