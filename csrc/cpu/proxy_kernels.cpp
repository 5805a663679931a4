// CPU per-channel kernels: the proxy statistics m_c, s_c (docs/pn-math.md, step 5) and the
// parameter gradients (the backward's partials reduced over n, plus the proxy terms), vectorized
// across channels: each lane is one channel and walks the K samples in order, computing what
// proxy.h's scalar proxy_moments and proxy_backward compute for one channel (the CUDA kernels run
// those, a thread per channel). O(C K) activations per call: at small spatial sizes (7x7 with
// C = 2048) as many as the data has elements, so they run in vectors here, compiled once per
// instruction set (see vec_utils.h).
#include "vec_utils.h"

#include <array>
#include <utility>

namespace fusednorm::cpu::FUSEDNORM_KERNELS {
namespace {

template <typename acc_t>
struct ProxyLanes {
  using Vec = Vectorized<acc_t>;
  Vec w, b, pb, pw;

  ProxyLanes(const ProxyArgs& a, int64_t c0, int64_t lanes)
      : w(load(a.weight, c0, lanes)), b(load(a.bias, c0, lanes)),
        pb(load(a.proxy_bias, c0, lanes)), pw(load(a.proxy_weight, c0, lanes)) {}

  // Channels [c0, c0 + lanes) of a (C,) parameter; zeros for an absent (nullptr) one.
  static Vec load(const void* param, int64_t c0, int64_t lanes) {
    return param ? Vec::loadu(static_cast<const acc_t*>(param) + c0, lanes) : Vec(acc_t(0));
  }

  // X_ck = pb + (1 + pw) u_k, and p_ck = w X_ck + b.
  Vec proxy_x(acc_t u) const { return pb + (Vec(acc_t(1)) + pw) * Vec(u); }
  Vec pre_activation(const Vec& x) const { return w * x + b; }
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
                 act_value_vec<ACT>(lanes[j].pre_activation(lanes[j].proxy_x(u[k])), slope);
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
          act_value_vec<ACT>(lanes[j].pre_activation(lanes[j].proxy_x(u[k])), slope) - mean[j];
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
    Vec mean[kBlocks], grad_mean[kBlocks], grad_var[kBlocks];
    Vec sum_h[kBlocks], sum_h_x[kBlocks], sum_h_u[kBlocks];
    for (int j = 0; j < kBlocks; ++j) {
      const Vec scale = Vec::loadu(static_cast<const acc_t*>(a.proxy_scale) + c0[j], lanes[j]);
      const Vec sum_d = sums[j][2], sum_e = sums[j][3];
      mean[j] = Vec::loadu(static_cast<const acc_t*>(a.proxy_mean) + c0[j], lanes[j]);
      grad_mean[j] = Vec(acc_t(0)) - scale * sum_d;
      grad_var[j] = Vec(acc_t(-0.5)) * scale * scale * scale * (sum_e - mean[j] * sum_d);
      sum_h[j] = sum_h_x[j] = sum_h_u[j] = Vec(acc_t(0));
    }
    for (int64_t k = 0; k < a.K; ++k) {
      for (int j = 0; j < kBlocks; ++j) {
        const Vec x = channels[j].proxy_x(u[k]);
        const Vec p = channels[j].pre_activation(x);
        const Vec centered = act_value_vec<ACT>(p, slope) - mean[j];
        const Vec h = act_grad_vec<ACT>(p, slope) *
                      (grad_mean[j] + Vec(acc_t(2)) * grad_var[j] * centered);
        sum_h[j] = sum_h[j] + h;
        sum_h_x[j] = sum_h_x[j] + h * x;
        sum_h_u[j] = sum_h_u[j] + h * Vec(u[k]);
      }
    }
    for (int j = 0; j < kBlocks && lanes[j] > 0; ++j) {
      store(a.dweight, j, sums[j][1] + sum_h_x[j] / count);
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
