// Fused Swin window process: checks, the choice of copy unit, and checked launches.
// The kernel and the index map are in window_process_kernels.cuh.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "msgfm_kernels.h"
#include "window_process_kernels.cuh"

namespace msgfm {
namespace {

template <bool kPartition>
void launch_window_copy(const at::Tensor& src, at::Tensor& dst, int64_t height, int64_t width,
                        int64_t window, int64_t shift, const char* kernel_name) {
  const int64_t row_bytes = src.size(-1) * src.element_size();
  const auto src_addr = reinterpret_cast<uintptr_t>(src.data_ptr());
  const auto dst_addr = reinterpret_cast<uintptr_t>(dst.data_ptr());
  int unit = 16;
  while (unit > 1 && (row_bytes % unit != 0 || src_addr % unit != 0 || dst_addr % unit != 0)) unit /= 2;
  WindowGeometry g{src.numel() * src.element_size() / unit, static_cast<int>(row_bytes / unit),
                   static_cast<int>(height), static_cast<int>(width), static_cast<int>(window),
                   static_cast<int>(shift)};
  if (g.total_units == 0) return;
  constexpr int kThreads = 256;
  // Grid-stride loop: enough blocks to fill the GPU, capped so the grid stays valid.
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((g.total_units + kThreads - 1) / kThreads, 1 << 20));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const void* s = src.data_ptr();
  void* d = dst.data_ptr();
  switch (unit) {
    case 16:
      window_copy_kernel<uint4, kPartition><<<blocks, kThreads, 0, stream>>>(
          static_cast<const uint4*>(s), static_cast<uint4*>(d), g);
      break;
    case 8:
      window_copy_kernel<uint2, kPartition><<<blocks, kThreads, 0, stream>>>(
          static_cast<const uint2*>(s), static_cast<uint2*>(d), g);
      break;
    case 4:
      window_copy_kernel<uint32_t, kPartition><<<blocks, kThreads, 0, stream>>>(
          static_cast<const uint32_t*>(s), static_cast<uint32_t*>(d), g);
      break;
    case 2:
      window_copy_kernel<uint16_t, kPartition><<<blocks, kThreads, 0, stream>>>(
          static_cast<const uint16_t*>(s), static_cast<uint16_t*>(d), g);
      break;
    default:
      window_copy_kernel<uint8_t, kPartition><<<blocks, kThreads, 0, stream>>>(
          static_cast<const uint8_t*>(s), static_cast<uint8_t*>(d), g);
  }
  MSGFM_CHECK_LAUNCH(kernel_name);
}

void check_geometry(const char* op, int64_t height, int64_t width, int64_t window, int64_t shift) {
  TORCH_CHECK_VALUE(window >= 1 && height >= 1 && width >= 1 && height % window == 0 && width % window == 0, op,
                    ": window size ", window, " must divide the ", height, "x", width, " feature map");
  TORCH_CHECK_VALUE(shift >= 0 && shift < window, op, ": shift size ", shift, " must be in [0, ", window, ")");
}

}  // namespace

at::Tensor window_partition(const at::Tensor& x_BHWC, int64_t window_size, int64_t shift_size) {
  TORCH_CHECK_VALUE(x_BHWC.is_cuda() && x_BHWC.dim() == 4 && x_BHWC.is_contiguous(),
                    "window_partition: x must be a contiguous CUDA [B, H, W, C] tensor, got ", x_BHWC.sizes(),
                    " on ", x_BHWC.device());
  const int64_t B = x_BHWC.size(0), H = x_BHWC.size(1), W = x_BHWC.size(2), C = x_BHWC.size(3);
  check_geometry("window_partition", H, W, window_size, shift_size);
  const c10::cuda::CUDAGuard guard(x_BHWC.device());
  const int64_t nW = (H / window_size) * (W / window_size);
  auto windows_BNC = at::empty({B * nW, window_size * window_size, C}, x_BHWC.options());
  launch_window_copy<true>(x_BHWC, windows_BNC, H, W, window_size, shift_size, "window_partition_kernel");
  return windows_BNC;
}

at::Tensor window_merge(const at::Tensor& windows_BNC, int64_t window_size, int64_t shift_size,
                           int64_t height, int64_t width) {
  check_geometry("window_merge", height, width, window_size, shift_size);
  const int64_t nW = (height / window_size) * (width / window_size);
  TORCH_CHECK_VALUE(windows_BNC.is_cuda() && windows_BNC.dim() == 3 && windows_BNC.is_contiguous() &&
                        windows_BNC.size(1) == window_size * window_size && windows_BNC.size(0) % nW == 0,
                    "window_merge: windows must be a contiguous CUDA [B * ", nW, ", ", window_size * window_size,
                    ", C] tensor for a ", height, "x", width, " map, got ", windows_BNC.sizes());
  const c10::cuda::CUDAGuard guard(windows_BNC.device());
  const int64_t B = windows_BNC.size(0) / nW;
  auto x_BHWC = at::empty({B, height, width, windows_BNC.size(2)}, windows_BNC.options());
  launch_window_copy<false>(windows_BNC, x_BHWC, height, width, window_size, shift_size, "window_merge_kernel");
  return x_BHWC;
}

}  // namespace msgfm
