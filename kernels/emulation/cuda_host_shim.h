// Just enough of CUDA to run the msgfm kernels on the CPU, for tests on machines without a GPU.
//
// A "launch" runs the blocks one after another; the threads of a block are real
// std::threads, __syncthreads is a std::barrier over them, dynamic shared memory is
// one buffer per block (NaN-filled before each block, so reading a shared element
// that was never written shows up), and atomicAdd is std::atomic_ref. This checks
// the indexing, the synchronisation and the arithmetic of the kernel source itself;
// it says nothing about speed, registers or the GPU's shared-memory limits.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <limits>
#include <thread>
#include <vector>

#define MSGFM_EMULATE_CUDA 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#ifndef __restrict__
#define __restrict__
#endif

struct EmulatedDim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local EmulatedDim3 threadIdx;
inline thread_local EmulatedDim3 blockIdx;
inline EmulatedDim3 blockDim;
inline EmulatedDim3 gridDim;
inline std::barrier<>* emulated_block_barrier = nullptr;
inline float* emulated_shared_memory = nullptr;

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }

inline float atomicAdd(float* address, float value) { return std::atomic_ref<float>(*address).fetch_add(value); }

using std::max;
using std::min;

// Run `kernel(args...)` over grid x block threads, as <<<grid, block, shared_bytes>>> would.
template <typename Kernel, typename... Args>
void emulate_launch(EmulatedDim3 grid, EmulatedDim3 block, size_t shared_bytes, Kernel kernel, Args... args) {
  gridDim = grid;
  blockDim = block;
  std::vector<float> shared(shared_bytes / sizeof(float) + 1);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::fill(shared.begin(), shared.end(), std::numeric_limits<float>::quiet_NaN());
      emulated_shared_memory = shared.data();
      std::barrier<> barrier(static_cast<std::ptrdiff_t>(block.x));
      emulated_block_barrier = &barrier;
      std::vector<std::thread> threads;
      threads.reserve(block.x);
      for (unsigned t = 0; t < block.x; ++t) {
        threads.emplace_back([=] {
          threadIdx = EmulatedDim3{t, 0, 0};
          blockIdx = EmulatedDim3{bx, by, 0};
          kernel(args...);
        });
      }
      for (auto& thread : threads) thread.join();
    }
  }
}
