// C entry points (for ctypes) that run the kernel source of kernels/*_kernels.cuh on the CPU
// through cuda_host_shim.h. Built by tests/test_kernels_emulated.py with the host compiler;
// never part of the extension (kernel_build only compiles the top level of kernels/).
//
// dtype codes: 0 float32, 1 float16, 2 bfloat16. Return value: 0 ok, 1 unsupported head dim
// or dtype, 2 unsupported copy unit.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "cuda_host_shim.h"
#include "../window_attention_kernels.cuh"
#include "../window_process_kernels.cuh"

namespace {

struct Bytes16 {  // stands in for CUDA's uint4
  uint64_t lo, hi;
};

template <typename F>
int with_dtype_and_head_dim(int dtype, int head_dim, F&& run) {
  auto with_dim = [&](auto type_tag) {
    switch (head_dim) {
      case 16: run(type_tag, std::integral_constant<int, 16>{}); return 0;
      case 32: run(type_tag, std::integral_constant<int, 32>{}); return 0;
      case 64: run(type_tag, std::integral_constant<int, 64>{}); return 0;
      default: return 1;
    }
  };
  switch (dtype) {
    case 0: return with_dim(std::type_identity<float>{});
    case 1: return with_dim(std::type_identity<c10::Half>{});
    case 2: return with_dim(std::type_identity<c10::BFloat16>{});
    default: return 1;
  }
}

}  // namespace

extern "C" int msgfm_emulate_attention_forward(int dtype, const void* qkv, const float* table, const int64_t* rel_index,
                                               const float* mask, void* out, float* lse, int windows, int N,
                                               int heads, int head_dim, int mask_windows, float scale) {
  const msgfm::AttentionArgs args{table, rel_index, mask, N, heads, mask_windows, scale};
  return with_dtype_and_head_dim(dtype, head_dim, [&](auto type_tag, auto dim) {
    using scalar_t = typename decltype(type_tag)::type;
    constexpr int D = decltype(dim)::value;
    emulate_launch({static_cast<unsigned>(windows), static_cast<unsigned>(heads), 1},
                   {static_cast<unsigned>(msgfm::attention_threads(N)), 1, 1},
                   msgfm::attention_fwd_shared_bytes<D>(), msgfm::window_attention_fwd_kernel<scalar_t, D>,
                   static_cast<const scalar_t*>(qkv), static_cast<scalar_t*>(out), lse, args);
  });
}

extern "C" int msgfm_emulate_attention_backward(int dtype, const void* grad_out, const void* qkv, const void* out,
                                                const float* lse, const float* table, const int64_t* rel_index,
                                                const float* mask, void* grad_qkv, float* grad_bias, int windows,
                                                int N, int heads, int head_dim, int mask_windows, float scale) {
  const msgfm::AttentionArgs args{table, rel_index, mask, N, heads, mask_windows, scale};
  return with_dtype_and_head_dim(dtype, head_dim, [&](auto type_tag, auto dim) {
    using scalar_t = typename decltype(type_tag)::type;
    constexpr int D = decltype(dim)::value;
    const msgfm::AttentionBwdLaunch launch = msgfm::attention_bwd_launch(N, D);
    const auto blocks = static_cast<unsigned>((windows + launch.windows_per_block - 1) / launch.windows_per_block);
    emulate_launch({blocks, static_cast<unsigned>(heads), 1},
                   {static_cast<unsigned>(msgfm::attention_threads(N)), 1, 1},
                   launch.shared_bytes, msgfm::window_attention_bwd_kernel<scalar_t, D>,
                   static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(qkv),
                   static_cast<const scalar_t*>(out), lse, static_cast<scalar_t*>(grad_qkv), grad_bias, args,
                   windows, launch.windows_per_block, launch.bias_in_shared);
  });
}

// partition != 0: windows <- map; else map <- windows. `unit` bytes per thread (16, 4 or 2); a small
// grid (3 blocks of 64 threads) so the grid-stride loop is exercised.
extern "C" int msgfm_emulate_window_copy(int partition, int unit, const void* src, void* dst, int64_t total_bytes,
                                         int row_bytes, int height, int width, int window, int shift) {
  const msgfm::WindowGeometry geometry{total_bytes / unit, row_bytes / unit, height, width, window, shift};
  auto run = [&](auto type_tag) {
    using vec_t = typename decltype(type_tag)::type;
    const auto* s = static_cast<const vec_t*>(src);
    auto* d = static_cast<vec_t*>(dst);
    if (partition) {
      emulate_launch({3, 1, 1}, {64, 1, 1}, 0, msgfm::window_copy_kernel<vec_t, true>, s, d, geometry);
    } else {
      emulate_launch({3, 1, 1}, {64, 1, 1}, 0, msgfm::window_copy_kernel<vec_t, false>, s, d, geometry);
    }
    return 0;
  };
  switch (unit) {
    case 16: return run(std::type_identity<Bytes16>{});
    case 4: return run(std::type_identity<uint32_t>{});
    case 2: return run(std::type_identity<uint16_t>{});
    default: return 2;
  }
}
