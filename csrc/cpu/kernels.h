// The CPU kernels' entry points. forward.cpp and backward.cpp are compiled once per instruction
// set (DEFAULT, and AVX2/AVX512 on x86-64 when setup.py builds them), each copy in its own
// namespace; fusednorm_cpu.cpp picks one at run time, like ATen's DispatchStub.
//
// Tensors are passed as raw pointers: x, y, grad and dx in the input dtype, everything else in
// the accumulation dtype acc_t (double for double input, float otherwise). The input is viewed
// as (N, C, S): memory (N, C, S) or, when channels_last, (N, S, C).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fusednorm::cpu {

enum class Dtype { kFloat, kDouble, kHalf, kBFloat16 };

// What both directions are given about the problem.
struct ProblemArgs {
  Dtype dtype;
  int64_t N, C, S, G;
  bool channels_last;
  int64_t activation;
  double slope;
};

struct ForwardArgs : ProblemArgs {
  double eps;
  const void* x;
  void* y;
  const void* weight;       // (C,) gamma
  const void* bias;         // (C,) beta
  const void* proxy_mean;   // (C,) m_c, or nullptr: Proxy Normalization off
  const void* proxy_scale;  // (C,) s_c, or nullptr
  void* mean;               // out (N, G)
  void* rstd;               // out (N, G)
};

struct BackwardArgs : ProblemArgs {
  const void* grad;         // dL/dy, in x's layout
  const void* x;
  void* dx;                 // out, in x's layout
  const void* mean;         // (N, G)
  const void* rstd;         // (N, G)
  const void* weight;       // (C,) gamma
  const void* bias;         // (C,) beta
  const void* proxy_scale;  // (C,) s_c, or nullptr: Proxy Normalization off
  void* partials;           // out (N, 4, C): planes sum_s g_z, g_z*xhat, g, g*a (the last two
                            // with PN; zeros without)
};

// The per-channel computations (proxy_kernels.cpp), in the accumulation dtype. proxy_stats reads
// the parameters and samples and writes proxy_mean/proxy_scale.
struct ProxyArgs {
  bool is_double;  // double (fp64 input), else float
  int64_t C, K, activation;
  double slope, proxy_eps;
  const void* weight;        // (C,) gamma
  const void* bias;          // (C,) beta
  const void* proxy_bias;    // (C,) beta~, or nullptr: zeros
  const void* proxy_weight;  // (C,) gamma~, or nullptr: zeros
  const void* samples;       // (K,) u_k (PN only)
  void* proxy_mean;          // (C,) m_c: out of proxy_stats, in to parameter_grads (PN only)
  void* proxy_scale;         // (C,) s_c: likewise
};

// parameter_grads: the partials reduced over n in order, plus with PN the proxy terms:
// dweight = sum B (+ sum_k h X), dbias = sum A (+ sum_k h), dproxy_* from the proxy terms (zeros
// for an absent parameter, or without PN).
struct ParameterArgs : ProxyArgs {
  int64_t N;
  bool proxy;
  const void* partials;  // (N, 4, C) of the backward kernel
  void* dweight;         // out (C,)
  void* dbias;           // out (C,)
  void* dproxy_bias;     // out (C,)
  void* dproxy_weight;   // out (C,)
};

#define FUSEDNORM_DECLARE_CPU_KERNELS(CAPABILITY)  \
  namespace CAPABILITY {                           \
  void forward(const ForwardArgs& args);           \
  void backward(const BackwardArgs& args);         \
  void proxy_stats(const ProxyArgs& args);         \
  void parameter_grads(const ParameterArgs& args); \
  }

FUSEDNORM_DECLARE_CPU_KERNELS(DEFAULT)
FUSEDNORM_DECLARE_CPU_KERNELS(AVX2)
FUSEDNORM_DECLARE_CPU_KERNELS(AVX512)
FUSEDNORM_DECLARE_CPU_KERNELS(AVX512_BF16)

#undef FUSEDNORM_DECLARE_CPU_KERNELS

}  // namespace fusednorm::cpu

namespace fusednorm::cpu {
// The instruction set of the kernels in use ("DEFAULT", "AVX2", "AVX512" or "AVX512_BF16"): the
// best one built that ATen's own capability allows (so ATEN_CPU_CAPABILITY=default selects
// DEFAULT); AVX512_BF16 where ATen uses AVX512 and the CPU has AVX512-BF16, unless
// FUSEDNORM_NO_AVX512_BF16=1.
const char* kernel_capability();
// The copies of the kernels in this build (setup.py: FUSEDNORM_CPU_KERNEL_COPIES).
std::vector<std::string> built_capabilities();
}  // namespace fusednorm::cpu
