// CPU proxy kernels: the per-channel proxy statistics m_c, s_c (docs/pn-math.md, step 5) and the
// proxy terms of the parameter gradients, vectorized across channels: each lane is one channel
// and walks the K samples in order, computing what proxy.h's scalar proxy_moments and
// proxy_backward compute for one channel (the CUDA kernels run those, a thread per channel).
// O(C K) activations per call: at small spatial sizes (7x7 with C = 2048) as many as the data has
// elements, so they run in vectors here, compiled once per instruction set (see vec_utils.h).
#include "vec_utils.h"

namespace fusednorm::cpu::CPU_CAPABILITY {
namespace {

template <typename acc_t>
struct ProxyLanes {
  using Vec = Vectorized<acc_t>;
  Vec w, b, pb, pw;

  ProxyLanes(const ProxyArgs& a, int64_t c0, int64_t lanes)
      : w(Vec::loadu(static_cast<const acc_t*>(a.weight) + c0, lanes)),
        b(Vec::loadu(static_cast<const acc_t*>(a.bias) + c0, lanes)),
        pb(Vec::loadu(static_cast<const acc_t*>(a.proxy_bias) + c0, lanes)),
        pw(Vec::loadu(static_cast<const acc_t*>(a.proxy_weight) + c0, lanes)) {}

  // X_ck = pb + (1 + pw) u_k, and p_ck = w X_ck + b.
  Vec proxy_x(acc_t u) const { return pb + (Vec(acc_t(1)) + pw) * Vec(u); }
  Vec pre_activation(const Vec& x) const { return w * x + b; }
};

// Mean and population variance of P_ck = act(p_ck) over k, two passes (as proxy_moments).
template <int ACT, typename acc_t>
std::pair<Vectorized<acc_t>, Vectorized<acc_t>> moments(const ProxyLanes<acc_t>& lanes,
                                                          const acc_t* u, int64_t K,
                                                          const Vectorized<acc_t>& slope) {
  using Vec = Vectorized<acc_t>;
  Vec total(acc_t(0));
  for (int64_t k = 0; k < K; ++k) {
    total = total + act_value_vec<ACT>(lanes.pre_activation(lanes.proxy_x(u[k])), slope);
  }
  const Vec count(static_cast<acc_t>(K));
  const Vec mean = total / count;
  Vec squares(acc_t(0));
  for (int64_t k = 0; k < K; ++k) {
    const Vec d = act_value_vec<ACT>(lanes.pre_activation(lanes.proxy_x(u[k])), slope) - mean;
    squares = squares + d * d;
  }
  return {mean, squares / count};
}

// f(c0, lanes) for each block of Vec::size() channels starting at c0, as one profiler phase.
template <typename acc_t, typename F>
void for_channel_blocks(const char* phase, int64_t C, const F& f) {
  constexpr int64_t kLanes = Vectorized<acc_t>::size();
  parallel_phase(phase, 0, divup(C, kLanes), 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      f(block * kLanes, std::min<int64_t>(kLanes, C - block * kLanes));
    }
  });
}

template <int ACT, typename acc_t>
void proxy_stats_typed(const ProxyArgs& a) {
  using Vec = Vectorized<acc_t>;
  const acc_t* u = static_cast<const acc_t*>(a.samples);
  const Vec slope(static_cast<acc_t>(a.slope)), eps(static_cast<acc_t>(a.proxy_eps));
  for_channel_blocks<acc_t>("fusednorm_cpu::proxy_statistics", a.C, [&](int64_t c0,
                                                                         int64_t lanes) {
    const auto [mean, var] = moments<ACT>(ProxyLanes<acc_t>(a, c0, lanes), u, a.K, slope);
    mean.store(static_cast<acc_t*>(a.proxy_mean) + c0, lanes);
    (Vec(acc_t(1)) / (var + eps).sqrt()).store(static_cast<acc_t*>(a.proxy_scale) + c0, lanes);
  });
}

// With D_c, E_c (sum_d, sum_e) and the channel's m_c, s_c: dL/dm = -s D, dL/dv = -s^3 (E - m D)/2,
// h_ck = act'(p_ck) (dL/dm + 2 dL/dv (P_ck - m_c)) / K; adds sum_k h X to dweight and sum_k h to
// dbias, writes w sum_k h to dproxy_bias and w sum_k h u_k to dproxy_weight (as proxy_backward).
template <int ACT, typename acc_t>
void proxy_grads_typed(const ProxyArgs& a) {
  using Vec = Vectorized<acc_t>;
  const acc_t* u = static_cast<const acc_t*>(a.samples);
  const Vec slope(static_cast<acc_t>(a.slope)), count(static_cast<acc_t>(a.K));
  for_channel_blocks<acc_t>("fusednorm_cpu::proxy_gradients", a.C, [&](int64_t c0,
                                                                        int64_t lanes) {
    const ProxyLanes<acc_t> ch(a, c0, lanes);
    auto load = [&](const void* p) {
      return Vec::loadu(static_cast<const acc_t*>(p) + c0, lanes);
    };
    const Vec mean = load(a.proxy_mean), scale = load(a.proxy_scale);
    const Vec sum_d = load(a.sum_d), sum_e = load(a.sum_e);
    const Vec grad_mean = Vec(acc_t(0)) - scale * sum_d;
    const Vec grad_var = Vec(acc_t(-0.5)) * scale * scale * scale * (sum_e - mean * sum_d);
    Vec sum_h(acc_t(0)), sum_h_x(acc_t(0)), sum_h_u(acc_t(0));
    for (int64_t k = 0; k < a.K; ++k) {
      const Vec x = ch.proxy_x(u[k]);
      const Vec p = ch.pre_activation(x);
      const Vec centered = act_value_vec<ACT>(p, slope) - mean;
      const Vec h =
          act_grad_vec<ACT>(p, slope) * (grad_mean + Vec(acc_t(2)) * grad_var * centered);
      sum_h = sum_h + h;
      sum_h_x = sum_h_x + h * x;
      sum_h_u = sum_h_u + h * Vec(u[k]);
    }
    acc_t* dweight = static_cast<acc_t*>(a.dweight) + c0;
    acc_t* dbias = static_cast<acc_t*>(a.dbias) + c0;
    (Vec::loadu(dweight, lanes) + sum_h_x / count).store(dweight, lanes);
    (Vec::loadu(dbias, lanes) + sum_h / count).store(dbias, lanes);
    (ch.w * sum_h / count).store(static_cast<acc_t*>(a.dproxy_bias) + c0, lanes);
    (ch.w * sum_h_u / count).store(static_cast<acc_t*>(a.dproxy_weight) + c0, lanes);
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

void proxy_grads(const ProxyArgs& args) {
  dispatch_acc(args, [&](auto act, auto acc) {
    proxy_grads_typed<decltype(act)::value, decltype(acc)>(args);
  });
}

}  // namespace fusednorm::cpu::CPU_CAPABILITY
