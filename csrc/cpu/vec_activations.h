// The activations of ../activations.h on at::vec::Vectorized<float/double>: the same formulas,
// one vector at a time. Used by forward.cpp and backward.cpp (compiled per instruction set).
// Comparisons yield 0/1 values (gt) rather than masks for blendv: the generic (DEFAULT)
// Vectorized builds masks and blends with a branch per lane, which mispredicts on signs.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "../activations.h"

namespace fusednorm::cpu {

template <int ACT, typename Vec>
inline Vec act_value_vec(const Vec& z, const Vec& slope) {
  using T = typename Vec::value_type;
  const Vec zero(T(0)), one(T(1));
  if constexpr (ACT == kRelu) {
    return at::vec::clamp_min(z, zero);  // NaN stays NaN (one max instruction on AVX)
  } else if constexpr (ACT == kSilu) {
    return z / (one + z.neg().exp());  // as ATen's silu: one division, no reciprocal
  } else if constexpr (ACT == kGelu) {
    return Vec(T(0.5)) * z * (one + (z * Vec(T(kInvSqrt2))).erf());
  } else if constexpr (ACT == kGeluTanh) {
    const Vec inner = Vec(T(kSqrt2OverPi)) * (z + Vec(T(kGeluTanhC)) * z * z * z);
    return Vec(T(0.5)) * z * (one + inner.tanh());
  } else if constexpr (ACT == kLeakyRelu) {
    // Exactly z or slope * z (one of the terms is 0), NaN stays NaN.
    return at::vec::clamp_min(z, zero) + slope * at::vec::clamp_max(z, zero);
  } else {
    return z;
  }
}

// Whether act(z) = z * act'(z) for every z (piecewise linear through 0): then, for
// z = a1 (x - mean) + beta, sum g act(z) = a1 * sum g act'(z) (x - mean) + beta * sum g act'(z),
// and a backward need not accumulate it.
template <int ACT>
constexpr bool kActIsHomogeneous = ACT == kIdentity || ACT == kRelu || ACT == kLeakyRelu;

template <int ACT, typename Vec>
inline Vec act_grad_vec(const Vec& z, const Vec& slope) {
  using T = typename Vec::value_type;
  const Vec zero(T(0)), one(T(1));
  if constexpr (ACT == kRelu) {
    return z.gt(zero);  // 1 where z > 0, else 0 (NaN included)
  } else if constexpr (ACT == kSilu) {
    const Vec sig = one / (one + z.neg().exp());
    return sig * (one + z * (one - sig));
  } else if constexpr (ACT == kGelu) {
    const Vec cdf = Vec(T(0.5)) * (one + (z * Vec(T(kInvSqrt2))).erf());
    return cdf + z * (Vec(T(-0.5)) * z * z).exp() * Vec(T(kInvSqrt2Pi));
  } else if constexpr (ACT == kGeluTanh) {
    const Vec t = (Vec(T(kSqrt2OverPi)) * (z + Vec(T(kGeluTanhC)) * z * z * z)).tanh();
    const Vec inner_grad = Vec(T(kSqrt2OverPi)) * (one + Vec(T(3 * kGeluTanhC)) * z * z);
    return Vec(T(0.5)) * (one + t) + Vec(T(0.5)) * z * (one - t * t) * inner_grad;
  } else if constexpr (ACT == kLeakyRelu) {
    const Vec positive = z.gt(zero);
    return positive + slope * (one - positive);  // exactly 1 or slope
  } else {
    return one;
  }
}

// g * act'(z), the gradient at the activation's input. For ReLU, g where z > 0 and 0 elsewhere
// (NaN z included) whatever g is, as torch's threshold_backward (a multiply by 0 would turn an
// infinite g into NaN): a compare and an and, on AVX-512 one compare and a masked move instead of
// the compare, mask-to-vector, and, multiply of g * act_grad_vec (the backward's loops at 7x7
// are compute-bound).
template <int ACT, typename Vec>
inline Vec act_grad_times(const Vec& z, const Vec& g, const Vec& slope) {
  if constexpr (ACT == kRelu) {
    using T = typename Vec::value_type;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GT_OQ), g);
    } else {
      return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(z, _mm512_setzero_pd(), _CMP_GT_OQ), g);
    }
#elif defined(CPU_CAPABILITY_AVX2)
    return g & (z > Vec(T(0)));  // comparisons give all-ones lanes: g's bits or +0
#else
    // The generic Vectorized compares with a branch per lane: a loop the compiler vectorizes.
    alignas(64) T gz[Vec::size()], zz[Vec::size()];
    g.store(gz);
    z.store(zz);
    for (int64_t i = 0; i < Vec::size(); ++i) gz[i] = zz[i] > T(0) ? gz[i] : T(0);
    return Vec::loadu(gz);
#endif
  } else {
    return g * act_grad_vec<ACT>(z, slope);
  }
}

}  // namespace fusednorm::cpu
