// Device-side helpers of the msgfm kernels, shared with the CPU emulation
// (kernels/emulation/cuda_host_shim.h defines MSGFM_EMULATE_CUDA and the CUDA keywords).
//
// Everything here builds for sm_70 and newer: the kernels load and store in the
// tensor's dtype and do all arithmetic in fp32, so bf16 needs no sm_80
// instruction (c10::BFloat16 converts with integer bit operations on sm_70).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// The block's dynamic shared memory as a float array (sized at launch).
#ifdef MSGFM_EMULATE_CUDA
#define MSGFM_DYNAMIC_SHARED_FLOATS(name) float* name = emulated_shared_memory
#else
#define MSGFM_DYNAMIC_SHARED_FLOATS(name) extern __shared__ float name[]
#endif

namespace msgfm {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(c10::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float x) {
  return static_cast<scalar_t>(x);
}

}  // namespace msgfm
