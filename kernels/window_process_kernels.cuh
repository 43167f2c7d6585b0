// Fused Swin window process: cyclic shift + window partition, and window merge +
// reverse shift, each one pass over memory. The device code, shared by
// window_process.cu and the CPU emulation in kernels/emulation/.
//
// Legend: B batch, H/W feature-map height/width, C channels, ws window size,
// nW = (H / ws) * (W / ws) windows per image, N = ws * ws tokens per window.
//
// Token n of window w of image b (the windowed layout [B * nW, N, C]) is the
// feature-map pixel
//     y = ((w / (W / ws)) * ws + n / ws + shift) % H,
//     x = ((w % (W / ws)) * ws + n % ws + shift) % W
// of [B, H, W, C]. Partition gathers from that pixel (torch.roll by -shift, then
// cut); merge writes to it (stitch, then torch.roll by +shift). The map is a
// permutation, so partition's backward is merge and merge's backward is partition,
// and every output element is written exactly once.
//
// The copy is dtype-agnostic: each thread moves one `vec_t` (16, 8, 4 or 2 bytes)
// of a token's channel row, the widest unit that divides the row and the pointers.
#pragma once

#include <cstdint>

#include "device_common.cuh"

namespace msgfm {

struct WindowGeometry {
  int64_t total_units;  // B * H * W * row_units
  int row_units;        // vec_t units per token (C * element size / sizeof(vec_t))
  int height;
  int width;
  int window;
  int shift;
};

template <typename vec_t, bool kPartition>
__global__ void window_copy_kernel(const vec_t* __restrict__ src, vec_t* __restrict__ dst, WindowGeometry g) {
  const int tokens_per_window = g.window * g.window;
  const int windows_x = g.width / g.window;
  const int windows_per_image = (g.height / g.window) * windows_x;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < g.total_units; t += stride) {
    const int64_t token = t / g.row_units;  // index in the windowed layout
    const int unit = static_cast<int>(t - token * g.row_units);
    const int64_t window_index = token / tokens_per_window;
    const int n = static_cast<int>(token - window_index * tokens_per_window);
    const int64_t b = window_index / windows_per_image;
    const int w = static_cast<int>(window_index - b * windows_per_image);
    const int y = ((w / windows_x) * g.window + n / g.window + g.shift) % g.height;
    const int x = ((w % windows_x) * g.window + n % g.window + g.shift) % g.width;
    const int64_t pixel = ((b * g.height + y) * g.width + x) * g.row_units + unit;
    if (kPartition) {
      dst[t] = src[pixel];
    } else {
      dst[pixel] = src[t];
    }
  }
}

}  // namespace msgfm
