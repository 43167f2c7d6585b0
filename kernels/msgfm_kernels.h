// Host entry points of the msgfm CUDA extension (bound to Python in bindings.cpp).
//
// Legend: B_ = windows in the batch (batch x windows per image), N = tokens per
// window, C = channels, H = heads, D = C / H, T = rows of the relative position
// bias table, nW = windows per image (rows of the shift mask).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/ATen.h>

namespace msgfm {

// Largest window the attention kernels take (one thread per token row; 256
// threads keep up to 255 registers per thread available for the D=64 backward).
constexpr int kMaxTokens = 256;

// out_BNC [B_, N, C] (dtype of qkv), lse_BHN [B_, H, N] (fp32 row log-sum-exp).
std::tuple<at::Tensor, at::Tensor> window_attention_forward(
    const at::Tensor& qkv_BN3C, const at::Tensor& bias_table_TH, const at::Tensor& rel_index_NN,
    const std::optional<at::Tensor>& mask_WNN, int64_t num_heads, double scale);

// grad_qkv_BN3C [B_, N, 3C] (dtype of qkv), grad_bias_HNN [H, N, N] fp32 (summed over windows;
// the caller scatters it into the table rows through rel_index).
std::tuple<at::Tensor, at::Tensor> window_attention_backward(
    const at::Tensor& grad_out_BNC, const at::Tensor& qkv_BN3C, const at::Tensor& out_BNC,
    const at::Tensor& lse_BHN, const at::Tensor& bias_table_TH, const at::Tensor& rel_index_NN,
    const std::optional<at::Tensor>& mask_WNN, int64_t num_heads, double scale);

// [B, H, W, C] -> [B * nW, N, C]: cyclic shift by -shift, then cut into windows.
at::Tensor window_partition(const at::Tensor& x_BHWC, int64_t window_size, int64_t shift_size);

// [B * nW, N, C] -> [B, H, W, C]: stitch the windows, then cyclic shift by +shift.
at::Tensor window_merge(const at::Tensor& windows_BNC, int64_t window_size, int64_t shift_size,
                           int64_t height, int64_t width);

}  // namespace msgfm
