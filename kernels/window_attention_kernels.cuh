// Fused Swin window attention, forward and backward: the device code.
//
// Included by window_attention.cu (launchers, checks) and by the CPU emulation of
// kernels/emulation/ (tests without a GPU), so both run the same source.
//
// Legend: B_ windows in the batch, N tokens per window, C channels, H heads,
// D = C / H head dim, T bias-table rows, nW windows per image (mask rows).
//
//   qkv_BN3C [B_, N, 3C]  (the qkv projection output as it is: q | k | v, each [H, D])
//   S = (q * scale) k^T + table[rel_index] + mask[b % nW]          (per window b, head h)
//   out_BNC [B_, N, C] = softmax(S) v, written where the output projection reads it
//   lse_BHN [B_, H, N]  = row log-sum-exp of S, the only thing kept for backward
//
// Forward: one thread block per (window, head); backward: one per (kBwdWindowsPerBlock
// windows, head) when the bias sum fits in shared memory, else per (window, head).
// One thread per token row. K and V (or Q and
// dO in the second backward phase) are staged through shared memory in tiles of
// kTile rows as fp32, and every thread of a warp reads the same shared element at
// a time (a broadcast, no bank conflicts). The softmax is computed online (running
// max and sum), so the N x N attention matrix never exists in memory.
//
// Backward recomputes S from q, k and the saved lse, in two phases per window:
//   A (thread = query row i): dq_i = scale * sum_j dS_ij k_j
//   B (thread = key row j):   dv_j = sum_i P_ij do_i,  dk_j = scale * sum_i dS_ij q_i,
//                             grad_bias[h, i, j] += dS_ij
// with P = exp(S - lse), dS = P (do v^T - delta), delta_i = do_i . out_i.
// The bias gradient is summed over windows in fp32 into an [H, N, N] buffer: a block
// takes kBwdWindowsPerBlock windows of one head and sums their dS in shared memory
// (thread j owns column j, so no atomics there), then adds the sum to the buffer with
// one fp32 atomicAdd per entry; when the [N, N] sum does not fit in shared memory
// (window 12), each window adds its dS with atomics directly (in phase B, where a
// warp's 32 atomics hit consecutive addresses). The caller scatters the buffer into
// the table rows with index_add (many (i, j) pairs share a table row). fp16/bf16
// atomics are never used.
#pragma once

#include <cstdint>

#include "device_common.cuh"

namespace msgfm {

constexpr int kTile = 64;  // rows of K/V (or Q/dO) staged in shared memory per step

// Pointers and sizes shared by the forward and backward kernels.
struct AttentionArgs {
  const float* bias_table;    // [T, H] fp32
  const int64_t* rel_index;   // [N, N]
  const float* mask;          // [nW, N, N] fp32, or nullptr without shift
  int N;
  int H;
  int nW;
  float scale;
};

__device__ __forceinline__ float bias_and_mask(const AttentionArgs& a, const float* mask_w, int h, int i, int j) {
  float extra = a.bias_table[a.rel_index[i * a.N + j] * a.H + h];
  if (mask_w != nullptr) extra += mask_w[i * a.N + j];
  return extra;
}

// Copy rows [row0, row0 + rows) of one head's D-slice at column offset `col` of a
// [N, row_stride] matrix into shared memory as fp32 (optionally scaled).
template <typename scalar_t, int D>
__device__ __forceinline__ void stage_rows(float* dst, const scalar_t* src, int64_t row_stride, int col, int row0,
                                           int rows, float factor) {
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int r = idx / D;
    const int d = idx % D;
    dst[idx] = to_float(src[(int64_t)(row0 + r) * row_stride + col + d]) * factor;
  }
}

template <typename scalar_t, int D>
__global__ void window_attention_fwd_kernel(const scalar_t* __restrict__ qkv, scalar_t* __restrict__ out,
                                            float* __restrict__ lse, AttentionArgs a) {
  MSGFM_DYNAMIC_SHARED_FLOATS(smem);
  float* k_s = smem;             // [kTile, D]
  float* v_s = smem + kTile * D;  // [kTile, D]

  const int b = blockIdx.x;
  const int h = blockIdx.y;
  const int i = threadIdx.x;  // query row of this thread
  const bool active = i < a.N;
  const int C = a.H * D;
  const int64_t row_stride = 3 * (int64_t)C;
  const scalar_t* qkv_b = qkv + (int64_t)b * a.N * row_stride;
  const float* mask_w = a.mask == nullptr ? nullptr : a.mask + (int64_t)(b % a.nW) * a.N * a.N;

  float q[D];
  float acc[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    q[d] = active ? to_float(qkv_b[i * row_stride + h * D + d]) * a.scale : 0.f;
    acc[d] = 0.f;
  }
  float row_max = -INFINITY;
  float row_sum = 0.f;

  for (int j0 = 0; j0 < a.N; j0 += kTile) {
    const int rows = min(kTile, a.N - j0);
    __syncthreads();  // the previous tile is no longer read
    stage_rows<scalar_t, D>(k_s, qkv_b, row_stride, C + h * D, j0, rows, 1.f);
    stage_rows<scalar_t, D>(v_s, qkv_b, row_stride, 2 * C + h * D, j0, rows, 1.f);
    __syncthreads();
    if (!active) continue;
    for (int jj = 0; jj < rows; ++jj) {
      float s = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) s += q[d] * k_s[jj * D + d];
      s += bias_and_mask(a, mask_w, h, i, j0 + jj);
      if (s == -INFINITY) continue;  // a fully masked score adds nothing (and exp(-inf - -inf) is NaN)
      if (s > row_max) {
        const float correction = expf(row_max - s);  // 0 on the first finite score
        row_sum *= correction;
#pragma unroll
        for (int d = 0; d < D; ++d) acc[d] *= correction;
        row_max = s;
      }
      const float p = expf(s - row_max);
      row_sum += p;
#pragma unroll
      for (int d = 0; d < D; ++d) acc[d] += p * v_s[jj * D + d];
    }
  }

  if (!active) return;
  const float inv_sum = 1.f / row_sum;
  scalar_t* out_row = out + ((int64_t)b * a.N + i) * C + h * D;
#pragma unroll
  for (int d = 0; d < D; ++d) out_row[d] = from_float<scalar_t>(acc[d] * inv_sum);
  lse[((int64_t)b * a.H + h) * a.N + i] = row_max + logf(row_sum);
}

// The backward of one window b (all of its rows, one head) by one thread block; `bias_acc`
// is the block's [N, N] shared accumulator of dS, or nullptr to add straight to grad_bias.
template <typename scalar_t, int D>
__device__ __forceinline__ void attention_bwd_window(int b, float* smem, const scalar_t* __restrict__ grad_out,
                                                     const scalar_t* __restrict__ qkv,
                                                     const scalar_t* __restrict__ out, const float* __restrict__ lse,
                                                     scalar_t* __restrict__ grad_qkv, float* __restrict__ grad_bias,
                                                     float* bias_acc, const AttentionArgs& a) {
  float* tile_a = smem;                  // [kTile, D]: K in phase A, scaled Q in phase B
  float* tile_b = smem + kTile * D;      // [kTile, D]: V in phase A, dO in phase B
  float* lse_s = smem + 2 * kTile * D;   // [N]
  float* delta_s = lse_s + a.N;          // [N]

  const int h = blockIdx.y;
  const int t = threadIdx.x;
  const bool active = t < a.N;
  const int C = a.H * D;
  const int64_t qkv_stride = 3 * (int64_t)C;
  const scalar_t* qkv_b = qkv + (int64_t)b * a.N * qkv_stride;
  const scalar_t* dout_b = grad_out + (int64_t)b * a.N * C;
  scalar_t* dqkv_b = grad_qkv + (int64_t)b * a.N * qkv_stride;
  const float* mask_w = a.mask == nullptr ? nullptr : a.mask + (int64_t)(b % a.nW) * a.N * a.N;

  // ---- phase A: thread t is query row i; accumulates dq_i over all keys.
  {
    const int i = t;
    float q[D], dout[D], dq[D];
    float delta = 0.f;
    float row_lse = 0.f;
    if (active) {
      const scalar_t* out_row = out + ((int64_t)b * a.N + i) * C + h * D;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        q[d] = to_float(qkv_b[i * qkv_stride + h * D + d]) * a.scale;
        dout[d] = to_float(dout_b[(int64_t)i * C + h * D + d]);
        delta += dout[d] * to_float(out_row[d]);
        dq[d] = 0.f;
      }
      row_lse = lse[((int64_t)b * a.H + h) * a.N + i];
      lse_s[i] = row_lse;
      delta_s[i] = delta;
    }
    for (int j0 = 0; j0 < a.N; j0 += kTile) {
      const int rows = min(kTile, a.N - j0);
      __syncthreads();
      stage_rows<scalar_t, D>(tile_a, qkv_b, qkv_stride, C + h * D, j0, rows, 1.f);
      stage_rows<scalar_t, D>(tile_b, qkv_b, qkv_stride, 2 * C + h * D, j0, rows, 1.f);
      __syncthreads();
      if (!active) continue;
      for (int jj = 0; jj < rows; ++jj) {
        float s = 0.f, dp = 0.f;
#pragma unroll
        for (int d = 0; d < D; ++d) {
          s += q[d] * tile_a[jj * D + d];
          dp += dout[d] * tile_b[jj * D + d];
        }
        s += bias_and_mask(a, mask_w, h, i, j0 + jj);
        const float ds = expf(s - row_lse) * (dp - delta);
#pragma unroll
        for (int d = 0; d < D; ++d) dq[d] += ds * tile_a[jj * D + d];
      }
    }
    if (active) {
#pragma unroll
      for (int d = 0; d < D; ++d) dqkv_b[i * qkv_stride + h * D + d] = from_float<scalar_t>(dq[d] * a.scale);
    }
  }

  // ---- phase B: thread t is key row j; accumulates dk_j, dv_j over all queries.
  {
    const int j = t;
    float k[D], v[D], dk[D], dv[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
      k[d] = active ? to_float(qkv_b[j * qkv_stride + C + h * D + d]) : 0.f;
      v[d] = active ? to_float(qkv_b[j * qkv_stride + 2 * C + h * D + d]) : 0.f;
      dk[d] = 0.f;
      dv[d] = 0.f;
    }
    float* grad_bias_h = grad_bias + (int64_t)h * a.N * a.N;
    for (int i0 = 0; i0 < a.N; i0 += kTile) {
      const int rows = min(kTile, a.N - i0);
      __syncthreads();  // phase A (or the previous tile) is done with the shared tiles; lse_s/delta_s are set
      stage_rows<scalar_t, D>(tile_a, qkv_b, qkv_stride, h * D, i0, rows, a.scale);
      stage_rows<scalar_t, D>(tile_b, dout_b, C, h * D, i0, rows, 1.f);
      __syncthreads();
      if (!active) continue;
      for (int ii = 0; ii < rows; ++ii) {
        const int i = i0 + ii;
        float s = 0.f, dp = 0.f;
#pragma unroll
        for (int d = 0; d < D; ++d) {
          s += tile_a[ii * D + d] * k[d];
          dp += tile_b[ii * D + d] * v[d];
        }
        s += bias_and_mask(a, mask_w, h, i, j);
        const float p = expf(s - lse_s[i]);
        const float ds = p * (dp - delta_s[i]);
#pragma unroll
        for (int d = 0; d < D; ++d) {
          dv[d] += p * tile_b[ii * D + d];
          dk[d] += ds * tile_a[ii * D + d];  // tile_a holds scale * q, so this is scale * dS q
        }
        if (bias_acc != nullptr) {
          bias_acc[i * a.N + j] += ds;  // column j belongs to this thread alone
        } else {
          atomicAdd(&grad_bias_h[i * a.N + j], ds);
        }
      }
    }
    if (active) {
#pragma unroll
      for (int d = 0; d < D; ++d) {
        dqkv_b[j * qkv_stride + C + h * D + d] = from_float<scalar_t>(dk[d]);
        dqkv_b[j * qkv_stride + 2 * C + h * D + d] = from_float<scalar_t>(dv[d]);
      }
    }
  }
}

// Each block handles `windows_per_block` consecutive windows of one head (blockIdx.y).
// With `bias_in_shared`, dS is summed over those windows in shared memory and added to
// grad_bias once per block, cutting the global atomics by windows_per_block.
template <typename scalar_t, int D>
__global__ void window_attention_bwd_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ qkv,
                                            const scalar_t* __restrict__ out, const float* __restrict__ lse,
                                            scalar_t* __restrict__ grad_qkv, float* __restrict__ grad_bias,
                                            AttentionArgs a, int num_windows, int windows_per_block,
                                            bool bias_in_shared) {
  MSGFM_DYNAMIC_SHARED_FLOATS(smem);
  const int NN = a.N * a.N;
  float* bias_acc = bias_in_shared ? smem + 2 * kTile * D + 2 * a.N : nullptr;  // [N, N]
  if (bias_acc != nullptr) {
    for (int idx = threadIdx.x; idx < NN; idx += blockDim.x) bias_acc[idx] = 0.f;
  }
  const int first = blockIdx.x * windows_per_block;
  const int last = min(num_windows, first + windows_per_block);
  for (int b = first; b < last; ++b) {
    __syncthreads();  // the zeroed accumulator is visible; the previous window is done with lse_s / delta_s
    attention_bwd_window<scalar_t, D>(b, smem, grad_out, qkv, out, lse, grad_qkv, grad_bias, bias_acc, a);
  }
  if (bias_acc != nullptr) {
    __syncthreads();
    float* grad_bias_h = grad_bias + (int64_t)blockIdx.y * NN;
    for (int idx = threadIdx.x; idx < NN; idx += blockDim.x) atomicAdd(&grad_bias_h[idx], bias_acc[idx]);
  }
}

// One thread per token row, rounded up to whole warps.
inline int attention_threads(int N) { return (N + 31) / 32 * 32; }

// Dynamic shared memory of the two kernels (see the tile layout at the top of each).
template <int D>
constexpr size_t attention_fwd_shared_bytes() { return 2 * kTile * D * sizeof(float); }

// How the backward is launched for N tokens and head dim D: the shared accumulator of the bias
// gradient is used when it fits in the 48 KiB every target gives without opt-in.
struct AttentionBwdLaunch {
  size_t shared_bytes;
  int windows_per_block;
  bool bias_in_shared;
};

constexpr int kBwdWindowsPerBlock = 8;
constexpr size_t kSharedBytesWithoutOptIn = 48 * 1024;

inline AttentionBwdLaunch attention_bwd_launch(int N, int D) {
  const size_t base = (2 * static_cast<size_t>(kTile) * D + 2 * static_cast<size_t>(N)) * sizeof(float);
  const size_t with_bias = base + static_cast<size_t>(N) * N * sizeof(float);
  if (with_bias <= kSharedBytesWithoutOptIn) return {with_bias, kBwdWindowsPerBlock, true};
  return {base, 1, false};
}

}  // namespace msgfm
