// Host-side helpers of the msgfm CUDA kernels: launch checks that name the kernel,
// and the dtype dispatch. Device helpers are in device_common.cuh.
#pragma once

#include <cuda_runtime.h>

#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include "device_common.cuh"

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

// The three storage types the kernels take (double is rejected before dispatch).
#define MSGFM_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)           \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace msgfm
