"""The Python side of the fused path on CPU: the autograd Functions of msgfm/ops/fused.py driven by a
torch model of the extension's contract (same arguments, same outputs, same backward formulation
as kernels/window_attention.cu: row lse, delta = dO . O, dS = P (dO V^T - delta), bias gradient
summed over windows as [H, N, N]). What this cannot check is the CUDA code itself: that is
tests/test_kernels_cuda.py on a GPU."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from msgfm.ops import fused
from msgfm.ops.testing import attention_reference_float64, make_attention_case, relative_error
from msgfm.ops.window_process import window_merge_torch, window_partition_torch


def _split(qkv_BN3C, num_heads):
    B_, N, C3 = qkv_BN3C.shape
    return qkv_BN3C.float().reshape(B_, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B_, H, N, D]


def _scores(qkv_BN3C, table_TH, rel_index_NN, mask_WNN, num_heads, scale):
    q, k, v = _split(qkv_BN3C, num_heads)
    B_, N = qkv_BN3C.shape[:2]
    s = (q * scale) @ k.transpose(-1, -2) + table_TH[rel_index_NN].permute(2, 0, 1)
    if mask_WNN is not None:
        s = s + mask_WNN.repeat(B_ // mask_WNN.shape[0], 1, 1).unsqueeze(1)  # window b gets mask[b % nW]
    return q, k, v, s


def fake_forward(qkv_BN3C, table_TH, rel_index_NN, mask_WNN, num_heads, scale):
    assert qkv_BN3C.is_contiguous() and table_TH.dtype == torch.float32 and rel_index_NN.dtype == torch.int64
    assert mask_WNN is None or mask_WNN.dtype == torch.float32
    _, _, v, s = _scores(qkv_BN3C, table_TH, rel_index_NN, mask_WNN, num_heads, scale)
    lse = s.logsumexp(-1)  # [B_, H, N]
    out = (torch.exp(s - lse.unsqueeze(-1)) @ v).transpose(1, 2).flatten(2)
    return out.to(qkv_BN3C.dtype), lse


def fake_backward(grad_out_BNC, qkv_BN3C, out_BNC, lse_BHN, table_TH, rel_index_NN, mask_WNN, num_heads, scale):
    q, k, v, s = _scores(qkv_BN3C, table_TH, rel_index_NN, mask_WNN, num_heads, scale)
    B_, N, C = out_BNC.shape
    d_out = grad_out_BNC.float().reshape(B_, N, num_heads, -1).transpose(1, 2)
    out = out_BNC.float().reshape(B_, N, num_heads, -1).transpose(1, 2)
    p = torch.exp(s - lse_BHN.unsqueeze(-1))
    delta = (d_out * out).sum(-1, keepdim=True)
    ds = p * (d_out @ v.transpose(-1, -2) - delta)
    dq, dk, dv = ds @ k * scale, ds.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ d_out
    grad_qkv = torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).reshape(B_, N, 3 * C)
    return grad_qkv.to(qkv_BN3C.dtype), ds.sum(0)


FAKE_EXTENSION = SimpleNamespace(
    window_attention_forward=fake_forward, window_attention_backward=fake_backward,
    window_partition=lambda x, ws, shift: window_partition_torch(x, ws, shift).contiguous(),
    window_merge=lambda w, ws, shift, H, W: window_merge_torch(w, ws, shift, H, W).contiguous())


@pytest.fixture
def fake_extension(monkeypatch):
    monkeypatch.setattr(fused, "load_extension", lambda: FAKE_EXTENSION)


@pytest.mark.parametrize("shift,window,height,width", [(0, 6, 12, 18), (3, 6, 18, 18), (6, 12, 36, 12)])
def test_fused_autograd_glue_matches_the_reference(fake_extension, shift, window, height, width):
    case = make_attention_case(batch=2, height=height, width=width, window_size=window, shift_size=shift,
                               channels=32, num_heads=2, dtype=torch.float64)
    grad_out = torch.randn(case.qkv_BN3C.shape[0], window * window, 32, dtype=torch.float64)
    ref_out, ref_gqkv, ref_gtable = attention_reference_float64(case, grad_out)
    qkv = case.qkv_BN3C.clone().requires_grad_(True)
    table = case.bias_table_TH.clone().requires_grad_(True)
    out = fused.window_attention(qkv, table, case.rel_index_NN, case.mask_WNN, case.num_heads, case.scale)
    out.backward(grad_out)
    # The fake computes in fp32 like the kernel: fp32-level agreement with the float64 reference.
    assert relative_error(out, ref_out) < 1e-5
    assert relative_error(qkv.grad, ref_gqkv) < 1e-5
    assert table.grad.dtype == torch.float64 and relative_error(table.grad, ref_gtable) < 1e-5


def test_bias_grad_scatter_sums_every_pair_of_a_table_row():
    case = make_attention_case(batch=1, height=6, width=6, window_size=6, shift_size=0, channels=8, num_heads=2)
    grad_bias_HNN = torch.randn(2, 36, 36)
    table = case.bias_table_TH.clone().requires_grad_(True)
    table[case.rel_index_NN].permute(2, 0, 1).backward(grad_bias_HNN)  # autograd of the gather: the truth
    torch.testing.assert_close(fused.scatter_bias_grad(grad_bias_HNN, case.rel_index_NN, table.shape[0]),
                               table.grad, rtol=1e-6, atol=1e-6)
    assert (case.rel_index_NN == case.rel_index_NN[0, 0]).sum() > 1  # rows really are shared


def test_fused_window_process_glue_is_a_permutation_pair(fake_extension):
    x = torch.randn(2, 18, 12, 4, requires_grad=True)
    windows = fused.window_partition(x, 6, 3)
    merged = fused.window_merge(windows, 6, 3, 18, 12)
    torch.testing.assert_close(merged, x, rtol=0, atol=0)
    grad = torch.randn_like(x)
    merged.backward(grad)
    torch.testing.assert_close(x.grad, grad, rtol=0, atol=0)  # merge's backward undoes partition's


def test_a_stale_ahead_of_time_build_is_not_used(monkeypatch, caplog):
    from msgfm.ops import kernel_build

    current = SimpleNamespace(__file__="aot.so", source_digest=kernel_build.source_digest())
    stale = SimpleNamespace(__file__="aot.so", source_digest="d0000000000000000")
    monkeypatch.setattr(fused.importlib, "import_module", lambda name: current)
    assert fused._ahead_of_time_build() is current
    monkeypatch.setattr(fused.importlib, "import_module", lambda name: stale)
    assert fused._ahead_of_time_build() is None
    assert "predates the sources" in caplog.text
