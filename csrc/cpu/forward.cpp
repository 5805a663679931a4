// CPU forward kernel: group statistics, then y = s_c * (act(gamma_c * xhat + beta_c) - m_c).
// The algorithm of kernels/group_norm_proxy_act.py (docs/pn-math.md) on at::vec::Vectorized;
// compiled once per instruction set (see vec_utils.h).
//
// Contiguous (N, C, S) input, per (n, g) group (a contiguous range of M = C/G * S elements):
// statistics of fixed 4096-element chunks (one pass each about a center taken from its first
// values, two passes in L1 where that center is far off: kOnePassLimit) merged with Chan's
// formula, relative to a shift, then the apply pass per row (n, c). When there are enough groups
// for every thread, one task does both passes of a group, so the second pass reads it from L2
// instead of memory;
// otherwise the passes run one after the other with finer tasks. Both orders compute every sum
// the same way, so results do not depend on the thread count, and every reduction runs in a
// fixed order (deterministic, no atomics).
//
// Channels-last (N, S, C) input (and any input with S = 1): tasks of whole rows of one n, walked
// in memory order, row by row, each row in strips of channels (vec_utils.h: ChannelStrip) with
// per-channel sums and constants in small arrays; sums reduced over tasks in a fixed order.
#include "vec_utils.h"
#include "../welford.h"

#include <cmath>
#include <utility>
#include <vector>

namespace fusednorm::cpu::FUSEDNORM_KERNELS {
namespace {

// Group statistics as Welford states with exact int64 counts (welford.h).
template <typename acc_t>
using Welford = fusednorm::Welford<acc_t, int64_t>;

// One-pass statistics of a chunk (sums of d = x - center and d^2, m2 = sum d^2 - (sum d)^2 / n)
// are exact enough while the center is near the data's mean: m2's rounding error is about
// eps * sum d^2 = eps * (m2 + (sum d)^2 / n), so at most eps * m2 / (1 - kOnePassLimit) while
// (sum d)^2 / n <= kOnePassLimit * sum d^2. The center is the mean of the chunk's first vector of
// values (Gaussian data: 16 values put it ~sigma / 4 off, the limit at 3 sigma); past the limit (an
// outlier among them, a step in the data) the chunk's mean is summed first and the sums are taken
// again about it (two passes from cache). One pass instead of two: bf16 forward -10 to -25% at
// 8x256x56x56 and 8x512x28x28.
constexpr double kOnePassLimit = 0.9;
// Channels-last: the rows whose mean is a block's center per channel (4 rows: ~sigma / 2 off).
constexpr int64_t kCenterRows = 4;

// The state of p[0, len) - shift from one pass of sums about `center`, and whether the center was
// too far off for them (kOnePassLimit; NaN data passes, and reaches the outputs).
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
std::pair<Welford<acc_t>, bool> sums_about(const scalar_t* p, int64_t len, acc_t center,
                                           acc_t shift) {
  using Vec = Vectorized<acc_t>;
  const Vec vcenter(center);
  Vec sum(0), squares(0);
  reduce1(p, len, [&](const Vec& v, int64_t valid, int64_t) {
    Vec d = v - vcenter;
    if (valid < Vec::size()) d = Vec::set(Vec(0), d, valid);
    sum += d;
    squares = at::vec::fmadd(d, d, squares);
  });
  const acc_t n = static_cast<acc_t>(len), total = lane_sum(sum), total_sq = lane_sum(squares);
  const acc_t correction = total * total / n;
  return {{len, (center - shift) + total / n, std::max(total_sq - correction, acc_t(0))},
          correction > static_cast<acc_t>(kOnePassLimit) * total_sq};
}

// State of p[0, len) - shift, len <= kChunk (see kOnePassLimit). Statistics are kept relative to
// a shift, an element of the group: for offset data (1e4 + randn) the means then stay small and
// lose no digits.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
Welford<acc_t> chunk_stats(const scalar_t* p, int64_t len, acc_t shift) {
  using Vec = Vectorized<acc_t>;
  const int64_t head = std::min<int64_t>(len, Vec::size());
  acc_t center = 0;
  for (int64_t i = 0; i < head; ++i) center += static_cast<acc_t>(p[i]);
  const auto [state, far_off] = sums_about(p, len, center / static_cast<acc_t>(head), shift);
  if (!far_off) return state;
  const Vec vshift(shift);
  Vec sum(0);
  reduce1(p, len, [&](const Vec& v, int64_t valid, int64_t) {
    Vec d = v - vshift;
    if (valid < Vec::size()) d = Vec::set(Vec(0), d, valid);
    sum += d;
  });
  return sums_about(p, len, shift + lane_sum(sum) / static_cast<acc_t>(len), shift).first;
}

// Chan's merge of state_at(begin) .. state_at(end - 1) as a balanced tree (tree_reduce).
template <typename State, typename StateAt>
State merge_tree(int64_t begin, int64_t end, const StateAt& state_at) {
  return tree_reduce<State>(begin, end, state_at, [](const State& a, const State& b) {
    return welford_merge(a, b);
  });
}

template <typename scalar_t>
inline acc_type<scalar_t> to_acc(scalar_t v) {
  return static_cast<acc_type<scalar_t>>(v);
}

// The chunks' (NCHW) and tasks' (channels-last) states are merged in double: the merges'
// roundings (log2 of the chunk count of them) stay out of the statistics, as the final rstd's
// four fp32 roundings do (finish_stats). Heavy-tailed (1, 4, 512, 512) fp32 in 2 groups (128
// chunks a group): y 2.53x -> 1.29x F.group_norm's error against fp64 (uniform: 1.43x ->
// 0.94x), for a per-chunk cost.
using MergedState = Welford<double>;

template <typename acc_t>
inline MergedState merged(const Welford<acc_t>& state) {
  return {state.count, static_cast<double>(state.mean), static_cast<double>(state.m2)};
}

template <typename acc_t>
inline void finish_stats(const MergedState& state, acc_t shift, double eps, acc_t* mean,
                         acc_t* rstd) {
  // std::max(NaN, 0) is NaN: a NaN in the group reaches every output of the group. mean and rstd
  // rounded once each.
  const double var = std::max(state.m2 / static_cast<double>(state.count), 0.0);
  *mean = static_cast<acc_t>(static_cast<double>(shift) + state.mean);
  *rstd = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
}

template <typename scalar_t>
struct ForwardContext {
  using acc_t = acc_type<scalar_t>;
  int64_t N, C, S, G, CPG;
  double eps;
  acc_t slope;
  const scalar_t* x;
  scalar_t* y;
  const acc_t* weight;
  const acc_t* bias;
  const acc_t* proxy_mean;   // nullptr: PN off
  const acc_t* proxy_scale;
  acc_t* mean;
  acc_t* rstd;

  explicit ForwardContext(const ForwardArgs& a)
      : N(a.N), C(a.C), S(a.S), G(a.G), CPG(a.C / a.G), eps(a.eps),
        slope(static_cast<acc_t>(a.slope)), x(static_cast<const scalar_t*>(a.x)),
        y(static_cast<scalar_t*>(a.y)), weight(static_cast<const acc_t*>(a.weight)),
        bias(static_cast<const acc_t*>(a.bias)),
        proxy_mean(static_cast<const acc_t*>(a.proxy_mean)),
        proxy_scale(static_cast<const acc_t*>(a.proxy_scale)),
        mean(static_cast<acc_t*>(a.mean)), rstd(static_cast<acc_t*>(a.rstd)) {}

  // y = out_scale * act(z) - out_offset: s_c and s_c * m_c (1 and 0 without PN).
  acc_t out_scale(int64_t c) const { return proxy_scale ? proxy_scale[c] : acc_t(1); }
  acc_t out_offset(int64_t c) const {
    return proxy_scale ? proxy_scale[c] * proxy_mean[c] : acc_t(0);
  }
};

// Rows c_begin .. c_end - 1 of sample n, all in group ng:
// y = s_c * act((x - mean) * gamma_c * rstd + beta_c) - s_c m_c. (x - mean) * (gamma * rstd)
// rather than a folded A * x + B: no cancellation on offset data. Rows shorter than a step one by
// one, longer ones as one flat walk (map_rows).
template <int ACT, typename scalar_t, typename acc_t = acc_type<scalar_t>>
void apply_rows(const ForwardContext<scalar_t>& ctx, int64_t ng, int64_t n, int64_t c_begin,
                int64_t c_end) {
  using Vec = Vectorized<acc_t>;
  const Vec mean(ctx.mean[ng]), slope(ctx.slope);
  struct RowCoefs {
    Vec a1, b, scale, out_offset;
  };
  const auto coefs_of = [&](int64_t r) {
    const int64_t c = c_begin + r;
    return RowCoefs{Vec(ctx.weight[c] * ctx.rstd[ng]), Vec(ctx.bias[c]), Vec(ctx.out_scale(c)),
                    Vec(ctx.out_offset(c))};
  };
  const auto y_of = [&](const Vec& v, const Vec&, const RowCoefs& k) {
    return at::vec::fmsub(act_value_vec<ACT>(at::vec::fmadd(v - mean, k.a1, k.b), slope), k.scale,
                          k.out_offset);
  };
  const int64_t offset = (n * ctx.C + c_begin) * ctx.S;
  if (flat_walk_fits<scalar_t>(ctx.S)) {
    map_rows<1>(ctx.x + offset, ctx.x + offset, ctx.y + offset, c_end - c_begin, ctx.S, coefs_of,
                y_of);
    return;
  }
  for (int64_t r = 0; r < c_end - c_begin; ++r) {  // one row per walk
    const int64_t row = offset + r * ctx.S;
    map_rows<1>(ctx.x + row, ctx.x + row, ctx.y + row, 1, ctx.S,
                [&](int64_t) { return coefs_of(r); }, y_of);
  }
}

template <int ACT, typename scalar_t>
void forward_contiguous(const ForwardContext<scalar_t>& ctx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t M = ctx.CPG * ctx.S, NG = ctx.N * ctx.G, chunks = divup(M, kChunk);
  auto shift_of = [&](int64_t ng) { return to_acc(ctx.x[ng * M]); };
  auto stats_of_chunk = [&](int64_t ng, int64_t k) {
    return chunk_stats(ctx.x + ng * M + k * kChunk, std::min(kChunk, M - k * kChunk),
                       shift_of(ng));
  };
  if (one_task_each(NG)) {
    parallel_phase("fusednorm_cpu::forward_stats_and_apply", 0, NG, 1,
                   [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) {
        const auto state = merge_tree<MergedState>(
            0, chunks, [&](int64_t k) { return merged(stats_of_chunk(ng, k)); });
        finish_stats(state, shift_of(ng), ctx.eps, ctx.mean + ng, ctx.rstd + ng);
        const int64_t n = ng / ctx.G, g = ng % ctx.G;
        apply_rows<ACT>(ctx, ng, n, g * ctx.CPG, (g + 1) * ctx.CPG);
      }
    });
    return;
  }
  std::vector<Welford<acc_t>> states(NG * chunks);
  parallel_phase("fusednorm_cpu::forward_stats", 0, NG * chunks, 1,
                 [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) states[i] = stats_of_chunk(i / chunks, i % chunks);
  });
  for (int64_t ng = 0; ng < NG; ++ng) {
    const auto state = merge_tree<MergedState>(
        0, chunks, [&](int64_t k) { return merged(states[ng * chunks + k]); });
    finish_stats(state, shift_of(ng), ctx.eps, ctx.mean + ng, ctx.rstd + ng);
  }
  const int64_t grain = std::max<int64_t>(1, kChunk / ctx.S);
  parallel_phase("fusednorm_cpu::forward_apply", 0, ctx.N * ctx.C, grain,
                 [&](int64_t begin, int64_t end) {
    // Runs of rows within one group.
    for (int64_t row = begin; row < end;) {
      const int64_t ng = row / ctx.CPG, run_end = std::min(end, (ng + 1) * ctx.CPG);
      const int64_t n = row / ctx.C;
      apply_rows<ACT>(ctx, ng, n, row % ctx.C, row % ctx.C + (run_end - row));
      row = run_end;
    }
  });
}

template <int ACT, typename scalar_t>
void forward_channels_last(const ForwardContext<scalar_t>& ctx) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  using Strip = ChannelStrip<scalar_t>;
  constexpr int kVecs = Strip::kVecs;
  const int64_t N = ctx.N, C = ctx.C, S = ctx.S, G = ctx.G, CPG = ctx.CPG;
  const RowTiling tiling(S, C, Strip::kWidth);
  const int64_t tasks = N * tiling.tasks_per_n, P = tiling.padded_c;
  auto task_rows = [&](int64_t task) {
    const int64_t first = (task % tiling.tasks_per_n) * tiling.task_rows;
    return std::make_pair(first, std::min(S, first + tiling.task_rows));
  };

  // Statistics: per block of rows each channel's mean and squared deviations (block_stats: one
  // pass, or two where needed), merged per channel over the blocks of a task (Chan, pairwise),
  // then into the groups' states, which are merged over tasks. All relative to a shift per
  // (n, g), the group's first element (see chunk_stats).
  auto shift_of = [&](int64_t n, int64_t g) { return to_acc(ctx.x[n * S * C + g * CPG]); };
  std::vector<MergedState> states(tasks * G);
  // Per-thread, per-channel buffers of the statistics (shift, task and block states) and the
  // apply (mean, a1).
  struct Buffers {
    std::vector<acc_t> shift, task_state, center, mean, a1;
    PairwiseBlocks<acc_t> blocks;  // states of P means, then P M2s
    explicit Buffers(int64_t P)
        : shift(P, 0), task_state(2 * P, 0), center(P, 0), mean(P, 0), a1(P, 0), blocks(2 * P) {}
  };
  // A block's per-channel mean and squared deviations (relative to the shift) into block_mean
  // and block_m2 = block_mean + P: one pass of sums about a center per channel, the mean of the
  // block's first rows (kOnePassLimit); where the center of any channel is too far off, the
  // block's mean is summed first and the sums are taken again about it.
  auto block_stats = [&](const scalar_t* block, int64_t rows, const acc_t* shift,
                         acc_t* block_mean, Buffers& buffers) {
    acc_t* block_m2 = block_mean + P;
    acc_t* center = buffers.center.data();
    // center = the mean of the block's first `count` rows per channel (summed relative to the
    // shift, as everything here).
    auto rows_mean = [&](int64_t count) {
      std::fill(center, center + P, acc_t(0));
      auto sum_strip = [=](int64_t offset, int64_t c0, auto width) C10_ALWAYS_INLINE_ATTRIBUTE {
        Vec v[kVecs], vshift[kVecs], sum[kVecs];
        Strip::load(block + offset, width, v);
        Strip::load_acc(shift + c0, vshift);
        Strip::load_acc(center + c0, sum);
        for (int j = 0; j < kVecs; ++j) sum[j] += v[j] - vshift[j];
        Strip::store_acc(center + c0, sum);
      };
      for_each_row_strip<Strip>(count, C, sum_strip);
      const Vec inv_count(acc_t(1) / static_cast<acc_t>(count));
      for (int64_t c = 0; c < P; c += Vec::size()) {
        at::vec::fmadd(Vec::loadu(center + c), inv_count, Vec::loadu(shift + c)).store(center + c);
      }
    };
    // Sums of d = x - center and d^2 per channel, then the block's state; whether any channel's
    // center was too far off.
    auto sums_about_center = [&]() {
      std::fill(block_mean, block_mean + P, acc_t(0));
      std::fill(block_m2, block_m2 + P, acc_t(0));
      auto sums_strip = [=](int64_t offset, int64_t c0, auto width) C10_ALWAYS_INLINE_ATTRIBUTE {
        Vec v[kVecs], vcenter[kVecs], sum[kVecs], squares[kVecs];
        Strip::load(block + offset, width, v);
        Strip::load_acc(center + c0, vcenter);
        Strip::load_acc(block_mean + c0, sum);
        Strip::load_acc(block_m2 + c0, squares);
        for (int j = 0; j < kVecs; ++j) {
          const Vec d = v[j] - vcenter[j];
          sum[j] += d;
          squares[j] = at::vec::fmadd(d, d, squares[j]);
        }
        Strip::store_acc(block_mean + c0, sum);
        Strip::store_acc(block_m2 + c0, squares);
      };
      for_each_row_strip<Strip>(rows, C, sums_strip);
      const Vec inv_rows(acc_t(1) / static_cast<acc_t>(rows));
      const Vec limit(static_cast<acc_t>(kOnePassLimit)), zero(0);
      constexpr int kAllLanes = (1 << Vec::size()) - 1;
      bool far_off = false;
      for (int64_t c = 0; c < P; c += Vec::size()) {
        const Vec sum = Vec::loadu(block_mean + c), squares = Vec::loadu(block_m2 + c);
        const Vec correction = sum * sum * inv_rows;
        // zero_mask: the lanes where the comparison is false (NaN included).
        far_off |= (correction > limit * squares).zero_mask() != kAllLanes;
        (Vec::loadu(center + c) - Vec::loadu(shift + c) + sum * inv_rows).store(block_mean + c);
        at::vec::maximum(squares - correction, zero).store(block_m2 + c);
      }
      return far_off;
    };
    rows_mean(std::min(kCenterRows, rows));
    if (!sums_about_center()) return;
    rows_mean(rows);
    sums_about_center();
  };
  // Chan's merge of the per-channel states of later rows (from) into those of earlier ones.
  const auto chan_merge = [P](acc_t* into, int64_t into_rows, const acc_t* from,
                              int64_t from_rows) {
    const acc_t total = static_cast<acc_t>(into_rows + from_rows);
    const Vec weight_b(static_cast<acc_t>(from_rows) / total);
    const Vec weight_ab(static_cast<acc_t>(into_rows) * (static_cast<acc_t>(from_rows) / total));
    for (int64_t c = 0; c < P; c += Vec::size()) {
      const Vec mean = Vec::loadu(into + c), delta = Vec::loadu(from + c) - mean;
      at::vec::fmadd(delta, weight_b, mean).store(into + c);
      const Vec m2 = Vec::loadu(into + P + c) + Vec::loadu(from + P + c);
      at::vec::fmadd(delta * delta, weight_ab, m2).store(into + P + c);
    }
  };
  auto stats_task = [&](int64_t task, Buffers& buffers) {
    acc_t* shift = buffers.shift.data();
    acc_t* task_mean = buffers.task_state.data();
    acc_t* task_m2 = task_mean + P;
    const int64_t n = task / tiling.tasks_per_n;
    for (int64_t g = 0; g < G; ++g) {
      std::fill(shift + g * CPG, shift + (g + 1) * CPG, shift_of(n, g));
    }
    const auto [first, last] = task_rows(task);
    buffers.blocks.merge_blocks(
        first, last, tiling.block_rows, task_mean,
        [&](acc_t* block, int64_t s0, int64_t rows) {
          block_stats(ctx.x + (n * S + s0) * C, rows, shift, block, buffers);
        },
        chan_merge);
    // Each group's state over this task from its channels' states (equal counts).
    const int64_t task_count = last - first;
    MergedState* group_states = states.data() + task * G;
    for (int64_t g = 0; g < G; ++g) {
      const acc_t* means = task_mean + g * CPG;
      double mean = 0, squares = 0, spread = 0;
      for (int64_t c = 0; c < CPG; ++c) mean += means[c];
      mean /= static_cast<double>(CPG);
      for (int64_t c = 0; c < CPG; ++c) {
        squares += task_m2[g * CPG + c];
        spread += (means[c] - mean) * (means[c] - mean);
      }
      group_states[g] = MergedState{task_count * CPG, mean,
                                    squares + static_cast<double>(task_count) * spread};
    }
  };
  auto finish_sample = [&](int64_t n) {
    for (int64_t g = 0; g < G; ++g) {
      const auto state = merge_tree<MergedState>(0, tiling.tasks_per_n, [&](int64_t t) {
        return states[(n * tiling.tasks_per_n + t) * G + g];
      });
      finish_stats(state, shift_of(n, g), ctx.eps, ctx.mean + n * G + g, ctx.rstd + n * G + g);
    }
  };

  // Apply: y from x and the per-channel constants.
  std::vector<acc_t> bias(P, 0), out_scale(P, 0), out_offset(P, 0);
  for (int64_t c = 0; c < C; ++c) {
    bias[c] = ctx.bias[c];
    out_scale[c] = ctx.out_scale(c);
    out_offset[c] = ctx.out_offset(c);
  }
  const Vec slope(ctx.slope);
  auto apply_task = [&](int64_t task, Buffers& buffers) {
    acc_t* mean = buffers.mean.data();
    acc_t* a1 = buffers.a1.data();
    const int64_t n = task / tiling.tasks_per_n;
    fill_channel_stats(ctx.mean, ctx.rstd, ctx.weight, n, G, CPG, mean, a1);
    const auto [first, last] = task_rows(task);
    const int64_t first_offset = (n * S + first) * C;
    const scalar_t* x = ctx.x + first_offset;
    scalar_t* y = ctx.y + first_offset;
    const acc_t* bias_c = bias.data();
    const acc_t* scale_c = out_scale.data();
    const acc_t* offset_c = out_offset.data();
    auto apply_strip = [=](int64_t offset, int64_t c0, auto width) C10_ALWAYS_INLINE_ATTRIBUTE {
      Vec vmean[kVecs], va1[kVecs], vbias[kVecs], vscale[kVecs], voffset[kVecs], v[kVecs];
      Strip::load(x + offset, width, v);
      Strip::load_acc(mean + c0, vmean);
      Strip::load_acc(a1 + c0, va1);
      Strip::load_acc(bias_c + c0, vbias);
      Strip::load_acc(scale_c + c0, vscale);
      Strip::load_acc(offset_c + c0, voffset);
      for (int j = 0; j < kVecs; ++j) {
        const Vec z = at::vec::fmadd(v[j] - vmean[j], va1[j], vbias[j]);
        v[j] = at::vec::fmsub(act_value_vec<ACT>(z, slope), vscale[j], voffset[j]);
      }
      Strip::store(y + offset, width, v);
    };
    for_each_row_strip<Strip>(last - first, C, apply_strip);
  };

  sample_passes<Buffers>({"fusednorm_cpu::forward_per_sample_channels_last",
                          "fusednorm_cpu::forward_stats_channels_last",
                          "fusednorm_cpu::forward_finish_stats_channels_last",
                          "fusednorm_cpu::forward_apply_channels_last"},
                         N, tiling.tasks_per_n, P, stats_task, finish_sample, apply_task);
}

template <typename scalar_t>
void forward_typed(const ForwardArgs& args) {
  const ForwardContext<scalar_t> ctx(args);
  FUSEDNORM_DISPATCH_ACTIVATION(args.activation, [&] {
    if (args.channels_last) {
      forward_channels_last<kAct>(ctx);
    } else {
      forward_contiguous<kAct>(ctx);
    }
  });
}

}  // namespace

void forward(const ForwardArgs& args) {
  dispatch_dtype(args.dtype, [&](auto tag) { forward_typed<decltype(tag)>(args); });
}

}  // namespace fusednorm::cpu::FUSEDNORM_KERNELS
