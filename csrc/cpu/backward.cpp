// CPU backward kernel: per-(n, c) partial sums (sum g_z, g_z * xhat, g, g * a), per-(n, g)
// sums SA, SB, then dx = rstd * (gamma_c g_z - SA/M - xhat SB/M) (docs/pn-math.md). The parameter
// gradients are finished from the partials in proxy_kernels.cpp. Compiled once per instruction
// set (see vec_utils.h).
//
// Contiguous input: per row (n, c); rows of up to 4096 elements a vector-width of rows at a
// time, their horizontal sums in one tree (short rows), longer rows in fixed 4096-element
// pieces. One task per group does both passes when the groups keep every thread busy (the
// second pass then reads L2), else the passes run one after the other over rows: the same sums
// either way. Channels-last input: tasks of rows of one n, walked in memory order in strips of
// channels with sums and constants in small per-channel arrays (vec_utils.h), the sums reduced
// over tasks in a fixed order.
#include "vec_utils.h"

#include <utility>
#include <vector>

namespace fusednorm::cpu::FUSEDNORM_KERNELS {
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
  acc_t* partials;           // (N, 4, C)

  explicit BackwardContext(const BackwardArgs& a)
      : N(a.N), C(a.C), S(a.S), G(a.G), CPG(a.C / a.G), slope(static_cast<acc_t>(a.slope)),
        grad(static_cast<const scalar_t*>(a.grad)), x(static_cast<const scalar_t*>(a.x)),
        dx(static_cast<scalar_t*>(a.dx)), mean(static_cast<const acc_t*>(a.mean)),
        rstd(static_cast<const acc_t*>(a.rstd)), weight(static_cast<const acc_t*>(a.weight)),
        bias(static_cast<const acc_t*>(a.bias)),
        proxy_scale(static_cast<const acc_t*>(a.proxy_scale)),
        partials(static_cast<acc_t*>(a.partials)) {}

  acc_t out_scale(int64_t c) const { return proxy_scale ? proxy_scale[c] : acc_t(1); }

  // Partials of row (n, c) of group ng from the raw sums sum g*act', sum g*act'*(x - mean),
  // sum g, sum g*a: A = s_c * sum g*act', B = s_c * rstd * sum g*act'*(x - mean)
  // (= sum g_z * xhat).
  // Plane i (0-3) of sample n's partials.
  acc_t* plane(int64_t n, int i) const { return partials + (n * 4 + i) * C; }

  void store_partials(int64_t ng, int64_t n, int64_t c, acc_t gp, acc_t gpd, acc_t g,
                      acc_t ga) const {
    const acc_t scale = out_scale(c);
    plane(n, 0)[c] = scale * gp;
    plane(n, 1)[c] = scale * rstd[ng] * gpd;
    plane(n, 2)[c] = g;
    plane(n, 3)[c] = ga;
  }

  // The same for the `count` channels from c0 (all in group ng) at once, one lane each.
  void store_partials(int64_t ng, int64_t n, int64_t c0, int64_t count,
                      const Vectorized<acc_t>* sums) const {
    using Vec = Vectorized<acc_t>;
    const Vec scale = proxy_scale ? Vec::loadu(proxy_scale + c0, count) : Vec(acc_t(1));
    (scale * sums[0]).store(plane(n, 0) + c0, count);
    (scale * Vec(rstd[ng]) * sums[1]).store(plane(n, 1) + c0, count);
    sums[2].store(plane(n, 2) + c0, count);
    sums[3].store(plane(n, 3) + c0, count);
  }

  // SA = sum_{c in g} gamma_c A_nc, SB likewise with B, as a tree over the channels.
  std::pair<acc_t, acc_t> group_sums(int64_t ng) const {
    const int64_t n = ng / G, g = ng % G;
    const acc_t* a = plane(n, 0);
    const acc_t* b = plane(n, 1);
    return tree_reduce<std::pair<acc_t, acc_t>>(
        g * CPG, (g + 1) * CPG,
        [&](int64_t c) { return std::make_pair(weight[c] * a[c], weight[c] * b[c]); },
        [](const auto& x, const auto& y) {
          return std::make_pair(x.first + y.first, x.second + y.second);
        });
  }

  // dx = k1 * g * act'(z) + k2 * (x - mean) + k3, i.e. rstd * (gamma g_z - SA/M - xhat SB/M):
  // k2 and k3 are the group's, k1 the channel's.
  std::pair<acc_t, acc_t> dx_group_coefficients(int64_t ng, acc_t sa, acc_t sb) const {
    const acc_t r = rstd[ng], inv_m = acc_t(1) / static_cast<acc_t>(CPG * S);
    return {-r * r * sb * inv_m, -r * sa * inv_m};
  }
  acc_t dx_channel_coefficient(int64_t ng, int64_t c) const {
    return rstd[ng] * weight[c] * out_scale(c);
  }
};

// Vector sums over a piece of row (n, c) of group ng: sum g*act', sum g*act'*(x - mean) and,
// with PN, sum g, sum g*a (lanes past the data add zeros).
template <typename Vec>
struct PieceSums {
  Vec gp{0}, gpd{0}, g{0}, ga{0};
};

template <typename T>
PieceSums<T> add_sums(const PieceSums<T>& a, const PieceSums<T>& b) {
  return {a.gp + b.gp, a.gpd + b.gpd, a.g + b.g, a.ga + b.ga};
}

// The per-row coefficients of the backward: gamma_c * rstd and beta_c.
template <typename Vec>
struct RowCoefs {
  Vec a1, b;
};

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
RowCoefs<Vectorized<acc_t>> row_coefs(const BackwardContext<scalar_t>& ctx, int64_t ng,
                                      int64_t c) {
  return {Vectorized<acc_t>(ctx.weight[c] * ctx.rstd[ng]), Vectorized<acc_t>(ctx.bias[c])};
}

// Adds one vector of row values x, g (the lanes set in *mask; all with nullptr) to the sums.
template <int ACT, bool PROXY, typename Vec>
C10_ALWAYS_INLINE void add_piece(PieceSums<Vec>& sums, const Vec& xv, const Vec& gv,
                                 const Vec& mean, const RowCoefs<Vec>& k, const Vec& slope,
                                 const Vec* mask) {
  const Vec d = xv - mean;
  const Vec z = at::vec::fmadd(d, k.a1, k.b);
  Vec gp = act_grad_times<ACT>(z, gv, slope);
  if (mask) gp = Vec::blendv(Vec(0), gp, *mask);
  sums.gp += gp;
  sums.gpd = at::vec::fmadd(gp, d, sums.gpd);
  if constexpr (PROXY) {
    sums.g += mask ? Vec::blendv(Vec(0), gv, *mask) : gv;
    if constexpr (!kActIsHomogeneous<ACT>) {
      Vec ga = gv * act_value_vec<ACT>(z, slope);
      if (mask) ga = Vec::blendv(Vec(0), ga, *mask);
      sums.ga += ga;
    }
  }
}

// For ReLU-like activations sum g act(z) follows from the other two (kActIsHomogeneous), lane
// by lane as in the channels-last partials: the same rounding in both layouts.
template <int ACT, bool PROXY, typename Vec>
C10_ALWAYS_INLINE void finish_piece(PieceSums<Vec>& sums, const RowCoefs<Vec>& k) {
  if constexpr (PROXY && kActIsHomogeneous<ACT>) {
    sums.ga = at::vec::fmadd(k.a1, sums.gpd, k.b * sums.gp);
  }
}

// Vector sums over a piece of row c of group ng: elements [offset, offset + len).
template <int ACT, bool PROXY, typename scalar_t, typename acc_t = acc_type<scalar_t>>
C10_ALWAYS_INLINE PieceSums<Vectorized<acc_t>> piece_sums(const BackwardContext<scalar_t>& ctx,
                                                          int64_t ng, int64_t c, int64_t offset,
                                                          int64_t len) {
  using Vec = Vectorized<acc_t>;
  const Vec mean(ctx.mean[ng]), slope(ctx.slope);
  const auto k = row_coefs(ctx, ng, c);
  PieceSums<Vec> sums;
  reduce_rows<PieceSums<Vec>>(  // one row of len elements
      ctx.x + offset, ctx.grad + offset, 1, len, [&](int64_t) { return k; },
      [&](PieceSums<Vec>& into, const Vec& xv, const Vec& gv, const RowCoefs<Vec>& coefs,
          const Vec* mask) { add_piece<ACT, PROXY>(into, xv, gv, mean, coefs, slope, mask); },
      [&](int64_t, const PieceSums<Vec>& row_sums) { sums = row_sums; });
  finish_piece<ACT, PROXY>(sums, k);
  return sums;
}

// Raw sums of a long row (S > kChunk) (n, c) of group ng: in kChunk pieces, each summed in
// vectors, the pieces' sums added as a tree (a 256x256x72 row is 1152 pieces).
template <int ACT, bool PROXY, typename scalar_t, typename acc_t = acc_type<scalar_t>>
void long_row_partials(const BackwardContext<scalar_t>& ctx, int64_t ng, int64_t n, int64_t c) {
  const int64_t offset = (n * ctx.C + c) * ctx.S;
  const auto piece = [&](int64_t k) {
    const int64_t start = k * kChunk;
    const auto sums =
        piece_sums<ACT, PROXY>(ctx, ng, c, offset + start, std::min(kChunk, ctx.S - start));
    return PieceSums<acc_t>{lane_sum(sums.gp), lane_sum(sums.gpd),
                            PROXY ? lane_sum(sums.g) : acc_t(0),
                            PROXY ? lane_sum(sums.ga) : acc_t(0)};
  };
  const auto sums = tree_reduce<PieceSums<acc_t>>(0, divup(ctx.S, kChunk), piece, add_sums<acc_t>);
  ctx.store_partials(ng, n, c, sums.gp, sums.gpd, sums.g, sums.ga);
}

// Per-row vector sums of up to a vector-width of rows, their lanes summed all at once
// (lane_sums): short rows (7x7: 49 elements) spend as long in horizontal sums as in the data
// otherwise. add(c, sums) keeps row c's sums (rows in order, all of sample n in group ng);
// finish() writes the partials of the rows kept since the last.
template <typename scalar_t, bool PROXY, typename acc_t = acc_type<scalar_t>>
class RowSumsBatch {
 public:
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kLanes = Vec::size();

  RowSumsBatch(const BackwardContext<scalar_t>& ctx, int64_t ng, int64_t n)
      : ctx_(ctx), ng_(ng), n_(n) {}

  void add(int64_t c, const PieceSums<Vec>& sums) {
    if (count_ == 0) c0_ = c;
    const int64_t at = count_++ * kLanes;
    sums.gp.store(planes_[0] + at);
    sums.gpd.store(planes_[1] + at);
    sums.g.store(planes_[2] + at);
    sums.ga.store(planes_[3] + at);
    if (count_ == kLanes) finish();
  }

  void finish() {
    if (count_ == 0) return;
    for (int64_t i = count_; i < kLanes; ++i) {  // zeros for the lanes past the rows
      for (auto& plane : planes_) Vec(0).store(plane + i * kLanes);
    }
    Vec totals[4];
    for (int plane = 0; plane < 4; ++plane) {
      totals[plane] = plane < 2 || PROXY ? lane_sums<Vec>(planes_[plane]) : Vec(0);
    }
    ctx_.store_partials(ng_, n_, c0_, count_, totals);
    count_ = 0;
  }

 private:
  const BackwardContext<scalar_t>& ctx_;
  int64_t ng_, n_, c0_ = 0, count_ = 0;
  // Row i's vector sums at [i * kLanes, (i + 1) * kLanes) of each plane.
  alignas(64) acc_t planes_[4][kLanes * kLanes];
};

// Partials of the rows [begin, end) of (N * C), all in group ng.
template <int ACT, bool PROXY, typename scalar_t>
void rows_partials(const BackwardContext<scalar_t>& ctx, int64_t ng, int64_t begin,
                   int64_t end) {
  using Vec = Vectorized<acc_type<scalar_t>>;
  const int64_t n = begin / ctx.C, c_begin = begin % ctx.C, S = ctx.S;
  if (S > kChunk) {
    for (int64_t row = begin; row < end; ++row) {
      long_row_partials<ACT, PROXY>(ctx, ng, n, row % ctx.C);
    }
    return;
  }
  RowSumsBatch<scalar_t, PROXY> batch(ctx, ng, n);
  const int64_t offset = begin * S;
  if (flat_walk_fits<scalar_t>(S)) {
    const Vec mean(ctx.mean[ng]), slope(ctx.slope);
    const auto coefs_of = [&](int64_t r) { return row_coefs(ctx, ng, c_begin + r); };
    reduce_rows<PieceSums<Vec>>(
        ctx.x + offset, ctx.grad + offset, end - begin, S, coefs_of,
        [&](PieceSums<Vec>& sums, const Vec& xv, const Vec& gv, const RowCoefs<Vec>& k,
            const Vec* mask) { add_piece<ACT, PROXY>(sums, xv, gv, mean, k, slope, mask); },
        [&](int64_t r, PieceSums<Vec> sums) {
          finish_piece<ACT, PROXY>(sums, coefs_of(r));
          batch.add(c_begin + r, sums);
        });
  } else {
    for (int64_t r = 0; r < end - begin; ++r) {
      batch.add(c_begin + r, piece_sums<ACT, PROXY>(ctx, ng, c_begin + r, offset + r * S, S));
    }
  }
  batch.finish();
}

// dx of rows c_begin .. c_end - 1 of sample n, all in group ng; k2, k3: the group's
// coefficients (dx_group_coefficients). Rows shorter than a step one by one, longer ones as one
// flat walk (map_rows).
template <int ACT, typename scalar_t, typename acc_t = acc_type<scalar_t>>
void dx_rows(const BackwardContext<scalar_t>& ctx, int64_t ng, int64_t n, int64_t c_begin,
             int64_t c_end, acc_t k2, acc_t k3) {
  using Vec = Vectorized<acc_t>;
  const Vec mean(ctx.mean[ng]), slope(ctx.slope), vk2(k2), vk3(k3);
  struct DxCoefs {
    RowCoefs<Vec> z;
    Vec k1;
  };
  const auto coefs_of = [&](int64_t r) {
    const int64_t c = c_begin + r;
    return DxCoefs{row_coefs(ctx, ng, c), Vec(ctx.dx_channel_coefficient(ng, c))};
  };
  const auto dx_of = [&](const Vec& xv, const Vec& gv, const DxCoefs& k) {
    const Vec d = xv - mean;
    const Vec gp = act_grad_times<ACT>(at::vec::fmadd(d, k.z.a1, k.z.b), gv, slope);
    return at::vec::fmadd(gp, k.k1, at::vec::fmadd(d, vk2, vk3));
  };
  const int64_t offset = (n * ctx.C + c_begin) * ctx.S;
  if (flat_walk_fits<scalar_t>(ctx.S)) {
    map_rows<2>(ctx.x + offset, ctx.grad + offset, ctx.dx + offset, c_end - c_begin, ctx.S,
                coefs_of, dx_of);
    return;
  }
  for (int64_t r = 0; r < c_end - c_begin; ++r) {  // one row per walk
    const int64_t row = offset + r * ctx.S;
    map_rows<2>(ctx.x + row, ctx.grad + row, ctx.dx + row, 1, ctx.S,
                [&](int64_t) { return coefs_of(r); }, dx_of);
  }
}

template <int ACT, bool PROXY, typename scalar_t>
void backward_contiguous(const BackwardContext<scalar_t>& ctx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t NG = ctx.N * ctx.G, CPG = ctx.CPG;
  if (one_task_each(NG)) {
    parallel_phase("fusednorm_cpu::backward_partials_and_dx", 0, NG, 1,
                   [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / ctx.G, g = ng % ctx.G;
        rows_partials<ACT, PROXY>(ctx, ng, ng * CPG, (ng + 1) * CPG);
        const auto [sa, sb] = ctx.group_sums(ng);
        const auto [k2, k3] = ctx.dx_group_coefficients(ng, sa, sb);
        dx_rows<ACT>(ctx, ng, n, g * CPG, (g + 1) * CPG, k2, k3);
      }
    });
    return;
  }
  const int64_t rows = ctx.N * ctx.C, grain = std::max<int64_t>(1, kChunk / ctx.S);
  parallel_phase("fusednorm_cpu::backward_partials", 0, rows, grain,
                 [&](int64_t begin, int64_t end) {
    // Runs of rows within one group.
    for (int64_t row = begin; row < end;) {
      const int64_t ng = row / CPG, run_end = std::min(end, (ng + 1) * CPG);
      rows_partials<ACT, PROXY>(ctx, ng, row, run_end);
      row = run_end;
    }
  });
  std::vector<std::pair<acc_t, acc_t>> coefficients(NG);
  for (int64_t ng = 0; ng < NG; ++ng) {
    const auto [sa, sb] = ctx.group_sums(ng);
    coefficients[ng] = ctx.dx_group_coefficients(ng, sa, sb);
  }
  parallel_phase("fusednorm_cpu::backward_dx", 0, rows, grain, [&](int64_t begin, int64_t end) {
    // Runs of rows within one group.
    for (int64_t row = begin; row < end;) {
      const int64_t ng = row / CPG, run_end = std::min(end, (ng + 1) * CPG);
      const auto [k2, k3] = coefficients[ng];
      dx_rows<ACT>(ctx, ng, row / ctx.C, row % ctx.C, row % ctx.C + (run_end - row), k2, k3);
      row = run_end;
    }
  });
}

template <int ACT, bool PROXY, typename scalar_t>
void backward_channels_last(const BackwardContext<scalar_t>& ctx) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  using Strip = ChannelStrip<scalar_t>;
  constexpr int kVecs = Strip::kVecs;
  const int64_t N = ctx.N, C = ctx.C, S = ctx.S, G = ctx.G, CPG = ctx.CPG;
  const RowTiling tiling(S, C, Strip::kWidth);
  const int64_t tasks = N * tiling.tasks_per_n, P = tiling.padded_c;
  constexpr int kSums = PROXY ? 4 : 2;
  auto task_rows = [&](int64_t task) {
    const int64_t first = (task % tiling.tasks_per_n) * tiling.task_rows;
    return std::make_pair(first, std::min(S, first + tiling.task_rows));
  };
  std::vector<acc_t> bias(P, 0);
  std::copy(ctx.bias, ctx.bias + C, bias.begin());
  const Vec slope(ctx.slope);

  // Per-thread buffers: per-channel mean, gamma * rstd and the dx coefficients of one sample;
  // the per-channel sums of the blocks of a task.
  struct Buffers {
    std::vector<acc_t> mean, a1, k1, k2, k3;
    PairwiseBlocks<acc_t> block_sums;
    explicit Buffers(int64_t P)
        : mean(P, 0), a1(P, 0), k1(P, 0), k2(P, 0), k3(P, 0), block_sums(kSums * P) {}
  };

  // Adds the raw sums of rows s0 .. s0 + rows - 1 of sample n to total (kSums planes of P).
  auto partials_block = [&](int64_t n, int64_t s0, int64_t rows, acc_t* total, const acc_t* mean,
                            const acc_t* a1, const acc_t* bias_c) {
    const int64_t first_offset = (n * S + s0) * C;
    const scalar_t* x = ctx.x + first_offset;
    const scalar_t* grad = ctx.grad + first_offset;
    auto partials_strip = [=](int64_t offset, int64_t c0, auto width) C10_ALWAYS_INLINE_ATTRIBUTE {
      Vec vmean[kVecs], va1[kVecs], vbias[kVecs], xv[kVecs], gv[kVecs];
      Vec gp_sum[kVecs], gpd_sum[kVecs], g_sum[kVecs], ga_sum[kVecs];
      // Sum g * act(z) only where it does not follow from the others (below).
      constexpr bool kGa = PROXY && !kActIsHomogeneous<ACT>;
      Strip::load(x + offset, width, xv);
      Strip::load(grad + offset, width, gv);
      Strip::load_acc(mean + c0, vmean);
      Strip::load_acc(a1 + c0, va1);
      Strip::load_acc(bias_c + c0, vbias);
      Strip::load_acc(total + c0, gp_sum);
      Strip::load_acc(total + P + c0, gpd_sum);
      if constexpr (PROXY) Strip::load_acc(total + 2 * P + c0, g_sum);
      if constexpr (kGa) Strip::load_acc(total + 3 * P + c0, ga_sum);
      for (int j = 0; j < kVecs; ++j) {
        const Vec d = xv[j] - vmean[j];
        const Vec z = at::vec::fmadd(d, va1[j], vbias[j]);
        const Vec gp = act_grad_times<ACT>(z, gv[j], slope);
        gp_sum[j] += gp;
        gpd_sum[j] = at::vec::fmadd(gp, d, gpd_sum[j]);
        if constexpr (PROXY) g_sum[j] += gv[j];
        if constexpr (kGa) {
          ga_sum[j] = at::vec::fmadd(gv[j], act_value_vec<ACT>(z, slope), ga_sum[j]);
        }
      }
      Strip::store_acc(total + c0, gp_sum);
      Strip::store_acc(total + P + c0, gpd_sum);
      if constexpr (PROXY) Strip::store_acc(total + 2 * P + c0, g_sum);
      if constexpr (kGa) Strip::store_acc(total + 3 * P + c0, ga_sum);
    };
    for_each_row_strip<Strip>(rows, C, partials_strip);
  };
  // Raw sums per task and channel (kSums planes of P): each block of rows accumulated row by
  // row, the blocks added pairwise. Lanes past C see zero data and zero constants: they sum zeros.
  std::vector<acc_t> task_sums(tasks * kSums * P);
  auto partials_task = [&](int64_t task, Buffers& buffers) {
    acc_t* mean = buffers.mean.data();
    acc_t* a1 = buffers.a1.data();
    const acc_t* bias_c = bias.data();
    const int64_t n = task / tiling.tasks_per_n;
    fill_channel_stats(ctx.mean, ctx.rstd, ctx.weight, n, G, CPG, mean, a1);
    acc_t* total = task_sums.data() + task * kSums * P;
    const auto [first, last] = task_rows(task);
    buffers.block_sums.merge_blocks(
        first, last, tiling.block_rows, total,
        [&](acc_t* block, int64_t s0, int64_t rows) {
          partials_block(n, s0, rows, block, mean, a1, bias_c);
        },
        AddSums<acc_t>{kSums * P});
    // For ReLU-like activations sum g * act(z) follows from two other sums (act(z) = z act'(z)).
    if constexpr (PROXY && kActIsHomogeneous<ACT>) {
      for (int64_t c = 0; c < P; c += Vec::size()) {
        at::vec::fmadd(Vec::loadu(a1 + c), Vec::loadu(total + P + c),
                       Vec::loadu(bias_c + c) * Vec::loadu(total + c))
            .store(total + 3 * P + c);
      }
    }
  };
  // Per (n, c) of sample n: the tasks' sums added as a tree.
  auto reduce_sample = [&](int64_t n) {
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t c = g * CPG; c < (g + 1) * CPG; ++c) {
        const auto task_sum = [&](int64_t t) {
          const acc_t* total = task_sums.data() + (n * tiling.tasks_per_n + t) * kSums * P + c;
          return PieceSums<acc_t>{total[0], total[P], PROXY ? total[2 * P] : acc_t(0),
                                  PROXY ? total[3 * P] : acc_t(0)};
        };
        const auto sums =
            tree_reduce<PieceSums<acc_t>>(0, tiling.tasks_per_n, task_sum, add_sums<acc_t>);
        ctx.store_partials(n * G + g, n, c, sums.gp, sums.gpd, sums.g, sums.ga);
      }
    }
  };
  auto dx_task = [&](int64_t task, Buffers& buffers) {
    acc_t* mean = buffers.mean.data();
    acc_t* a1 = buffers.a1.data();
    acc_t* k1 = buffers.k1.data();
    acc_t* k2 = buffers.k2.data();
    acc_t* k3 = buffers.k3.data();
    const acc_t* bias_c = bias.data();
    const int64_t n = task / tiling.tasks_per_n;
    fill_channel_stats(ctx.mean, ctx.rstd, ctx.weight, n, G, CPG, mean, a1);
    for (int64_t g = 0; g < G; ++g) {
      const auto [sa, sb] = ctx.group_sums(n * G + g);
      const auto [group_k2, group_k3] = ctx.dx_group_coefficients(n * G + g, sa, sb);
      for (int64_t c = g * CPG; c < (g + 1) * CPG; ++c) {
        k1[c] = ctx.dx_channel_coefficient(n * G + g, c);
        k2[c] = group_k2;
        k3[c] = group_k3;
      }
    }
    const auto [first, last] = task_rows(task);
    const int64_t first_offset = (n * S + first) * C;
    const scalar_t* x = ctx.x + first_offset;
    const scalar_t* grad = ctx.grad + first_offset;
    scalar_t* dx = ctx.dx + first_offset;
    auto dx_strip = [=](int64_t offset, int64_t c0, auto width) C10_ALWAYS_INLINE_ATTRIBUTE {
      Vec vmean[kVecs], va1[kVecs], vbias[kVecs], vk1[kVecs], vk2[kVecs], vk3[kVecs];
      Vec xv[kVecs], gv[kVecs];
      Strip::load(x + offset, width, xv);
      Strip::load(grad + offset, width, gv);
      Strip::load_acc(mean + c0, vmean);
      Strip::load_acc(a1 + c0, va1);
      Strip::load_acc(bias_c + c0, vbias);
      Strip::load_acc(k1 + c0, vk1);
      Strip::load_acc(k2 + c0, vk2);
      Strip::load_acc(k3 + c0, vk3);
      for (int j = 0; j < kVecs; ++j) {
        const Vec d = xv[j] - vmean[j];
        const Vec gp = act_grad_times<ACT>(at::vec::fmadd(d, va1[j], vbias[j]), gv[j], slope);
        xv[j] = at::vec::fmadd(gp, vk1[j], at::vec::fmadd(d, vk2[j], vk3[j]));
      }
      Strip::store(dx + offset, width, xv);
    };
    for_each_row_strip<Strip>(last - first, C, dx_strip);
  };

  sample_passes<Buffers>({"fusednorm_cpu::backward_per_sample_channels_last",
                          "fusednorm_cpu::backward_partials_channels_last",
                          "fusednorm_cpu::backward_partials_reduce_channels_last",
                          "fusednorm_cpu::backward_dx_channels_last"},
                         N, tiling.tasks_per_n, P, partials_task, reduce_sample, dx_task);
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

}  // namespace fusednorm::cpu::FUSEDNORM_KERNELS
