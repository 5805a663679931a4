// Just enough of CUDA, on the CPU, to run the CUDA launchers and kernels of ../ without a GPU
// (see check.py). Blocks run one after another; the threads of a block run as coroutines
// (ucontext) on one OS thread, switched at __syncthreads and at warp shuffles, which wait for
// every live thread of the block / warp. Logic only: no timing, no memory model.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // one block at a time: a static is that block's shared memory

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
inline uint3 blockIdx, gridDim, blockDim, threadIdx;

namespace emulation {

constexpr int kWarp = 32;
constexpr size_t kStack = 256 * 1024;
enum class State { kRunning, kAtSync, kAtWarp, kDone };

struct Thread {
  ucontext_t context;
  std::vector<char> stack;
  State state;
};

// The threads of the block being run, and the scheduler's context.
struct Block {
  std::vector<Thread> threads;
  ucontext_t scheduler;
  int current = 0;
  std::function<void()> body;
  std::vector<double> exchange;
};
inline Block block;
inline int sm_count = 2;  // few "SMs": small shapes already take the split paths

inline void entry() {
  block.body();
  block.threads[block.current].state = State::kDone;
  // returns to uc_link: the scheduler
}

inline void wait(State state) {
  Thread& t = block.threads[block.current];
  t.state = state;
  swapcontext(&t.context, &block.scheduler);
}

inline void set_thread_index(int t) {
  threadIdx = {t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
}

// Runs every thread until it waits or ends; releases a barrier when all of its live threads
// wait at it (the block for __syncthreads, a warp for shuffles), until all have ended.
inline void run_block(int size) {
  block.threads.resize(size);
  block.exchange.assign((size + kWarp - 1) / kWarp * kWarp, 0.0);
  for (int t = 0; t < size; ++t) {
    Thread& th = block.threads[t];
    th.stack.resize(kStack);
    th.state = State::kRunning;
    getcontext(&th.context);
    th.context.uc_stack.ss_sp = th.stack.data();
    th.context.uc_stack.ss_size = kStack;
    th.context.uc_link = &block.scheduler;
    makecontext(&th.context, entry, 0);
  }
  for (;;) {
    for (int t = 0; t < size; ++t) {
      if (block.threads[t].state != State::kRunning) continue;
      block.current = t;
      set_thread_index(t);
      swapcontext(&block.scheduler, &block.threads[t].context);
    }
    bool all_done = true, all_at_sync = true, released = false;
    for (const Thread& th : block.threads) {
      all_done &= th.state == State::kDone;
      all_at_sync &= th.state == State::kDone || th.state == State::kAtSync;
    }
    if (all_done) return;
    if (all_at_sync) {
      for (Thread& th : block.threads) {
        if (th.state == State::kAtSync) th.state = State::kRunning;
      }
      continue;
    }
    for (int w = 0; w * kWarp < size; ++w) {
      bool waiting = false, all_at_warp = true;
      for (int t = w * kWarp; t < std::min(size, (w + 1) * kWarp); ++t) {
        const State s = block.threads[t].state;
        waiting |= s == State::kAtWarp;
        all_at_warp &= s == State::kDone || s == State::kAtWarp;
      }
      if (waiting && all_at_warp) {
        for (int t = w * kWarp; t < std::min(size, (w + 1) * kWarp); ++t) {
          if (block.threads[t].state == State::kAtWarp) block.threads[t].state = State::kRunning;
        }
        released = true;
      }
    }
    TORCH_CHECK(released, "emulated block deadlocked at a barrier");
  }
}

}  // namespace emulation

inline void __syncthreads() { emulation::wait(emulation::State::kAtSync); }

template <typename T>
T __shfl_down_sync(unsigned, T value, int offset) {
  using namespace emulation;
  const int warp = block.current / kWarp, lane = block.current % kWarp;
  double* slots = block.exchange.data() + warp * kWarp;
  slots[lane] = static_cast<double>(value);
  wait(State::kAtWarp);
  const T out = lane + offset < kWarp ? static_cast<T>(slots[lane + offset]) : value;
  wait(State::kAtWarp);  // every lane has read before any writes its next value
  return out;
}

// kernel<<<grid, block>>>(args...) becomes emulated_launch(&kernel, grid, block, args...).
template <typename... Params, typename... Args>
void emulated_launch(void (*kernel)(Params...), dim3 grid, dim3 block_dim, Args&&... args) {
  gridDim = {grid.x, grid.y, grid.z};
  blockDim = {block_dim.x, block_dim.y, block_dim.z};
  emulation::block.body = [&] { kernel(static_cast<Params>(args)...); };
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      blockIdx = {bx, by, 0};
      emulation::run_block(static_cast<int>(block_dim.x * block_dim.y * block_dim.z));
    }
  }
}

// The CUDA runtime and c10::cuda calls of the launchers.
using cudaStream_t = void*;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };
inline int cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = emulation::sm_count;
  return 0;
}
#define C10_CUDA_KERNEL_LAUNCH_CHECK() (void)0
#define C10_CUDA_CHECK(expr) (void)(expr)
namespace c10::cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
inline c10::DeviceIndex current_device() { return 0; }
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda

// CUDA's erfinv: Newton's method on std::erf.
inline double erfinv(double y) {
  double x = 0;
  for (int i = 0; i < 100; ++i) {
    const double step = (std::erf(x) - y) / (1.1283791670955126 * std::exp(-x * x));
    x -= step;
    if (std::abs(step) < 1e-16) break;
  }
  return x;
}
