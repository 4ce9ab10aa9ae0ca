// An emulation of the part of CUDA's thread model that crates/engine/kernels use, so that the
// kernels compile as C++ and run on the CPU in tests (cuda_kernels_emulated.rs): no GPU is
// needed to check their indexing, reductions and numerics. A block's threads are real threads
// (std::thread), __syncthreads is a barrier over them, and a warp shuffle is an exchange
// through a per-warp buffer between two barriers over the warp's 32 threads. Blocks run one
// after another, so a `static` array stands for __shared__ memory.
//
// What it cannot show: speed, memory coalescing, and bugs that only the GPU's memory model or
// divergent shuffles would expose. Forced in with `-include`.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emu {
struct Warp {
  std::barrier<> bar{32};
  uint32_t buf[32];
};
struct Thread {
  dim3 thread, block;
  std::barrier<> *block_bar;
  Warp *warp;
};
inline thread_local Thread self;
inline dim3 block_dim, grid_dim;
} // namespace emu

#define threadIdx (emu::self.thread)
#define blockIdx (emu::self.block)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::self.block_bar->arrive_and_wait(); }

// Float32 arithmetic rounded to nearest, never fused (the harness is built with
// -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }

// Reinterpretations of a float's bits.
inline uint32_t __float_as_uint(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}
inline float __uint_as_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

inline long long __double_as_longlong(double x) {
  long long bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

// Atomic read-modify-write of a (shared) word, returning the old value.
inline uint32_t atomicAdd(uint32_t *address, uint32_t v) {
  return std::atomic_ref<uint32_t>(*address).fetch_add(v);
}

namespace emu {
// A warp-wide exchange of 32 bits; every lane of the warp must call it (full mask, uniform
// control flow).
inline uint32_t shfl_xor_bits(unsigned mask, uint32_t bits, int lane_mask) {
  if (mask != 0xffffffffu) std::abort();
  Warp *w = self.warp;
  unsigned lane = self.thread.x % 32u;
  w->buf[lane] = bits;
  w->bar.arrive_and_wait();
  uint32_t r = w->buf[lane ^ (unsigned)lane_mask];
  w->bar.arrive_and_wait();
  return r;
}
} // namespace emu

inline uint32_t __shfl_xor_sync(unsigned mask, uint32_t v, int lane_mask) {
  return emu::shfl_xor_bits(mask, v, lane_mask);
}

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits = emu::shfl_xor_bits(mask, bits, lane_mask);
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

namespace emu {
// Runs `kernel(args...)` over a grid of up to three dimensions of one-dimensional blocks whose
// width is a multiple of 32 (the kernels' warps are whole).
template <typename... P, typename... A>
void launch(dim3 grid, unsigned threads, void (*kernel)(P...), A... args) {
  if (threads % 32u != 0) std::abort();
  grid_dim = grid;
  block_dim = dim3{threads, 1, 1};
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(threads);
        std::vector<Warp> warps(threads / 32u);
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            self = Thread{dim3{t, 0, 0}, dim3{bx, by, bz}, &bar, &warps[t / 32u]};
            kernel(args...);
          });
        }
        for (auto &th : pool) th.join();
      }
    }
  }
}
} // namespace emu
