// Activation ids and formulas shared by the CPU and CUDA kernels.
//
// The ids are those of the table in fusednorm/activations.py; tests/test_activations.py checks
// them through fusednorm._C.activation_ids. The slope is used by leaky_relu only.
// The scalar forms below run on the host and on the device; the CPU kernels' vector forms live
// in cpu/vec_activations.h and follow the same formulas.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace fusednorm {

enum ActivationId : int64_t {
  kIdentity = 0,
  kRelu = 1,
  kSilu = 2,
  kGelu = 3,
  kGeluTanh = 4,
  kLeakyRelu = 5,
  kNumActivations = 6,
};

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;
constexpr double kGeluTanhC = 0.044715;

namespace math {
// The C functions (expf/erff/tanhf and their double forms) exist on the host and in CUDA
// device code alike, unlike std::.
template <typename T>
C10_HOST_DEVICE inline T exp(T v) {
  if constexpr (std::is_same_v<T, float>) return ::expf(v); else return ::exp(v);
}
template <typename T>
C10_HOST_DEVICE inline T erf(T v) {
  if constexpr (std::is_same_v<T, float>) return ::erff(v); else return ::erf(v);
}
template <typename T>
C10_HOST_DEVICE inline T sqrt(T v) {
  if constexpr (std::is_same_v<T, float>) return ::sqrtf(v); else return ::sqrt(v);
}
template <typename T>
C10_HOST_DEVICE inline T tanh(T v) {
  if constexpr (std::is_same_v<T, float>) return ::tanhf(v); else return ::tanh(v);
}
}  // namespace math

template <int ACT, typename T>
C10_HOST_DEVICE inline T act_value(T z, T slope) {
  if constexpr (ACT == kRelu) {
    return z < T(0) ? T(0) : z;  // not max(z, 0): NaN stays NaN
  } else if constexpr (ACT == kSilu) {
    return z * (T(1) / (T(1) + math::exp(-z)));
  } else if constexpr (ACT == kGelu) {
    return T(0.5) * z * (T(1) + math::erf(z * T(kInvSqrt2)));
  } else if constexpr (ACT == kGeluTanh) {
    return T(0.5) * z * (T(1) + math::tanh(T(kSqrt2OverPi) * (z + T(kGeluTanhC) * z * z * z)));
  } else if constexpr (ACT == kLeakyRelu) {
    return z > T(0) ? z : z * slope;
  } else {
    return z;
  }
}

template <int ACT, typename T>
C10_HOST_DEVICE inline T act_grad(T z, T slope) {
  if constexpr (ACT == kRelu) {
    return z > T(0) ? T(1) : T(0);
  } else if constexpr (ACT == kSilu) {
    T sig = T(1) / (T(1) + math::exp(-z));
    return sig * (T(1) + z * (T(1) - sig));
  } else if constexpr (ACT == kGelu) {
    T cdf = T(0.5) * (T(1) + math::erf(z * T(kInvSqrt2)));
    return cdf + z * math::exp(T(-0.5) * z * z) * T(kInvSqrt2Pi);
  } else if constexpr (ACT == kGeluTanh) {
    T t = math::tanh(T(kSqrt2OverPi) * (z + T(kGeluTanhC) * z * z * z));
    T inner_grad = T(kSqrt2OverPi) * (T(1) + T(3 * kGeluTanhC) * z * z);
    return T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * inner_grad;
  } else if constexpr (ACT == kLeakyRelu) {
    return z > T(0) ? T(1) : slope;
  } else {
    return T(1);
  }
}

}  // namespace fusednorm

// Runs the trailing lambda with `constexpr int kAct` set to the activation id `ID`.
#define FUSEDNORM_ACT_CASE(ID, ...) \
  case ID: {                        \
    constexpr int kAct = ID;        \
    return __VA_ARGS__();           \
  }

#define FUSEDNORM_DISPATCH_ACTIVATION(ID, ...)                                   \
  [&] {                                                                          \
    switch (ID) {                                                                \
      FUSEDNORM_ACT_CASE(fusednorm::kIdentity, __VA_ARGS__)                      \
      FUSEDNORM_ACT_CASE(fusednorm::kRelu, __VA_ARGS__)                          \
      FUSEDNORM_ACT_CASE(fusednorm::kSilu, __VA_ARGS__)                          \
      FUSEDNORM_ACT_CASE(fusednorm::kGelu, __VA_ARGS__)                          \
      FUSEDNORM_ACT_CASE(fusednorm::kGeluTanh, __VA_ARGS__)                      \
      FUSEDNORM_ACT_CASE(fusednorm::kLeakyRelu, __VA_ARGS__)                     \
      default:                                                                   \
        TORCH_CHECK(false, "fusednorm: unknown activation id ", ID,              \
                    " (see fusednorm/activations.py)");                          \
    }                                                                            \
  }()
