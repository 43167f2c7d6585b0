"""CPU checks of the window ops: eager vs sdpa attention (forward and backward), the window
process against a naive per-pixel reference, and the implementation switches."""
from __future__ import annotations

import importlib
import logging
import warnings

import pytest
import torch

from msgfm.ops import fused, resolve_attention_impl, resolve_window_process_impl, window_merge, window_partition
from msgfm.ops.testing import attention_reference_float64, attention_with_grads, make_attention_case, relative_error
from msgfm.ops.window_attention import FusedUnavailableError
from msgfm.ops.window_process import window_merge_torch, window_partition_torch

# The package re-exports the function window_attention, which hides the submodule of that name.
wa = importlib.import_module("msgfm.ops.window_attention")

# (batch, height, width, window, shift, channels, heads): both windows, with and without shift,
# odd window counts (3x3 = 9, 3x5 = 15, 3x1 = 3), batch 1.
ATTENTION_SHAPES = [
    (2, 12, 12, 6, 0, 32, 2),
    (2, 18, 18, 6, 3, 32, 2),  # 9 windows per image
    (1, 18, 30, 6, 3, 48, 3),  # batch 1, 15 windows
    (1, 24, 24, 12, 0, 32, 2),
    (1, 36, 12, 12, 6, 32, 2),  # window 12, 3 windows, shifted
]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "b{}_{}x{}_ws{}_sh{}_c{}_h{}".format(*s))
def test_eager_and_sdpa_agree_forward_and_backward(shape):
    batch, height, width, window, shift, channels, heads = shape
    case = make_attention_case(batch=batch, height=height, width=width, window_size=window, shift_size=shift,
                               channels=channels, num_heads=heads)  # fresh random inputs each run
    grad_out = torch.randn(case.qkv_BN3C.shape[0], window * window, channels)
    ref_out, ref_gqkv, ref_gtable = attention_reference_float64(case, grad_out)
    for impl in ("eager", "sdpa"):
        out, gqkv, gtable = attention_with_grads(case, impl, grad_out)
        assert out.shape == (batch * (height // window) * (width // window), window * window, channels)
        assert relative_error(out, ref_out) < 1e-5, impl
        assert relative_error(gqkv, ref_gqkv) < 1e-5, impl
        assert relative_error(gtable, ref_gtable) < 1e-5, impl
    # The float64 sdpa path must match the float64 eager path to rounding.
    out64, gqkv64, gtable64 = attention_with_grads(case.to(dtype=torch.float64), "sdpa", grad_out.double())
    assert relative_error(out64, ref_out) < 1e-12
    assert relative_error(gqkv64, ref_gqkv) < 1e-12
    assert relative_error(gtable64, ref_gtable) < 1e-12


def test_attention_matches_a_per_window_loop():
    """The shift mask of window b_ is mask[b_ % nW], and the bias comes from table[rel_index]."""
    case = make_attention_case(batch=2, height=12, width=18, window_size=6, shift_size=3, channels=16,
                               num_heads=2).to(dtype=torch.float64)
    out, _, _ = attention_with_grads(case, "eager")
    B_, N, C3 = case.qkv_BN3C.shape
    heads, nW = case.num_heads, case.mask_WNN.shape[0]
    bias_HNN = case.bias_table_TH[case.rel_index_NN].permute(2, 0, 1)
    for b in (0, nW - 1, nW, B_ - 1):
        q, k, v = case.qkv_BN3C[b].reshape(N, 3, heads, -1).permute(1, 2, 0, 3)  # each [heads, N, D]
        scores = q @ k.transpose(-1, -2) * case.scale + bias_HNN + case.mask_WNN[b % nW]
        expected = (scores.softmax(-1) @ v).transpose(0, 1).reshape(N, C3 // 3)
        torch.testing.assert_close(out[b], expected, rtol=1e-12, atol=1e-12)


def test_shift_mask_changes_the_result():
    case = make_attention_case(batch=1, height=12, width=12, window_size=6, shift_size=3, channels=16, num_heads=2)
    with_mask, _, _ = attention_with_grads(case, "sdpa")
    case.mask_WNN = None
    without_mask, _, _ = attention_with_grads(case, "sdpa")
    assert (with_mask - without_mask).abs().max() > 1e-3


def naive_partition(x_BHWC: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """Token (r, c) of window (wy, wx) is pixel ((wy*ws + r + shift) % H, (wx*ws + c + shift) % W)."""
    B, H, W, C = x_BHWC.shape
    out = torch.full((B * (H // window) * (W // window), window * window, C), float("nan"), dtype=x_BHWC.dtype)
    index = 0
    for b in range(B):
        for wy in range(H // window):
            for wx in range(W // window):
                for r in range(window):
                    for c in range(window):
                        out[index, r * window + c] = x_BHWC[b, (wy * window + r + shift) % H,
                                                             (wx * window + c + shift) % W]
                index += 1
    return out


@pytest.mark.parametrize("B,H,W,window,shift", [(1, 12, 12, 6, 0), (2, 18, 12, 6, 3), (1, 24, 36, 12, 6),
                                                (2, 6, 6, 6, 0)])
def test_window_process_torch_matches_naive_reference(B, H, W, window, shift):
    x = torch.randn(B, H, W, 5)
    windows = window_partition(x, window, shift, "torch")
    torch.testing.assert_close(windows, naive_partition(x, window, shift), rtol=0, atol=0)
    torch.testing.assert_close(window_merge(windows, window, shift, H, W, "torch"), x, rtol=0, atol=0)


def test_window_process_backward_is_the_inverse_permutation():
    x = torch.randn(2, 18, 12, 4, requires_grad=True)
    grad_windows = torch.randn(2 * 3 * 2, 36, 4)
    window_partition_torch(x, 6, 3).backward(grad_windows)
    torch.testing.assert_close(x.grad, window_merge_torch(grad_windows, 6, 3, 18, 12), rtol=0, atol=0)


def test_auto_on_cpu_takes_the_reference_paths():
    cpu = torch.device("cpu")
    assert resolve_attention_impl("auto", cpu) == "sdpa"
    assert resolve_window_process_impl("auto", cpu) == "torch"
    assert resolve_attention_impl("eager", cpu) == "eager"
    assert resolve_window_process_impl("torch", cpu) == "torch"


def test_explicit_fused_on_cpu_fails_with_the_reason():
    with pytest.raises(FusedUnavailableError, match="kernels.attention=fused .*not on a CUDA device.*sdpa"):
        resolve_attention_impl("fused", torch.device("cpu"))
    with pytest.raises(FusedUnavailableError, match="kernels.window_process=fused .*not on a CUDA device.*torch"):
        resolve_window_process_impl("fused", torch.device("cpu"))


def test_unknown_implementation_is_a_value_error():
    with pytest.raises(ValueError, match="kernels.attention: 'flash'"):
        resolve_attention_impl("flash", torch.device("cpu"))
    with pytest.raises(ValueError, match="kernels.window_process: 'roll'"):
        resolve_window_process_impl("roll", torch.device("cpu"))
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        case = make_attention_case(batch=1, height=6, width=6, window_size=6, shift_size=0, channels=16, num_heads=1)
        attention_with_grads(case, "auto")


@pytest.fixture
def fresh_dispatch_log(monkeypatch):
    monkeypatch.setattr(wa, "_logged_choices", set())


def test_auto_on_cuda_falls_back_with_one_warning_when_the_build_fails(monkeypatch, fresh_dispatch_log, caplog):
    monkeypatch.setattr(fused, "available", lambda: (False, "nvcc failed: window_attention.cu line 1"))
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    with pytest.warns(RuntimeWarning, match="kernels.attention=auto uses sdpa and kernels.window_process=auto "
                                            "uses torch: nvcc failed: window_attention.cu line 1"):
        assert resolve_attention_impl("auto", cuda) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later calls (every forward asks again) and the other switch stay quiet
        assert resolve_attention_impl("auto", cuda) == "sdpa"
        assert resolve_window_process_impl("auto", cuda) == "torch"
    with pytest.raises(FusedUnavailableError, match="nvcc failed: window_attention.cu line 1"):
        resolve_attention_impl("fused", cuda)


def test_auto_on_cuda_takes_fused_when_available_and_logs_once(monkeypatch, fresh_dispatch_log, caplog):
    monkeypatch.setattr(fused, "available", lambda: (True, ""))
    cuda = torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="msgfm.ops.window_attention"):
        assert resolve_attention_impl("auto", cuda) == "fused"
        assert resolve_attention_impl("auto", cuda) == "fused"
        assert resolve_window_process_impl("auto", cuda) == "fused"
    choices = [r.getMessage() for r in caplog.records]
    assert choices == ["kernels.attention: fused (requested auto, device cuda)",
                       "kernels.window_process: fused (requested auto, device cuda)"]


def test_fused_available_says_why_not_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    ok, reason = fused.available()
    assert not ok and "no CUDA device" in reason
