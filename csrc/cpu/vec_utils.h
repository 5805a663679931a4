// Shared by forward.cpp and backward.cpp, the CPU kernels (see forward.cpp for the algorithm).
//
// Both files are compiled once per instruction set: setup.py builds them with
// -DCPU_CAPABILITY=AVX2 / AVX512 and the matching -m flags besides the plain build (DEFAULT), so
// everything here lives in a namespace named after the capability (fusednorm_cpu.cpp picks one
// at run time), and in an anonymous namespace: each object file has its own copy.
#pragma once

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "kernels.h"
#include "vec_activations.h"

namespace fusednorm::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Elements summed in vector registers before the sum is added to a scalar total: bounds the
// rounding error of long fp32 sums, and keeps a statistics chunk in L1 for its second pass.
constexpr int64_t kChunk = 4096;
// Channels-last: elements covered by one task (rows of one n).
constexpr int64_t kTaskElements = 1 << 18;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

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
    std::tie(v[0], v[1]) = at::vec::convert_to_float<scalar_t>(Raw::loadu(p, count));
  }
  static void store(scalar_t* p, const Vec* v) {
    at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
  }
  static void store(scalar_t* p, int64_t count, const Vec* v) {
    at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p, count);
  }
};
template <>
struct Io<c10::BFloat16> : IoReduced<c10::BFloat16> {};
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

// f(x, g, valid, offset) over two arrays of the same length.
template <typename scalar_t, typename F>
inline void reduce2(const scalar_t* p, const scalar_t* q, int64_t len, const F& f) {
  using IO = Io<scalar_t>;
  using Vec = typename IO::Vec;
  Vec v[IO::kParts], w[IO::kParts];
  int64_t i = 0;
  for (; i + IO::kStep <= len; i += IO::kStep) {
    IO::load(p + i, v);
    IO::load(q + i, w);
    for (int part = 0; part < IO::kParts; ++part) {
      f(v[part], w[part], Vec::size(), i + part * Vec::size());
    }
  }
  if (i < len) {
    IO::load(p + i, len - i, v);
    IO::load(q + i, len - i, w);
    for (int part = 0; part < IO::kParts; ++part) {
      const int64_t valid = valid_lanes<Vec>(len - i, part);
      if (valid > 0) {
        f(Vec::set(Vec(0), v[part], valid), Vec::set(Vec(0), w[part], valid), valid,
          i + part * Vec::size());
      }
    }
  }
}

// out[i] = f(p[i], offset) elementwise, vector by vector.
template <typename scalar_t, typename F>
inline void map1(const scalar_t* p, scalar_t* out, int64_t len, const F& f) {
  using IO = Io<scalar_t>;
  using Vec = typename IO::Vec;
  Vec v[IO::kParts];
  int64_t i = 0;
  for (; i + IO::kStep <= len; i += IO::kStep) {
    IO::load(p + i, v);
    for (int part = 0; part < IO::kParts; ++part) v[part] = f(v[part], i + part * Vec::size());
    IO::store(out + i, v);
  }
  if (i < len) {
    IO::load(p + i, len - i, v);
    for (int part = 0; part < IO::kParts; ++part) v[part] = f(v[part], i + part * Vec::size());
    IO::store(out + i, len - i, v);
  }
}

// out[i] = f(p[i], q[i], offset).
template <typename scalar_t, typename F>
inline void map2(const scalar_t* p, const scalar_t* q, scalar_t* out, int64_t len, const F& f) {
  using IO = Io<scalar_t>;
  using Vec = typename IO::Vec;
  Vec v[IO::kParts], w[IO::kParts];
  int64_t i = 0;
  for (; i + IO::kStep <= len; i += IO::kStep) {
    IO::load(p + i, v);
    IO::load(q + i, w);
    for (int part = 0; part < IO::kParts; ++part) {
      v[part] = f(v[part], w[part], i + part * Vec::size());
    }
    IO::store(out + i, v);
  }
  if (i < len) {
    IO::load(p + i, len - i, v);
    IO::load(q + i, len - i, w);
    for (int part = 0; part < IO::kParts; ++part) {
      v[part] = f(v[part], w[part], i + part * Vec::size());
    }
    IO::store(out + i, len - i, v);
  }
}

// Sum of the lanes, in lane order.
template <typename Vec>
inline typename Vec::value_type lane_sum(const Vec& v) {
  using T = typename Vec::value_type;
  alignas(64) T lanes[Vec::size()];
  v.store(lanes);
  T total = 0;
  for (int64_t i = 0; i < Vec::size(); ++i) total += lanes[i];
  return total;
}

// One task per group does both passes when the groups keep every thread busy with balanced work.
// at::parallel_for as a named phase of the torch.profiler trace (tools/cpu_phases.py reads them);
// without an active profiler the record is a thread-local check.
template <typename F>
inline void parallel_phase(const char* name, int64_t begin, int64_t end, int64_t grain,
                           const F& f) {
  RECORD_FUNCTION(name, c10::ArrayRef<const c10::IValue>{});
  at::parallel_for(begin, end, grain, f);
}

inline bool one_task_per_group(int64_t groups) {
  const int64_t threads = at::get_num_threads();
  return groups % threads == 0 || groups >= 4 * threads;
}

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Channels-last tiling: rows of C elements; a block of rows is summed in registers/L1, a task
// covers whole blocks of one n. Shapes only: the same split on any thread count.
struct RowTiling {
  int64_t block_rows, task_rows, tasks_per_n, padded_c;
  RowTiling(int64_t S, int64_t C, int64_t step) {
    block_rows = std::max<int64_t>(1, kChunk / C);
    task_rows = divup(std::max<int64_t>(block_rows, kTaskElements / C), block_rows) * block_rows;
    tasks_per_n = divup(S, task_rows);
    padded_c = divup(C, step) * step;
  }
};

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
}  // namespace fusednorm::cpu::CPU_CAPABILITY
