// CPU per-channel kernels: the proxy statistics m_c, s_c (docs/pn-math.md, step 5) and the
// parameter gradients (the backward's partials reduced over n, plus the proxy terms), vectorized
// across channels: each lane is one channel and walks the K samples in order, computing what
// proxy.h's scalar proxy_moments and proxy_backward compute for one channel (the CUDA kernels run
// those, a thread per channel), with the pre-activation folded into one FMA per sample (the
// roundings differ from proxy.h's by an ulp or so). O(C K) activations per call: at small
// spatial sizes (7x7 with C = 2048) as many as the data has elements, so they run in vectors
// here, compiled once per instruction set (see vec_utils.h).
#include "vec_utils.h"

#include <array>
#include <utility>

namespace fusednorm::cpu::FUSEDNORM_KERNELS {
namespace {

// The parameters of Vec::size() channels, and the proxy's pre-activation as one affine map of
// the sample: p_ck = w (pb + (1 + pw) u_k) + b = (w (1 + pw)) u_k + (w pb + b), one FMA per
// sample where the two steps took four operations; sum_k h X_ck follows from sum_k h and
// sum_k h u_k. The per-sample loops are ~all the work here: at 8x2048x7x7 (AVX2 bf16, 2
// threads) the proxy statistics took 0.04 -> 0.03 ms and the parameter gradients 0.05 -> 0.04
// ms of a 0.9 ms forward+backward (tools/cpu_phases.py).
template <typename acc_t>
struct ProxyLanes {
  using Vec = Vectorized<acc_t>;
  Vec w, b, pb, pw, u_scale, u_offset;

  ProxyLanes(const ProxyArgs& a, int64_t c0, int64_t lanes)
      : w(load(a.weight, c0, lanes)), b(load(a.bias, c0, lanes)),
        pb(load(a.proxy_bias, c0, lanes)), pw(load(a.proxy_weight, c0, lanes)),
        u_scale(w * (Vec(acc_t(1)) + pw)), u_offset(at::vec::fmadd(w, pb, b)) {}

  // Channels [c0, c0 + lanes) of a (C,) parameter; zeros for an absent (nullptr) one.
  static Vec load(const void* param, int64_t c0, int64_t lanes) {
    return param ? Vec::loadu(static_cast<const acc_t*>(param) + c0, lanes) : Vec(acc_t(0));
  }

  // p_ck = w X_ck + b with X_ck = pb + (1 + pw) u_k.
  Vec pre_activation(acc_t u) const { return at::vec::fmadd(u_scale, Vec(u), u_offset); }
};

// Channel blocks handled together: each lane's sums over k are chains of dependent adds, so
// kBlocks independent blocks keep the adder busy (latency-bound otherwise: ~3x slower). Every
// channel still sums its own k in order.
constexpr int kBlocks = 4;

// Mean and population variance of P_ck = act(p_ck) over k, two passes (as proxy_moments), for
// kBlocks blocks of channels.
template <int ACT, typename acc_t>
void moments(const ProxyLanes<acc_t>* lanes, const acc_t* u, int64_t K,
             const Vectorized<acc_t>& slope, Vectorized<acc_t>* mean, Vectorized<acc_t>* var) {
  using Vec = Vectorized<acc_t>;
  Vec total[kBlocks];
  for (int j = 0; j < kBlocks; ++j) total[j] = Vec(acc_t(0));
  for (int64_t k = 0; k < K; ++k) {
    for (int j = 0; j < kBlocks; ++j) {
      total[j] = total[j] +
                 act_value_vec<ACT>(lanes[j].pre_activation(u[k]), slope);
    }
  }
  const Vec count(static_cast<acc_t>(K));
  Vec squares[kBlocks];
  for (int j = 0; j < kBlocks; ++j) {
    mean[j] = total[j] / count;
    squares[j] = Vec(acc_t(0));
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int j = 0; j < kBlocks; ++j) {
      const Vec d =
          act_value_vec<ACT>(lanes[j].pre_activation(u[k]), slope) - mean[j];
      squares[j] = squares[j] + d * d;
    }
  }
  for (int j = 0; j < kBlocks; ++j) var[j] = squares[j] / count;
}

template <typename acc_t, size_t... J>
std::array<ProxyLanes<acc_t>, kBlocks> channel_blocks(const ProxyArgs& a, const int64_t* c0,
                                                      const int64_t* lanes,
                                                      std::index_sequence<J...>) {
  return {ProxyLanes<acc_t>(a, c0[J], lanes[J])...};
}

// f(channels, c0, lanes) for kBlocks blocks of Vec::size() channels: block j starts at channel
// c0[j], has lanes[j] channels that exist (0 past C) and their parameters in channels[j]. One
// profiler phase; `work` per channel (in elements) decides how many threads it is worth.
template <typename acc_t, typename F>
void for_channel_blocks(const char* phase, const ProxyArgs& a, int64_t work, const F& f) {
  constexpr int64_t kLanes = Vectorized<acc_t>::size();
  parallel_phase(phase, 0, divup(a.C, kBlocks * kLanes), grain_for(work * kBlocks * kLanes),
                 [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      int64_t c0[kBlocks], lanes[kBlocks];
      for (int j = 0; j < kBlocks; ++j) {
        c0[j] = std::min(a.C, (group * kBlocks + j) * kLanes);
        lanes[j] = std::min<int64_t>(kLanes, a.C - c0[j]);
      }
      const auto channels =
          channel_blocks<acc_t>(a, c0, lanes, std::make_index_sequence<kBlocks>{});
      f(channels.data(), c0, lanes);
    }
  });
}

template <int ACT, typename acc_t>
void proxy_stats_typed(const ProxyArgs& a) {
  using Vec = Vectorized<acc_t>;
  const acc_t* u = static_cast<const acc_t*>(a.samples);
  const Vec slope(static_cast<acc_t>(a.slope)), eps(static_cast<acc_t>(a.proxy_eps));
  for_channel_blocks<acc_t>("fusednorm_cpu::proxy_statistics", a, 2 * a.K, [&](
      const ProxyLanes<acc_t>* channels, const int64_t* c0, const int64_t* lanes) {
    Vec mean[kBlocks], var[kBlocks];
    moments<ACT>(channels, u, a.K, slope, mean, var);
    for (int j = 0; j < kBlocks; ++j) {
      if (lanes[j] == 0) break;
      mean[j].store(static_cast<acc_t*>(a.proxy_mean) + c0[j], lanes[j]);
      (Vec(acc_t(1)) / (var[j] + eps).sqrt())
          .store(static_cast<acc_t*>(a.proxy_scale) + c0[j], lanes[j]);
    }
  });
}

// Sums over n, in order, of the (N, 4, C) partials of channels [c0, c0 + lanes): A, B, D, E.
template <typename acc_t>
std::array<Vectorized<acc_t>, 4> partial_sums(const ParameterArgs& a, int64_t c0, int64_t lanes) {
  using Vec = Vectorized<acc_t>;
  const acc_t* partials = static_cast<const acc_t*>(a.partials);
  std::array<Vec, 4> sums;
  sums.fill(Vec(acc_t(0)));
  for (int64_t n = 0; n < a.N; ++n) {
    for (int i = 0; i < 4; ++i) {
      sums[i] = sums[i] + Vec::loadu(partials + (n * 4 + i) * a.C + c0, lanes);
    }
  }
  return sums;
}

// dgamma = sum B and dbeta = sum A; with PN, given D_c, E_c (sum D, sum E) and the channel's m_c,
// s_c: dL/dm = -s D, dL/dv = -s^3 (E - m D)/2, h_ck = act'(p_ck) (dL/dm + 2 dL/dv (P_ck - m_c)) / K;
// adds sum_k h X to dgamma and sum_k h to dbeta, and writes w sum_k h to dbeta~ and
// w sum_k h u_k to dgamma~ (as proxy_backward; zeros for an absent proxy parameter).
template <int ACT, bool PROXY, typename acc_t>
void parameter_grads_typed(const ParameterArgs& a) {
  using Vec = Vectorized<acc_t>;
  const acc_t* u = static_cast<const acc_t*>(a.samples);
  const Vec slope(static_cast<acc_t>(a.slope)), count(static_cast<acc_t>(a.K));
  const int64_t work = PROXY ? 3 * a.K + 4 * a.N : 4 * a.N;
  for_channel_blocks<acc_t>("fusednorm_cpu::parameter_gradients", a, work, [&](
      const ProxyLanes<acc_t>* channels, const int64_t* c0, const int64_t* lanes) {
    std::array<Vec, 4> sums[kBlocks];
    for (int j = 0; j < kBlocks; ++j) sums[j] = partial_sums<acc_t>(a, c0[j], lanes[j]);
    auto store = [&](void* out, int j, const Vec& v) {
      v.store(static_cast<acc_t*>(out) + c0[j], lanes[j]);
    };
    auto store_proxy = [&](void* out, const void* param, int j, const Vec& v) {
      store(out, j, param ? v : Vec(acc_t(0)));
    };
    if constexpr (!PROXY) {
      for (int j = 0; j < kBlocks && lanes[j] > 0; ++j) {
        store(a.dweight, j, sums[j][1]);
        store(a.dbias, j, sums[j][0]);
        store(a.dproxy_bias, j, Vec(acc_t(0)));
        store(a.dproxy_weight, j, Vec(acc_t(0)));
      }
      return;
    }
    Vec mean[kBlocks], grad_mean[kBlocks], two_grad_var[kBlocks];  // 2 dL/dv
    Vec sum_h[kBlocks], sum_h_u[kBlocks];
    for (int j = 0; j < kBlocks; ++j) {
      const Vec scale = Vec::loadu(static_cast<const acc_t*>(a.proxy_scale) + c0[j], lanes[j]);
      const Vec sum_d = sums[j][2], sum_e = sums[j][3];
      mean[j] = Vec::loadu(static_cast<const acc_t*>(a.proxy_mean) + c0[j], lanes[j]);
      grad_mean[j] = Vec(acc_t(0)) - scale * sum_d;
      two_grad_var[j] = Vec(acc_t(-1)) * scale * scale * scale * (sum_e - mean[j] * sum_d);
      sum_h[j] = sum_h_u[j] = Vec(acc_t(0));
    }
    for (int64_t k = 0; k < a.K; ++k) {
      for (int j = 0; j < kBlocks; ++j) {
        const Vec p = channels[j].pre_activation(u[k]);
        const Vec centered = act_value_vec<ACT>(p, slope) - mean[j];
        const Vec h = act_grad_vec<ACT>(p, slope) * at::vec::fmadd(two_grad_var[j], centered,
                                                                   grad_mean[j]);
        sum_h[j] = sum_h[j] + h;
        sum_h_u[j] = at::vec::fmadd(h, Vec(u[k]), sum_h_u[j]);
      }
    }
    for (int j = 0; j < kBlocks && lanes[j] > 0; ++j) {
      // sum_k h X_ck = pb sum_k h + (1 + pw) sum_k h u_k.
      const Vec sum_h_x =
          at::vec::fmadd(channels[j].pb, sum_h[j], (Vec(acc_t(1)) + channels[j].pw) * sum_h_u[j]);
      store(a.dweight, j, sums[j][1] + sum_h_x / count);
      store(a.dbias, j, sums[j][0] + sum_h[j] / count);
      store_proxy(a.dproxy_bias, a.proxy_bias, j, channels[j].w * sum_h[j] / count);
      store_proxy(a.dproxy_weight, a.proxy_weight, j, channels[j].w * sum_h_u[j] / count);
    }
  });
}

template <typename F>
void dispatch_acc(const ProxyArgs& a, const F& f) {
  FUSEDNORM_DISPATCH_ACTIVATION(a.activation, [&] {
    if (a.is_double) {
      f(std::integral_constant<int, kAct>{}, double{});
    } else {
      f(std::integral_constant<int, kAct>{}, float{});
    }
  });
}

}  // namespace

void proxy_stats(const ProxyArgs& args) {
  dispatch_acc(args, [&](auto act, auto acc) {
    proxy_stats_typed<decltype(act)::value, decltype(acc)>(args);
  });
}

void parameter_grads(const ParameterArgs& args) {
  dispatch_acc(args, [&](auto act, auto acc) {
    if (args.proxy) {
      parameter_grads_typed<decltype(act)::value, true, decltype(acc)>(args);
    } else {
      parameter_grads_typed<decltype(act)::value, false, decltype(acc)>(args);
    }
  });
}

}  // namespace fusednorm::cpu::FUSEDNORM_KERNELS
