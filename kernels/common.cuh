// Shared helpers of the msgfm CUDA kernels: launch checks that name the kernel,
// and float conversion of the storage types (fp32, fp16, bf16).
//
// Everything here builds for sm_70 and newer: the kernels load and store in the
// tensor's dtype and do all arithmetic in fp32, so bf16 needs no sm_80
// instruction (c10::BFloat16 converts with integer bit operations on sm_70).
#pragma once

#include <cuda_runtime.h>

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace msgfm {

// Launch errors (bad grid, too many registers or shared memory) are reported by
// cudaGetLastError right after the launch; faults inside a kernel surface at the
// next synchronisation, so the message points to CUDA_LAUNCH_BLOCKING for those.
#define MSGFM_CHECK_LAUNCH(kernel_name)                                                          \
  do {                                                                                           \
    const cudaError_t msgfm_err_ = cudaGetLastError();                                           \
    TORCH_CHECK(msgfm_err_ == cudaSuccess, "msgfm CUDA kernel '", kernel_name,                   \
                "' failed to launch: ", cudaGetErrorString(msgfm_err_),                          \
                " (rerun with CUDA_LAUNCH_BLOCKING=1 to locate asynchronous errors)");           \
  } while (0)

// A checked CUDA runtime call; `what` names the kernel or operation it serves.
#define MSGFM_CUDA_CHECK(call, what)                                                             \
  do {                                                                                           \
    const cudaError_t msgfm_err_ = (call);                                                       \
    TORCH_CHECK(msgfm_err_ == cudaSuccess, "msgfm CUDA call ", #call, " for '", what,            \
                "' failed: ", cudaGetErrorString(msgfm_err_));                                   \
  } while (0)

// The three storage types the kernels take (double is rejected before dispatch).
#define MSGFM_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)           \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(c10::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float x) {
  return static_cast<scalar_t>(x);
}

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace msgfm
