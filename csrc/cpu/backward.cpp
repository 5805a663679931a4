// CPU backward kernel: per-(n, c) partial sums (sum g_z, g_z * xhat, g, g * a), per-(n, g)
// sums SA, SB, then dx = rstd * (gamma_c g_z - SA/M - xhat SB/M) (docs/pn-math.md). The parameter
// gradients are finished from the partials in fusednorm_cpu.cpp. Compiled once per instruction
// set (see vec_utils.h).
//
// Contiguous input: per row (n, c), in fixed 4096-element pieces; one task per group does both
// passes when the groups keep every thread busy (the second pass then reads L2), else the
// passes run one after the other over rows: the same sums either way. Channels-last input: row
// tasks of one n with per-channel accumulators, reduced over tasks in a fixed order.
#include "vec_utils.h"

#include <array>
#include <utility>
#include <vector>

namespace fusednorm::cpu::CPU_CAPABILITY {
namespace {

template <typename scalar_t>
struct BackwardContext {
  using acc_t = acc_type<scalar_t>;
  int64_t N, C, S, G, CPG;
  acc_t slope;
  const scalar_t* grad;
  const scalar_t* x;
  scalar_t* dx;
  const acc_t* mean;
  const acc_t* rstd;
  const acc_t* weight;
  const acc_t* bias;
  const acc_t* proxy_scale;  // nullptr: PN off
  acc_t* partials;           // (N, C, 4)

  explicit BackwardContext(const BackwardArgs& a)
      : N(a.N), C(a.C), S(a.S), G(a.G), CPG(a.C / a.G), slope(static_cast<acc_t>(a.slope)),
        grad(static_cast<const scalar_t*>(a.grad)), x(static_cast<const scalar_t*>(a.x)),
        dx(static_cast<scalar_t*>(a.dx)), mean(static_cast<const acc_t*>(a.mean)),
        rstd(static_cast<const acc_t*>(a.rstd)), weight(static_cast<const acc_t*>(a.weight)),
        bias(static_cast<const acc_t*>(a.bias)),
        proxy_scale(static_cast<const acc_t*>(a.proxy_scale)),
        partials(static_cast<acc_t*>(a.partials)) {}

  acc_t out_scale(int64_t c) const { return proxy_scale ? proxy_scale[c] : acc_t(1); }

  // Partials of row (n, c) from the raw sums sum g*act', sum g*act'*(x - mean), sum g, sum g*a:
  // A = s_c * sum g*act', B = s_c * rstd * sum g*act'*(x - mean) (= sum g_z * xhat).
  void store_partials(int64_t n, int64_t c, acc_t gp, acc_t gpd, acc_t g, acc_t ga) const {
    const acc_t scale = out_scale(c);
    acc_t* out = partials + (n * C + c) * 4;
    out[0] = scale * gp;
    out[1] = scale * rstd[n * G + c / CPG] * gpd;
    out[2] = g;
    out[3] = ga;
  }

  // SA = sum_{c in g} gamma_c A_nc, SB likewise with B, in channel order.
  std::pair<acc_t, acc_t> group_sums(int64_t ng) const {
    const int64_t n = ng / G, g = ng % G;
    acc_t sa = 0, sb = 0;
    for (int64_t c = g * CPG; c < (g + 1) * CPG; ++c) {
      sa += weight[c] * partials[(n * C + c) * 4];
      sb += weight[c] * partials[(n * C + c) * 4 + 1];
    }
    return {sa, sb};
  }

  // dx = k1 * g * act'(z) + k2 * (x - mean) + k3, i.e. rstd * (gamma g_z - SA/M - xhat SB/M).
  std::array<acc_t, 3> dx_coefficients(int64_t ng, int64_t c, acc_t sa, acc_t sb) const {
    const acc_t r = rstd[ng], inv_m = acc_t(1) / static_cast<acc_t>(CPG * S);
    return {r * weight[c] * out_scale(c), -r * r * sb * inv_m, -r * sa * inv_m};
  }
};

// Raw sums of row (n, c), contiguous input: in kChunk pieces, each summed in vectors.
template <int ACT, bool PROXY, typename scalar_t, typename acc_t = acc_type<scalar_t>>
void row_partials(const BackwardContext<scalar_t>& ctx, int64_t n, int64_t c) {
  using Vec = Vectorized<acc_t>;
  const int64_t ng = n * ctx.G + c / ctx.CPG, offset = (n * ctx.C + c) * ctx.S;
  const Vec mean(ctx.mean[ng]), a1(ctx.weight[c] * ctx.rstd[ng]), b(ctx.bias[c]), slope(ctx.slope);
  acc_t total_gp = 0, total_gpd = 0, total_g = 0, total_ga = 0;
  for (int64_t k = 0; k < ctx.S; k += kChunk) {
    Vec gp_sum(0), gpd_sum(0), g_sum(0), ga_sum(0);
    reduce2(ctx.x + offset + k, ctx.grad + offset + k, std::min(kChunk, ctx.S - k),
            [&](const Vec& xv, const Vec& gv, int64_t valid, int64_t) {
              const Vec d = xv - mean;
              const Vec z = at::vec::fmadd(d, a1, b);
              Vec gp = gv * act_grad_vec<ACT>(z, slope);
              if (valid < Vec::size()) gp = Vec::set(Vec(0), gp, valid);
              gp_sum += gp;
              gpd_sum = at::vec::fmadd(gp, d, gpd_sum);
              if constexpr (PROXY) {
                Vec ga = gv * act_value_vec<ACT>(z, slope);
                if (valid < Vec::size()) ga = Vec::set(Vec(0), ga, valid);
                g_sum += gv;
                ga_sum += ga;
              }
            });
    total_gp += lane_sum(gp_sum);
    total_gpd += lane_sum(gpd_sum);
    if constexpr (PROXY) {
      total_g += lane_sum(g_sum);
      total_ga += lane_sum(ga_sum);
    }
  }
  ctx.store_partials(n, c, total_gp, total_gpd, total_g, total_ga);
}

template <int ACT, typename scalar_t, typename acc_t = acc_type<scalar_t>>
void dx_row(const BackwardContext<scalar_t>& ctx, int64_t n, int64_t c, acc_t sa, acc_t sb) {
  using Vec = Vectorized<acc_t>;
  const int64_t ng = n * ctx.G + c / ctx.CPG, offset = (n * ctx.C + c) * ctx.S;
  const auto [k1, k2, k3] = ctx.dx_coefficients(ng, c, sa, sb);
  const Vec mean(ctx.mean[ng]), a1(ctx.weight[c] * ctx.rstd[ng]), b(ctx.bias[c]), slope(ctx.slope);
  const Vec vk1(k1), vk2(k2), vk3(k3);
  map2(ctx.x + offset, ctx.grad + offset, ctx.dx + offset, ctx.S,
       [&](const Vec& xv, const Vec& gv, int64_t) {
         const Vec d = xv - mean;
         const Vec gp = gv * act_grad_vec<ACT>(at::vec::fmadd(d, a1, b), slope);
         return at::vec::fmadd(gp, vk1, at::vec::fmadd(d, vk2, vk3));
       });
}

template <int ACT, bool PROXY, typename scalar_t>
void backward_contiguous(const BackwardContext<scalar_t>& ctx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t NG = ctx.N * ctx.G, CPG = ctx.CPG;
  if (one_task_per_group(NG)) {
    parallel_phase("fusednorm_cpu::backward_partials_and_dx", 0, NG, 1,
                   [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / ctx.G, g = ng % ctx.G;
        for (int64_t c = g * CPG; c < (g + 1) * CPG; ++c) row_partials<ACT, PROXY>(ctx, n, c);
        const auto [sa, sb] = ctx.group_sums(ng);
        for (int64_t c = g * CPG; c < (g + 1) * CPG; ++c) dx_row<ACT>(ctx, n, c, sa, sb);
      }
    });
    return;
  }
  const int64_t rows = ctx.N * ctx.C, grain = std::max<int64_t>(1, kChunk / ctx.S);
  parallel_phase("fusednorm_cpu::backward_partials", 0, rows, grain,
                 [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      row_partials<ACT, PROXY>(ctx, row / ctx.C, row % ctx.C);
    }
  });
  std::vector<std::pair<acc_t, acc_t>> sums(NG);
  for (int64_t ng = 0; ng < NG; ++ng) sums[ng] = ctx.group_sums(ng);
  parallel_phase("fusednorm_cpu::backward_dx", 0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / ctx.C, c = row % ctx.C;
      const auto [sa, sb] = sums[n * ctx.G + c / CPG];
      dx_row<ACT>(ctx, n, c, sa, sb);
    }
  });
}

template <int ACT, bool PROXY, typename scalar_t>
void backward_channels_last(const BackwardContext<scalar_t>& ctx) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t N = ctx.N, C = ctx.C, S = ctx.S, G = ctx.G, CPG = ctx.CPG;
  const RowTiling tiling(S, C, Io<scalar_t>::kStep);
  const int64_t tasks = N * tiling.tasks_per_n, P = tiling.padded_c;
  constexpr int kSums = PROXY ? 4 : 2;
  auto task_rows = [&](int64_t task) {
    const int64_t first = (task % tiling.tasks_per_n) * tiling.task_rows;
    return std::make_pair(first, std::min(S, first + tiling.task_rows));
  };
  std::vector<acc_t> bias(P, 0);
  std::copy(ctx.bias, ctx.bias + C, bias.begin());
  const Vec slope(ctx.slope);
  // Per-channel mean and gamma * rstd of sample n, laid out along C like the data.
  auto fill_channel_stats = [&](int64_t n, acc_t* mean, acc_t* a1) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t ng = n * G + c / CPG;
      mean[c] = ctx.mean[ng];
      a1[c] = ctx.weight[c] * ctx.rstd[ng];
    }
  };

  // Raw sums per task and channel: kSums planes of P, summed per block of rows, then per task.
  std::vector<acc_t> task_sums(tasks * kSums * P);
  parallel_phase("fusednorm_cpu::backward_partials_channels_last", 0, tasks, 1,
                 [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mean(P, 0), a1(P, 0), block(kSums * P);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiling.tasks_per_n;
      fill_channel_stats(n, mean.data(), a1.data());
      acc_t* total = task_sums.data() + task * kSums * P;
      std::fill(total, total + kSums * P, acc_t(0));
      const auto [first, last] = task_rows(task);
      for (int64_t s0 = first; s0 < last; s0 += tiling.block_rows) {
        std::fill(block.begin(), block.end(), acc_t(0));
        acc_t* gp_sum = block.data();
        acc_t* gpd_sum = gp_sum + P;
        for (int64_t s = s0; s < std::min(last, s0 + tiling.block_rows); ++s) {
          const int64_t offset = (n * S + s) * C;
          reduce2(ctx.x + offset, ctx.grad + offset, C,
                  [&](const Vec& xv, const Vec& gv, int64_t valid, int64_t off) {
                    const Vec d = xv - Vec::loadu(mean.data() + off);
                    const Vec z = at::vec::fmadd(d, Vec::loadu(a1.data() + off),
                                                 Vec::loadu(bias.data() + off));
                    Vec gp = gv * act_grad_vec<ACT>(z, slope);
                    if (valid < Vec::size()) gp = Vec::set(Vec(0), gp, valid);
                    (Vec::loadu(gp_sum + off) + gp).store(gp_sum + off);
                    at::vec::fmadd(gp, d, Vec::loadu(gpd_sum + off)).store(gpd_sum + off);
                    if constexpr (PROXY) {
                      acc_t* g_sum = gp_sum + 2 * P;
                      acc_t* ga_sum = gp_sum + 3 * P;
                      Vec ga = gv * act_value_vec<ACT>(z, slope);
                      if (valid < Vec::size()) ga = Vec::set(Vec(0), ga, valid);
                      (Vec::loadu(g_sum + off) + gv).store(g_sum + off);
                      (Vec::loadu(ga_sum + off) + ga).store(ga_sum + off);
                    }
                  });
        }
        for (int64_t i = 0; i < kSums * P; i += Vec::size()) {
          (Vec::loadu(total + i) + Vec::loadu(block.data() + i)).store(total + i);
        }
      }
    }
  });
  // Per (n, c): the tasks' sums in task order.
  parallel_phase("fusednorm_cpu::backward_partials_reduce_channels_last", 0, N, 1,
                 [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        acc_t sums[4] = {0, 0, 0, 0};
        for (int64_t t = 0; t < tiling.tasks_per_n; ++t) {
          const acc_t* total = task_sums.data() + (n * tiling.tasks_per_n + t) * kSums * P;
          for (int i = 0; i < kSums; ++i) sums[i] += total[i * P + c];
        }
        ctx.store_partials(n, c, sums[0], sums[1], sums[2], sums[3]);
      }
    }
  });

  parallel_phase("fusednorm_cpu::backward_dx_channels_last", 0, tasks, 1,
                 [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mean(P, 0), a1(P, 0), k1(P, 0), k2(P, 0), k3(P, 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiling.tasks_per_n;
      fill_channel_stats(n, mean.data(), a1.data());
      for (int64_t g = 0; g < G; ++g) {
        const auto [sa, sb] = ctx.group_sums(n * G + g);
        for (int64_t c = g * CPG; c < (g + 1) * CPG; ++c) {
          const auto coefficients = ctx.dx_coefficients(n * G + g, c, sa, sb);
          k1[c] = coefficients[0];
          k2[c] = coefficients[1];
          k3[c] = coefficients[2];
        }
      }
      const auto [first, last] = task_rows(task);
      for (int64_t s = first; s < last; ++s) {
        const int64_t offset = (n * S + s) * C;
        map2(ctx.x + offset, ctx.grad + offset, ctx.dx + offset, C,
             [&](const Vec& xv, const Vec& gv, int64_t off) {
               const Vec d = xv - Vec::loadu(mean.data() + off);
               const Vec z = at::vec::fmadd(d, Vec::loadu(a1.data() + off),
                                            Vec::loadu(bias.data() + off));
               const Vec gp = gv * act_grad_vec<ACT>(z, slope);
               return at::vec::fmadd(gp, Vec::loadu(k1.data() + off),
                                     at::vec::fmadd(d, Vec::loadu(k2.data() + off),
                                                    Vec::loadu(k3.data() + off)));
             });
      }
    }
  });
}

template <typename scalar_t>
void backward_typed(const BackwardArgs& args) {
  const BackwardContext<scalar_t> ctx(args);
  FUSEDNORM_DISPATCH_ACTIVATION(args.activation, [&] {
    auto run = [&](auto proxy) {
      if (args.channels_last) {
        backward_channels_last<kAct, decltype(proxy)::value>(ctx);
      } else {
        backward_contiguous<kAct, decltype(proxy)::value>(ctx);
      }
    };
    if (args.proxy_scale != nullptr) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
}

}  // namespace

void backward(const BackwardArgs& args) {
  dispatch_dtype(args.dtype, [&](auto tag) { backward_typed<decltype(tag)>(args); });
}

}  // namespace fusednorm::cpu::CPU_CAPABILITY
