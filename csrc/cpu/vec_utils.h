// Shared by forward.cpp and backward.cpp, the CPU kernels (see forward.cpp for the algorithm).
//
// Both files are compiled once per instruction set: setup.py builds them with
// -DCPU_CAPABILITY=AVX2 / AVX512 (ATen's vector types) and the matching -m flags besides the plain
// build (DEFAULT), and once more as AVX512 with -mavx512bf16, so everything here lives in a
// namespace named after the copy (FUSEDNORM_KERNELS; fusednorm_cpu.cpp picks one at run time),
// and in an anonymous namespace: each object file has its own copy.
#pragma once

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#ifndef FUSEDNORM_KERNELS  // the namespace of this copy of the kernels
#define FUSEDNORM_KERNELS CPU_CAPABILITY
#endif

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/macros/Macros.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "vec_activations.h"

namespace fusednorm::cpu::FUSEDNORM_KERNELS {
namespace {

using at::vec::Vectorized;

// Elements summed in vector registers before the sum is added to a scalar total: bounds the
// rounding error of long fp32 sums, and keeps a statistics chunk in L1 for a second pass.
constexpr int64_t kChunk = 4096;
// Channels-last: elements covered by one task (rows of one n).
constexpr int64_t kTaskElements = 1 << 18;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// combine(term_at(begin), ..., term_at(end - 1)) as a balanced tree, left to right (T{} when
// empty): the rounding error of a long sum or merge grows with log2 of the term count, where a
// running total's grows with the count (an 18.9M-element group is 4608 chunks: fp32 outputs 1e-5
// off, against PyTorch's 2e-7, merged one after the other). The order depends on the count only.
// Runs of up to kTreeLeaf terms are combined in a loop (a 7x7 backward's per-group channel sums:
// one call each, not 64 recursions).
constexpr int64_t kTreeLeaf = 8;

template <typename T, typename TermAt, typename Combine>
T tree_reduce(int64_t begin, int64_t end, const TermAt& term_at, const Combine& combine) {
  if (end - begin <= kTreeLeaf) {
    if (end <= begin) return T{};
    T result = term_at(begin);
    for (int64_t i = begin + 1; i < end; ++i) result = combine(result, term_at(i));
    return result;
  }
  const int64_t middle = begin + (end - begin) / 2;
  const T left = tree_reduce<T>(begin, middle, term_at, combine);
  return combine(left, tree_reduce<T>(middle, end, term_at, combine));
}

// Per-channel states of blocks of rows (arrays of `width` values: sums, or means and M2s)
// merged pairwise as the blocks arrive, like a binary counter: level l holds the merge of 2^l
// blocks. The error grows with log2 of the block count, where merging each block into a running
// state grew with the count (a task of 65536 rows of 4 channels is 1024 blocks: rstd 5e-7 off,
// dbias 50x PyTorch's); one more merge per block on average. merge(into, into_rows, from,
// from_rows) merges the state of the later rows `from` into `into`.
template <typename acc_t>
class PairwiseBlocks {
 public:
  explicit PairwiseBlocks(int64_t width) : width_(width), block_(width) {}

  void reset() { count_ = 0; }

  // The zeroed array the next block's state goes into.
  acc_t* start_block() {
    std::fill(block_.begin(), block_.end(), acc_t(0));
    return block_.data();
  }

  // Merges the block (of `rows` rows) into the levels it completes, then keeps the result at
  // the first free level.
  template <typename Merge>
  void finish_block(int64_t rows, const Merge& merge) {
    size_t level = 0;
    for (int64_t carry = count_; carry & 1; carry >>= 1, ++level) {
      merge(levels_[level].data(), level_rows_[level], block_.data(), rows);
      rows += level_rows_[level];
      std::swap(levels_[level], block_);  // the merged state, earlier rows first
    }
    if (level == levels_.size()) {
      levels_.emplace_back(width_);
      level_rows_.push_back(0);
    }
    std::swap(levels_[level], block_);  // the free level's array becomes the next block's
    level_rows_[level] = rows;
    ++count_;
  }

  // The state of rows [first, last) into out (width values): fill(block, s0, rows) writes the
  // state of rows s0 .. s0 + rows - 1 into a zeroed array, block by block of block_rows, the
  // blocks merged pairwise; a single block (7x7: 49 rows) goes straight into out.
  template <typename Fill, typename Merge>
  void merge_blocks(int64_t first, int64_t last, int64_t block_rows, acc_t* out, const Fill& fill,
                    const Merge& merge) {
    if (last - first <= block_rows) {
      std::fill(out, out + width_, acc_t(0));
      fill(out, first, last - first);
      return;
    }
    reset();
    for (int64_t s0 = first; s0 < last; s0 += block_rows) {
      const int64_t rows = std::min(block_rows, last - s0);
      fill(start_block(), s0, rows);
      finish_block(rows, merge);
    }
    result(out, merge);
  }

  // The merge of every finished block, earliest rows first, into out.
  template <typename Merge>
  void result(acc_t* out, const Merge& merge) const {
    int64_t rows = 0;
    for (size_t level = levels_.size(); level-- > 0;) {
      if (!((count_ >> level) & 1)) continue;
      if (rows == 0) {
        std::copy(levels_[level].begin(), levels_[level].end(), out);
      } else {
        merge(out, rows, levels_[level].data(), level_rows_[level]);
      }
      rows += level_rows_[level];
    }
    if (rows == 0) std::fill(out, out + width_, acc_t(0));
  }

 private:
  int64_t width_;
  int64_t count_ = 0;
  std::vector<acc_t> block_;
  std::vector<std::vector<acc_t>> levels_;
  std::vector<int64_t> level_rows_;
};

// Merge of PairwiseBlocks for sums: into += from, a whole number of vectors.
template <typename acc_t>
struct AddSums {
  int64_t width;
  void operator()(acc_t* into, int64_t, const acc_t* from, int64_t) const {
    using Vec = Vectorized<acc_t>;
    for (int64_t i = 0; i < width; i += Vec::size()) {
      (Vec::loadu(into + i) + Vec::loadu(from + i)).store(into + i);
    }
  }
};

// Loads from memory and stores prefetch this far ahead. The first pass over data from memory
// (statistics, backward partials; both layouts) read at half the bandwidth of a plain sum with
// the hardware prefetchers alone; the stores of y and dx (second passes) wait for each line's
// read for ownership, which a prefetch of the output lines starts early (prefetch_write_ahead:
// PREFETCHT0 in these builds, without -mprfchw; PREFETCHW not tried). Raw forward + backward,
// caches flushed, 2 threads, Intel Xeon (AVX512_BF16), 8x256x56x56 / 8x512x28x28, ms:
//   read prefetch in the first passes: channels-last bf16 4.45-4.47 -> 3.98-4.07 / 2.31-2.40 ->
//   2.06-2.08, fp32 8.33-8.83 -> 7.66-7.82 / 4.29-4.49 -> 3.84-4.01; NCHW bf16 3.91-3.94 ->
//   3.37-3.55 / 2.20-2.25 -> 1.93-2.06, fp32 5.83-5.89 -> 5.46-5.62 / 3.21-3.24 -> 3.04-3.09;
//   then the write prefetch: channels-last bf16 3.74-3.80 -> 3.42-3.47 / 1.94-2.07 -> 1.77-1.79,
//   fp32 7.49 -> 6.14 / 3.78 -> 3.08; NCHW bf16 3.21-3.24 -> 2.95-3.06 / 1.87-1.89 -> 1.70-1.73,
//   fp32 5.67 -> 5.10 / 3.11 -> 2.74.
// 2 KB ahead gained a little less; 14x14 and 7x7 unchanged or faster. A read prefetch in the
// NCHW second passes (map_rows: data in L2) made no difference, so they do without; the
// channels-last strips prefetch their loads in both passes. Prefetches past the end of the data
// never fault.
constexpr int64_t kPrefetchBytes = 4096;
constexpr int64_t kCacheLineBytes = 64;
inline void prefetch_ahead(const void* p) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) +
                                                   kPrefetchBytes), 0, 3);
}
inline void prefetch_write_ahead(void* p) {
  __builtin_prefetch(reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes), 1,
                     3);
}

// Loads and stores of scalar_t as vectors of its accumulation type: one vector per step for
// float/double, two for half/bfloat16.
template <typename scalar_t>
struct Io {
  using Vec = Vectorized<scalar_t>;
  static constexpr int kParts = 1;
  static constexpr int64_t kStep = Vec::size();
  static void load(const scalar_t* p, Vec* v) { v[0] = Vec::loadu(p); }
  static void load(const scalar_t* p, int64_t count, Vec* v) { v[0] = Vec::loadu(p, count); }
  static void store(scalar_t* p, const Vec* v) { v[0].store(p); }
  static void store(scalar_t* p, int64_t count, const Vec* v) { v[0].store(p, count); }
};

#if defined(CPU_CAPABILITY_AVX2)
// The 32-bit lanes holding the first count / 2 pairs of 16-bit values.
inline __m256i whole_pairs_mask(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count / 2)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The first `count` (< 16) 16-bit values at p, the other lanes zero, and their store. AVX2 has
// no 16-bit masked moves, and ATen's partial load/store of bf16/fp16 go through memcpy and a
// stack buffer (a libc call and a failed store-to-load forward each): with rows of 49 values (7x7:
// 3 vectors + 1) the AVX2 bf16 forward took 0.77 ms at 8x2048x7x7 against 0.55 ms at 8x2048x48.
// Here the pairs move with 32-bit masked loads/stores and an odd last value alone (a masked
// 32-bit lane past it could read past the end of the tensor).
inline __m256i load_16bit_tail(const void* p, int64_t count) {
  __m256i v = _mm256_maskload_epi32(static_cast<const int*>(p), whole_pairs_mask(count));
  if (count % 2 != 0) {
    const __m256i last_lane = _mm256_cmpeq_epi16(
        _mm256_set1_epi16(static_cast<int16_t>(count - 1)),
        _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const int16_t last = static_cast<const int16_t*>(p)[count - 1];
    v = _mm256_blendv_epi8(v, _mm256_set1_epi16(last), last_lane);
  }
  return v;
}

inline void store_16bit_tail(void* p, __m256i v, int64_t count) {
  _mm256_maskstore_epi32(static_cast<int*>(p), whole_pairs_mask(count), v);
  if (count % 2 != 0) {
    __at_align__ int16_t lanes[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
    static_cast<int16_t*>(p)[count - 1] = lanes[count - 1];
  }
}
#endif

template <typename scalar_t>
struct IoReduced {
  using Vec = Vectorized<float>;
  using Raw = Vectorized<scalar_t>;
  static constexpr int kParts = 2;
  static constexpr int64_t kStep = Raw::size();
  static_assert(kStep == 2 * Vec::size());
  static void load(const scalar_t* p, Vec* v) {
    std::tie(v[0], v[1]) = at::vec::convert_to_float<scalar_t>(Raw::loadu(p));
  }
  static void load(const scalar_t* p, int64_t count, Vec* v) {
#if defined(CPU_CAPABILITY_AVX2)
    const Raw raw(load_16bit_tail(p, count));
#else
    const Raw raw = Raw::loadu(p, count);
#endif
    std::tie(v[0], v[1]) = at::vec::convert_to_float<scalar_t>(raw);
  }
  static void store(scalar_t* p, const Vec* v) {
    at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
  }
  static void store(scalar_t* p, int64_t count, const Vec* v) {
#if defined(CPU_CAPABILITY_AVX2)
    store_16bit_tail(p, at::vec::convert_from_float<scalar_t>(v[0], v[1]), count);
#else
    at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p, count);
#endif
  }
};
#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
// fp32 -> bf16 with the AVX512-BF16 instruction (round to nearest even, as ATen's conversion,
// which takes ~10 integer instructions per 16 values; denormal results flush to zero).
template <>
struct Io<c10::BFloat16> : IoReduced<c10::BFloat16> {
  static void store(c10::BFloat16* p, const Vec* v) {
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
  }
  static void store(c10::BFloat16* p, int64_t count, const Vec* v) {
    _mm512_mask_storeu_epi16(p, static_cast<__mmask32>((uint64_t{1} << count) - 1),
                             (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
  }
};
#else
template <>
struct Io<c10::BFloat16> : IoReduced<c10::BFloat16> {};
#endif
template <>
struct Io<c10::Half> : IoReduced<c10::Half> {};

// Lanes of the tail vector that hold data (the rest are zeroed by the loops below).
template <typename Vec>
inline int64_t valid_lanes(int64_t rest, int part) {
  return std::clamp<int64_t>(rest - part * Vec::size(), 0, Vec::size());
}

// f(x, valid, offset) for each accumulation vector of p[0, len): `offset` is the vector's first
// element, `valid` its number of data lanes; lanes past `valid` are zero.
template <typename scalar_t, typename F>
inline void reduce1(const scalar_t* p, int64_t len, const F& f) {
  using IO = Io<scalar_t>;
  using Vec = typename IO::Vec;
  Vec v[IO::kParts];
  int64_t i = 0;
  for (; i + IO::kStep <= len; i += IO::kStep) {
    prefetch_ahead(p + i);
    IO::load(p + i, v);
    for (int part = 0; part < IO::kParts; ++part) f(v[part], Vec::size(), i + part * Vec::size());
  }
  if (i < len) {
    IO::load(p + i, len - i, v);
    for (int part = 0; part < IO::kParts; ++part) {
      const int64_t valid = valid_lanes<Vec>(len - i, part);
      if (valid > 0) f(Vec::set(Vec(0), v[part], valid), valid, i + part * Vec::size());
    }
  }
}

// Runs of NCHW rows (rows of S elements one after another in memory) walked as one flat array
// in whole steps of Io::kStep elements, where a per-row walk ends each row in a masked step: a
// 7x7 row (49 values) is 49/16 steps of 16 bf16 values instead of 3 plus a masked one, whose
// partial loads and stores cost more than a whole step (AVX2 bf16, one thread, per-row walk:
// forward 509 us at 8x2048x7x7 against 398 us at 8x2048x48, backward 703 against 463; flat, the
// 7x7 fwd+bwd with PN at 2 threads went from 0.89x native GN+ReLU to 1.15x in
// bench/results/cpu-2c-quick-20261203-2236). A step that straddles rows r and r + 1 is
// computed with the coefficients of each (coefs_of(r), any copyable type) and its lanes taken
// from their own row's result. Needs S >= kStep, so that a step spans at most two rows (a run
// of one row takes any S); only the run's last partial step is masked.
template <typename scalar_t>
constexpr bool flat_walk_fits(int64_t S) {
  return S >= Io<scalar_t>::kStep;
}

// Lane masks of the parts of a step: lanes at and past `first` (counted from the step's first
// element), and those before it.
template <typename Vec, int kParts>
struct StepLanes {
  Vec from[kParts], before[kParts];
  explicit StepLanes(int64_t first) {
    using T = typename Vec::value_type;
    const Vec split(static_cast<T>(first));
    for (int part = 0; part < kParts; ++part) {
      const Vec lane = Vec::arange(static_cast<T>(part * Vec::size()), T(1));
      from[part] = lane >= split;
      before[part] = lane < split;
    }
  }
};

// out = f(x, g, coefs) elementwise over a run of `rows` rows at p (and q; kInputs 1 or 2: g is x
// with one input); see flat_walk_fits.
template <int kInputs, typename scalar_t, typename CoefsOf, typename F>
inline void map_rows(const scalar_t* p, const scalar_t* q, scalar_t* out, int64_t rows,
                     int64_t S, const CoefsOf& coefs_of, const F& f) {
  using IO = Io<scalar_t>;
  using Vec = typename IO::Vec;
  using Lanes = StepLanes<Vec, IO::kParts>;
  Vec v[IO::kParts], w[IO::kParts];
  auto load = [&](int64_t i) {
    IO::load(p + i, v);
    if constexpr (kInputs == 2) IO::load(q + i, w);
  };
  auto second = [&](int part) -> const Vec& { return kInputs == 2 ? w[part] : v[part]; };
  auto coefs = coefs_of(0);
  int64_t i = 0, row_end = S;
  for (int64_t r = 0;; ++r, row_end += S) {
    for (; i + IO::kStep <= row_end; i += IO::kStep) {
      load(i);
      for (int part = 0; part < IO::kParts; ++part) v[part] = f(v[part], second(part), coefs);
      prefetch_write_ahead(out + i);
      IO::store(out + i, v);
    }
    if (r + 1 == rows) break;
    const auto next = coefs_of(r + 1);
    if (i < row_end) {  // the step across rows r and r + 1
      const Lanes lanes(row_end - i);
      load(i);
      for (int part = 0; part < IO::kParts; ++part) {
        v[part] = Vec::blendv(f(v[part], second(part), coefs), f(v[part], second(part), next),
                              lanes.from[part]);
      }
      IO::store(out + i, v);
      i += IO::kStep;
    }
    coefs = next;
  }
  if (i < row_end) {  // the last row's tail
    const int64_t count = row_end - i;
    IO::load(p + i, count, v);
    if constexpr (kInputs == 2) IO::load(q + i, count, w);
    for (int part = 0; part < IO::kParts && part * Vec::size() < count; ++part) {
      v[part] = f(v[part], second(part), coefs);
    }
    IO::store(out + i, count, v);
  }
}

// Per-row sums over a run of `rows` rows at p and q (see flat_walk_fits): add(sums, x, g, coefs,
// mask) adds the lanes of a step (all of them when mask is nullptr, else those set in *mask) to
// sums (a Sums, value-initialized per row); row_done(r, sums) receives each row's vector sums.
template <typename Sums, typename scalar_t, typename CoefsOf, typename Add, typename RowDone>
inline void reduce_rows(const scalar_t* p, const scalar_t* q, int64_t rows, int64_t S,
                        const CoefsOf& coefs_of, const Add& add, const RowDone& row_done) {
  using IO = Io<scalar_t>;
  using Vec = typename IO::Vec;
  using Lanes = StepLanes<Vec, IO::kParts>;
  Vec v[IO::kParts], w[IO::kParts];
  auto coefs = coefs_of(0);
  Sums sums{};
  int64_t i = 0, row_end = S;
  for (int64_t r = 0;; ++r, row_end += S) {
    for (; i + IO::kStep <= row_end; i += IO::kStep) {
      prefetch_ahead(p + i);
      prefetch_ahead(q + i);
      IO::load(p + i, v);
      IO::load(q + i, w);
      for (int part = 0; part < IO::kParts; ++part) add(sums, v[part], w[part], coefs, nullptr);
    }
    if (r + 1 == rows) break;
    const auto next = coefs_of(r + 1);
    Sums next_sums{};
    if (i < row_end) {  // the step across rows r and r + 1
      const Lanes lanes(row_end - i);
      IO::load(p + i, v);
      IO::load(q + i, w);
      for (int part = 0; part < IO::kParts; ++part) {
        add(sums, v[part], w[part], coefs, &lanes.before[part]);
        add(next_sums, v[part], w[part], next, &lanes.from[part]);
      }
      i += IO::kStep;
    }
    row_done(r, sums);
    sums = next_sums;
    coefs = next;
  }
  if (i < row_end) {  // the last row's tail
    const int64_t count = row_end - i;
    const Lanes lanes(count);
    IO::load(p + i, count, v);
    IO::load(q + i, count, w);
    for (int part = 0; part < IO::kParts && part * Vec::size() < count; ++part) {
      add(sums, v[part], w[part], coefs, &lanes.before[part]);
    }
  }
  row_done(rows - 1, sums);
}

// Sum of the lanes in a fixed order: a shuffle tree for float on AVX2/AVX-512 (ATen's
// vec_reduce_all: a few instructions, where a store and a chain of 16 dependent adds would cost
// as much as a short row of the backward), else in lane order.
template <typename Vec>
inline typename Vec::value_type lane_sum(const Vec& v) {
  using T = typename Vec::value_type;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return at::vec::vec_reduce_all<float>(std::plus<Vec>(), v);
  }
#endif
  alignas(64) T lanes[Vec::size()];
  v.store(lanes);
  T total = 0;
  for (int64_t i = 0; i < Vec::size(); ++i) total += lanes[i];
  return total;
}

// Lane i of the result: the sum of the lanes of vector i of `rows` (kCount = Vec::size()
// vectors stored one after the other). A tree of deinterleaves in registers: each level halves
// the vectors and the lanes per vector, ~3 instructions per sum where one lane_sum takes 8.
// Fixed order.
template <typename Vec, int64_t kCount = Vec::size()>
C10_ALWAYS_INLINE Vec lane_sums(const typename Vec::value_type* rows) {
  if constexpr (kCount == 1) {
    return Vec::loadu(rows);
  } else {
    const auto [even, odd] =
        at::vec::deinterleave2(lane_sums<Vec, kCount / 2>(rows),
                               lane_sums<Vec, kCount / 2>(rows + kCount / 2 * Vec::size()));
    return even + odd;
  }
}

// at::parallel_for as a named phase of the torch.profiler trace (tools/cpu_phases.py reads them);
// without an active profiler the record is a thread-local check.
template <typename F>
inline void parallel_phase(const char* name, int64_t begin, int64_t end, int64_t grain,
                           const F& f) {
  RECORD_FUNCTION(name, c10::ArrayRef<const c10::IValue>{});
  at::parallel_for(begin, end, grain, f);
}

// Whether one task per item (a group, or a sample) keeps every thread busy with balanced work;
// then one task does both passes over its item.
inline bool one_task_each(int64_t items) {
  const int64_t threads = at::get_num_threads();
  return items % threads == 0 || items >= 4 * threads;
}

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grain of a parallel phase whose items cost `work_per_item` elements each: a thread gets at
// least kMinTaskWork elements, so a small call runs on the calling thread instead of paying for
// waking the others (a few microseconds per phase, more than its work).
constexpr int64_t kMinTaskWork = 1 << 14;
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_item));
}

// Channels-last strips: kStripVecs accumulation vectors of channels (64 fp32 channels with
// AVX-512), the unit of work of the channels-last loops, which walk the memory in order: row by
// row, each row strip by strip, with per-channel constants and sums loaded from (and stored to)
// small per-channel arrays that stay in L1. Walking each strip down all rows instead, constants
// and sums in registers, reads a few cache lines per row at a stride of C elements; from memory
// the hardware prefetchers follow that poorly, software prefetch or not (caches flushed, raw
// forward+backward at 8x256x56x56: fp32 11.8-13.2 -> 7.4-8.0 ms, bf16 5.6-7.0 -> 3.9-5.2 ms in
// memory order; AMD EPYC). With the data already in L3 the register walk was 1.3-1.4x faster:
// the L1 loads and stores cost less than the memory stalls they remove, but not nothing.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kStripVecs = 4;  // of 32 vector registers
#else
constexpr int kStripVecs = 2;  // of 16
#endif

template <typename scalar_t>
struct ChannelStrip {
  using IO = Io<scalar_t>;
  using Vec = typename IO::Vec;
  using acc_t = typename Vec::value_type;
  static constexpr int kVecs = kStripVecs;
  static constexpr int kSteps = kStripVecs / IO::kParts;
  static constexpr int64_t kWidth = kStripVecs * Vec::size();  // channels
  static constexpr int64_t kBytes = kWidth * static_cast<int64_t>(sizeof(scalar_t));
  static_assert(kSteps * IO::kParts == kVecs);

  // v[0, kVecs) = p[0, width) in the accumulation type, zeros past width. A full strip also
  // prefetches its lines kPrefetchBytes ahead.
  static C10_ALWAYS_INLINE void load(const scalar_t* p, int64_t width, Vec* v) {
    if (width == kWidth) {
      for (int64_t b = 0; b < kBytes; b += kCacheLineBytes) {
        prefetch_ahead(reinterpret_cast<const char*>(p) + b);
      }
      for (int s = 0; s < kSteps; ++s) IO::load(p + s * IO::kStep, v + s * IO::kParts);
      return;
    }
    for (int s = 0; s < kSteps; ++s) {
      const int64_t rest = width - s * IO::kStep;
      if (rest >= IO::kStep) {
        IO::load(p + s * IO::kStep, v + s * IO::kParts);
      } else if (rest > 0) {
        IO::load(p + s * IO::kStep, rest, v + s * IO::kParts);
      } else {
        for (int part = 0; part < IO::kParts; ++part) v[s * IO::kParts + part] = Vec(0);
      }
    }
  }

  // p[0, width) = v[0, kVecs) in scalar_t.
  static C10_ALWAYS_INLINE void store(scalar_t* p, int64_t width, const Vec* v) {
    if (width == kWidth) {
      for (int64_t b = 0; b < kBytes; b += kCacheLineBytes) {
        prefetch_write_ahead(reinterpret_cast<char*>(p) + b);
      }
      for (int s = 0; s < kSteps; ++s) IO::store(p + s * IO::kStep, v + s * IO::kParts);
      return;
    }
    for (int s = 0; s < kSteps; ++s) {
      const int64_t rest = width - s * IO::kStep;
      if (rest >= IO::kStep) {
        IO::store(p + s * IO::kStep, v + s * IO::kParts);
      } else if (rest > 0) {
        IO::store(p + s * IO::kStep, rest, v + s * IO::kParts);
      }
    }
  }

  // Per-channel arrays in acc_t, padded with zeros to a multiple of kWidth.
  static C10_ALWAYS_INLINE void load_acc(const acc_t* p, Vec* v) {
    for (int j = 0; j < kVecs; ++j) v[j] = Vec::loadu(p + j * Vec::size());
  }
  static C10_ALWAYS_INLINE void store_acc(acc_t* p, const Vec* v) {
    for (int j = 0; j < kVecs; ++j) v[j].store(p + j * Vec::size());
  }
};

// Channels-last walks take the channels in blocks of this many, so that the per-channel
// constants and sums of a block (5-6 arrays of fp32) stay in L1 while its rows stream through:
// with C = 2048 they were 40-48 KB, evicted by the data. AVX2 bf16 8x2048x7x7 channels-last
// fwd+bwd (GN+PN+ReLU, forced AVX2 on Intel, tools/cpu_phases.py, 2 runs x 2 group counts):
// backward phase 0.32-0.36 -> 0.29-0.32 ms, 0.91-1.03x -> 0.99-1.07x native GN+ReLU; blocks
// of 256 channels took fp32 14x14 and 28x28 from 2.7x/4.1x to 2.3-2.5x/3.5x native, 512 left
// them unchanged. Wider strips than the block would break the static_assert below.
constexpr int64_t kChannelBlock = 512;

// f(offset, c0, width) for each row r < rows (C elements apart) and each strip of channels
// [c0, c0 + width) in it, block of channels by block, each block's rows in memory order;
// offset = r * C + c0 is the strip's first element. Each channel sees its rows in order. For a
// full strip (all but a partial last one) the width is a compile-time constant, so that f's
// loads and stores test nothing (a generic f is compiled once per kind of width).
template <typename Strip, typename F>
C10_ALWAYS_INLINE void for_each_row_strip(int64_t rows, int64_t C, const F& f) {
  static_assert(kChannelBlock % Strip::kWidth == 0);
  for (int64_t block = 0; block < C; block += kChannelBlock) {
    const int64_t block_end = std::min(C, block + kChannelBlock);
    for (int64_t r = 0, row = 0; r < rows; ++r, row += C) {
      for (int64_t c0 = block; c0 < block_end; c0 += Strip::kWidth) {
        if (C - c0 >= Strip::kWidth) {
          f(row + c0, c0, std::integral_constant<int64_t, Strip::kWidth>{});
        } else {
          f(row + c0, c0, C - c0);
        }
      }
    }
  }
}

// Channels-last tiling: rows of C elements, in strips of Strip::kWidth channels; a block of
// rows (kChunk elements per strip) is what the statistics pass over twice, the second time from
// L1 or L2; a task covers
// whole blocks of rows of one n, about kTaskElements, the rows split evenly over a sample's tasks
// (3136 rows of 256 channels: 832 + 832 + 832 + 640 rather than 3 x 1024 + 64, which gave one of
// two threads twice the other's work when samples are too few for one task each). Shapes only:
// the same split on any thread count.
struct RowTiling {
  int64_t block_rows, task_rows, tasks_per_n, padded_c;
  RowTiling(int64_t S, int64_t C, int64_t strip_width) {
    block_rows = std::max<int64_t>(1, kChunk / strip_width);
    const int64_t max_rows =
        divup(std::max<int64_t>(block_rows, kTaskElements / C), block_rows) * block_rows;
    task_rows = divup(divup(S, divup(S, max_rows)), block_rows) * block_rows;
    tasks_per_n = divup(S, task_rows);
    padded_c = divup(C, strip_width) * strip_width;
  }
};

// Names of the profiler phases of sample_passes.
struct PassNames {
  const char* per_sample;  // one task per sample
  const char* first;       // else: the first pass over all tasks,
  const char* between;     // the per-sample step,
  const char* second;      // and the second pass
};

// Channels-last kernels make two passes over the tasks of each sample, with a per-sample step
// between them that needs all of the sample's first pass: first(task, buffers), between(n),
// second(task, buffers); Buffers(P) is per-thread scratch. With enough samples for every thread,
// one task per sample runs all three, so that its second pass reads the sample from the
// last-level cache (8x256x56x56 fp32: 3.2 MB a sample) rather than from memory; otherwise three
// phases over all tasks. Each task computes the same either way.
template <typename Buffers, typename First, typename Between, typename Second>
void sample_passes(const PassNames& names, int64_t N, int64_t tasks_per_n, int64_t P,
                   const First& first, const Between& between, const Second& second) {
  if (one_task_each(N)) {
    parallel_phase(names.per_sample, 0, N, 1, [&](int64_t begin, int64_t end) {
      Buffers buffers(P);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t t = n * tasks_per_n; t < (n + 1) * tasks_per_n; ++t) first(t, buffers);
        between(n);
        for (int64_t t = n * tasks_per_n; t < (n + 1) * tasks_per_n; ++t) second(t, buffers);
      }
    });
    return;
  }
  parallel_phase(names.first, 0, N * tasks_per_n, 1, [&](int64_t begin, int64_t end) {
    Buffers buffers(P);
    for (int64_t task = begin; task < end; ++task) first(task, buffers);
  });
  parallel_phase(names.between, 0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) between(n);
  });
  parallel_phase(names.second, 0, N * tasks_per_n, 1, [&](int64_t begin, int64_t end) {
    Buffers buffers(P);
    for (int64_t task = begin; task < end; ++task) second(task, buffers);
  });
}

// Channels-last kernels: the per-channel mean and gamma * rstd of sample n laid out along C like
// the data, from the (N, G) statistics.
template <typename acc_t>
inline void fill_channel_stats(const acc_t* group_mean, const acc_t* group_rstd,
                               const acc_t* weight, int64_t n, int64_t G, int64_t CPG,
                               acc_t* mean, acc_t* a1) {
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t c = g * CPG; c < (g + 1) * CPG; ++c) {
      mean[c] = group_mean[n * G + g];
      a1[c] = weight[c] * group_rstd[n * G + g];
    }
  }
}

template <typename F>
void dispatch_dtype(Dtype dtype, const F& f) {
  switch (dtype) {
    case Dtype::kFloat: return f(float{});
    case Dtype::kDouble: return f(double{});
    case Dtype::kHalf: return f(c10::Half{});
    case Dtype::kBFloat16: return f(c10::BFloat16{});
  }
}

}  // namespace
}  // namespace fusednorm::cpu::FUSEDNORM_KERNELS
