// Fused Swin window attention: input checks, dispatch over dtype and head dim, and
// checked launches. The kernels and their design notes are in
// window_attention_kernels.cuh.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <tuple>
#include <type_traits>

#include "common.cuh"
#include "msgfm_kernels.h"
#include "window_attention_kernels.cuh"

namespace msgfm {
namespace {

template <typename F>
void dispatch_head_dim(int64_t head_dim, F&& launch) {
  switch (head_dim) {
    case 16: launch(std::integral_constant<int, 16>{}); break;
    case 32: launch(std::integral_constant<int, 32>{}); break;
    case 64: launch(std::integral_constant<int, 64>{}); break;
    default:
      TORCH_CHECK_VALUE(false, "msgfm fused window attention supports head dims 16, 32 and 64, got ", head_dim,
                        "; use kernels.attention=sdpa for this model");
  }
}

// Checks shared by forward and backward; returns (B_, N, C, nW).
std::tuple<int64_t, int64_t, int64_t, int64_t> check_attention_inputs(
    const char* op, const at::Tensor& qkv, const at::Tensor& table, const at::Tensor& rel_index,
    const std::optional<at::Tensor>& mask, int64_t num_heads) {
  TORCH_CHECK_VALUE(qkv.is_cuda(), op, ": qkv must be a CUDA tensor, got ", qkv.device());
  TORCH_CHECK_VALUE(qkv.dim() == 3, op, ": qkv must be [B_, N, 3C], got ", qkv.sizes());
  TORCH_CHECK_VALUE(qkv.is_contiguous(), op, ": qkv must be contiguous");
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                    ": qkv must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(num_heads >= 1 && qkv.size(2) % (3 * num_heads) == 0, op, ": last dim ", qkv.size(2),
                    " of qkv is not 3 x num_heads (", num_heads, ") x head_dim");
  const int64_t B_ = qkv.size(0), N = qkv.size(1), C = qkv.size(2) / 3;
  TORCH_CHECK_VALUE(N >= 1 && N <= kMaxTokens, op, ": ", N, " tokens per window; the kernel takes 1..", kMaxTokens,
                    " (window size up to 16)");
  TORCH_CHECK_VALUE(table.device() == qkv.device() && table.scalar_type() == at::kFloat &&
                        table.dim() == 2 && table.size(1) == num_heads && table.is_contiguous(),
                    op, ": bias table must be a contiguous fp32 [T, num_heads] tensor on ", qkv.device(),
                    ", got ", table.scalar_type(), " ", table.sizes(), " on ", table.device());
  TORCH_CHECK_VALUE(rel_index.device() == qkv.device() && rel_index.scalar_type() == at::kLong &&
                        rel_index.dim() == 2 && rel_index.size(0) == N && rel_index.size(1) == N &&
                        rel_index.is_contiguous(),
                    op, ": rel_index must be a contiguous int64 [N, N] tensor on ", qkv.device(), " with N=", N,
                    ", got ", rel_index.scalar_type(), " ", rel_index.sizes());
  int64_t nW = 1;
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK_VALUE(m.device() == qkv.device() && m.scalar_type() == at::kFloat && m.dim() == 3 &&
                          m.size(1) == N && m.size(2) == N && m.is_contiguous() && m.size(0) >= 1,
                      op, ": mask must be a contiguous fp32 [nW, N, N] tensor with N=", N, ", got ", m.scalar_type(),
                      " ", m.sizes());
    nW = m.size(0);
    TORCH_CHECK_VALUE(B_ % nW == 0, op, ": ", B_, " windows in the batch is not a multiple of the ", nW,
                      " windows per image of the mask");
  }
  TORCH_CHECK_VALUE(B_ <= INT32_MAX, op, ": too many windows (", B_, ")");
  return {B_, N, C, nW};
}

AttentionArgs make_args(const at::Tensor& table, const at::Tensor& rel_index,
                        const std::optional<at::Tensor>& mask, int64_t N, int64_t num_heads, int64_t nW,
                        double scale) {
  return AttentionArgs{table.data_ptr<float>(), rel_index.data_ptr<int64_t>(),
                       mask.has_value() ? mask->data_ptr<float>() : nullptr, static_cast<int>(N),
                       static_cast<int>(num_heads), static_cast<int>(nW), static_cast<float>(scale)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_forward(
    const at::Tensor& qkv_BN3C, const at::Tensor& bias_table_TH, const at::Tensor& rel_index_NN,
    const std::optional<at::Tensor>& mask_WNN, int64_t num_heads, double scale) {
  int64_t B_, N, C, nW;
  std::tie(B_, N, C, nW) =
      check_attention_inputs("window_attention_forward", qkv_BN3C, bias_table_TH, rel_index_NN, mask_WNN, num_heads);
  const c10::cuda::CUDAGuard guard(qkv_BN3C.device());
  auto out_BNC = at::empty({B_, N, C}, qkv_BN3C.options());
  auto lse_BHN = at::empty({B_, num_heads, N}, qkv_BN3C.options().dtype(at::kFloat));
  if (B_ == 0) return {out_BNC, lse_BHN};
  const AttentionArgs args = make_args(bias_table_TH, rel_index_NN, mask_WNN, N, num_heads, nW, scale);
  const dim3 grid(static_cast<unsigned>(B_), static_cast<unsigned>(num_heads));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MSGFM_DISPATCH_FLOAT_HALF_BF16(qkv_BN3C.scalar_type(), "window_attention_forward", [&] {
    dispatch_head_dim(C / num_heads, [&](auto head_dim) {
      constexpr int D = decltype(head_dim)::value;
      const size_t smem = attention_fwd_shared_bytes<D>();
      window_attention_fwd_kernel<scalar_t, D><<<grid, attention_threads(static_cast<int>(N)), smem, stream>>>(
          qkv_BN3C.data_ptr<scalar_t>(), out_BNC.data_ptr<scalar_t>(), lse_BHN.data_ptr<float>(), args);
      MSGFM_CHECK_LAUNCH("window_attention_fwd_kernel");
    });
  });
  return {out_BNC, lse_BHN};
}

std::tuple<at::Tensor, at::Tensor> window_attention_backward(
    const at::Tensor& grad_out_BNC, const at::Tensor& qkv_BN3C, const at::Tensor& out_BNC,
    const at::Tensor& lse_BHN, const at::Tensor& bias_table_TH, const at::Tensor& rel_index_NN,
    const std::optional<at::Tensor>& mask_WNN, int64_t num_heads, double scale) {
  int64_t B_, N, C, nW;
  std::tie(B_, N, C, nW) =
      check_attention_inputs("window_attention_backward", qkv_BN3C, bias_table_TH, rel_index_NN, mask_WNN, num_heads);
  for (const auto* t : {&grad_out_BNC, &out_BNC}) {
    TORCH_CHECK_VALUE(t->device() == qkv_BN3C.device() && t->scalar_type() == qkv_BN3C.scalar_type() &&
                          t->is_contiguous() && t->dim() == 3 && t->size(0) == B_ && t->size(1) == N &&
                          t->size(2) == C,
                      "window_attention_backward: grad_out and out must be contiguous [", B_, ", ", N, ", ", C,
                      "] ", qkv_BN3C.scalar_type(), " tensors, got ", t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK_VALUE(lse_BHN.device() == qkv_BN3C.device() && lse_BHN.scalar_type() == at::kFloat &&
                        lse_BHN.is_contiguous() && lse_BHN.numel() == B_ * num_heads * N,
                    "window_attention_backward: lse must be the contiguous fp32 [B_, H, N] tensor of the forward");
  const c10::cuda::CUDAGuard guard(qkv_BN3C.device());
  auto grad_qkv_BN3C = at::empty_like(qkv_BN3C);
  auto grad_bias_HNN = at::zeros({num_heads, N, N}, qkv_BN3C.options().dtype(at::kFloat));
  if (B_ == 0) return {grad_qkv_BN3C, grad_bias_HNN};
  const AttentionArgs args = make_args(bias_table_TH, rel_index_NN, mask_WNN, N, num_heads, nW, scale);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MSGFM_DISPATCH_FLOAT_HALF_BF16(qkv_BN3C.scalar_type(), "window_attention_backward", [&] {
    dispatch_head_dim(C / num_heads, [&](auto head_dim) {
      constexpr int D = decltype(head_dim)::value;
      const AttentionBwdLaunch launch = attention_bwd_launch(static_cast<int>(N), D);
      const dim3 grid(static_cast<unsigned>((B_ + launch.windows_per_block - 1) / launch.windows_per_block),
                      static_cast<unsigned>(num_heads));
      window_attention_bwd_kernel<scalar_t, D>
          <<<grid, attention_threads(static_cast<int>(N)), launch.shared_bytes, stream>>>(
              grad_out_BNC.data_ptr<scalar_t>(), qkv_BN3C.data_ptr<scalar_t>(), out_BNC.data_ptr<scalar_t>(),
              lse_BHN.data_ptr<float>(), grad_qkv_BN3C.data_ptr<scalar_t>(), grad_bias_HNN.data_ptr<float>(), args,
              static_cast<int>(B_), launch.windows_per_block, launch.bias_in_shared);
      MSGFM_CHECK_LAUNCH("window_attention_bwd_kernel");
    });
  });
  return {grad_qkv_BN3C, grad_bias_HNN};
}

}  // namespace msgfm
