"""On a CUDA device: the fused kernels against a float64 reference from the eager path.

Fresh random inputs every run (no seed); the output buffers are poisoned with NaN through
the caching allocator before each call, so an element a kernel forgets to write fails the
comparison. Skipped cleanly without a CUDA device (and fails, not skips, if the extension
does not build on a machine that has one).
"""
from __future__ import annotations

import pytest
import torch

from msgfm.ops import fused, resolve_attention_impl, resolve_window_process_impl
from msgfm.ops.testing import PARITY_TOLERANCE as TOLERANCE
from msgfm.ops.testing import attention_reference_float64, attention_with_grads, make_attention_case, relative_error
from msgfm.ops.window_process import window_merge_torch, window_partition_torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (batch, height, width, window, shift): both windows, with and without shift, odd window
# counts (9, 15, 3), batch 1, and a one-window map (Swin-B stage 4).
SHAPES = [
    (2, 12, 12, 6, 0),
    (2, 18, 18, 6, 3),
    (1, 18, 30, 6, 3),
    (1, 6, 6, 6, 0),
    (1, 24, 24, 12, 0),
    (2, 36, 12, 12, 6),
]
HEAD_DIMS = (16, 32, 64)


def dtypes() -> list[torch.dtype]:
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def poison_allocator(*shapes_and_dtypes: tuple[tuple[int, ...], torch.dtype]) -> None:
    """Fill and free blocks of the sizes the kernels will allocate: the caching allocator hands
    the same (NaN-filled) memory to the kernels' torch.empty outputs."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in shapes_and_dtypes]
    del blocks


@pytest.fixture(scope="module", autouse=True)
def extension():
    ok, reason = fused.available()
    assert ok, f"a CUDA device is present but the fused kernels are unavailable: {reason}"


@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}_{}x{}_ws{}_sh{}".format(*s))
def test_fused_attention_matches_float64_reference(shape, head_dim, dtype):
    batch, height, width, window, shift = shape
    heads = 2
    case = make_attention_case(batch=batch, height=height, width=width, window_size=window, shift_size=shift,
                               channels=heads * head_dim, num_heads=heads, dtype=dtype, device="cuda")
    B_, N, C = case.qkv_BN3C.shape[0], window * window, heads * head_dim
    grad_out = torch.randn(B_, N, C, device="cuda", dtype=dtype)
    ref_out, ref_gqkv, ref_gtable = attention_reference_float64(case, grad_out)

    poison_allocator(((B_, N, C), dtype), ((B_, heads, N), torch.float32))
    out, _, _ = attention_with_grads(case, "fused")
    poison_allocator(((B_, N, 3 * C), dtype))
    out_again, gqkv, gtable = attention_with_grads(case, "fused", grad_out)

    out_tol, grad_tol = TOLERANCE[dtype]
    for name, value in (("out", out), ("grad qkv", gqkv), ("grad table", gtable)):
        assert torch.isfinite(value).all(), f"{name} has NaN/inf: an element was not written"
    assert gtable.dtype == case.bias_table_TH.dtype
    assert relative_error(out, ref_out) < out_tol
    assert torch.equal(out, out_again)
    assert relative_error(gqkv, ref_gqkv) < grad_tol
    assert relative_error(gtable, ref_gtable) < grad_tol


def test_fused_attention_with_fp32_table_under_fp16_activations():
    """Under autocast the table stays fp32 while qkv is fp16; its gradient must come back fp32."""
    case = make_attention_case(batch=2, height=12, width=12, window_size=6, shift_size=3, channels=64,
                               num_heads=2, device="cuda").to(dtype=torch.float16, table_dtype=torch.float32)
    grad_out = torch.randn(case.qkv_BN3C.shape[0], 36, 64, device="cuda", dtype=torch.float16)
    ref_out, ref_gqkv, ref_gtable = attention_reference_float64(case, grad_out)
    out, gqkv, gtable = attention_with_grads(case, "fused", grad_out)
    assert gtable.dtype == torch.float32 and gqkv.dtype == torch.float16
    assert relative_error(out, ref_out) < TOLERANCE[torch.float16][0]
    assert relative_error(gtable, ref_gtable) < TOLERANCE[torch.float16][1]


def test_fused_attention_rejects_unsupported_head_dims():
    case = make_attention_case(batch=1, height=6, width=6, window_size=6, shift_size=0, channels=96, num_heads=2,
                               device="cuda")
    with pytest.raises(ValueError, match="head dims 16, 32 and 64, got 48"):
        attention_with_grads(case, "fused")


@pytest.mark.parametrize("dtype", dtypes(), ids=str)
@pytest.mark.parametrize("B,H,W,window,shift,C", [(2, 12, 12, 6, 0, 128), (1, 18, 30, 6, 3, 5),
                                                  (2, 24, 24, 12, 6, 64), (1, 6, 6, 6, 0, 1024),
                                                  (3, 18, 18, 6, 3, 3)])
def test_fused_window_process_matches_torch(B, H, W, window, shift, C, dtype):
    x = torch.randn(B, H, W, C, device="cuda", dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    nW = (H // window) * (W // window)
    poison_allocator(((B * nW, window * window, C), dtype))
    windows = fused.window_partition(x, window, shift)
    expected = window_partition_torch(x_ref, window, shift)
    assert torch.equal(windows, expected)
    grad_windows = torch.randn_like(windows)
    poison_allocator(((B, H, W, C), dtype))
    windows.backward(grad_windows)
    expected.backward(grad_windows)
    assert torch.equal(x.grad, x_ref.grad)

    windows_in = expected.detach().clone().requires_grad_(True)
    windows_ref = windows_in.detach().clone().requires_grad_(True)
    poison_allocator(((B, H, W, C), dtype))
    merged = fused.window_merge(windows_in, window, shift, H, W)
    merged_ref = window_merge_torch(windows_ref, window, shift, H, W)
    assert torch.equal(merged, merged_ref) and torch.equal(merged, x.detach())
    grad_x = torch.randn_like(merged)
    merged.backward(grad_x)
    merged_ref.backward(grad_x)
    assert torch.equal(windows_in.grad, windows_ref.grad)


def test_auto_picks_fused_on_cuda():
    assert resolve_attention_impl("auto", torch.device("cuda")) == "fused"
    assert resolve_window_process_impl("auto", torch.device("cuda")) == "fused"


def test_launch_errors_name_the_op():
    x = torch.randn(1, 12, 10, 4, device="cuda")
    with pytest.raises(ValueError, match="window_partition: window size 6 must divide the 12x10"):
        fused.window_partition(x, 6, 0)
