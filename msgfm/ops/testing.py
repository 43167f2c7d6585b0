"""Inputs and float64 references for checking and profiling the window-attention implementations.

Used by tests/test_ops*.py, tests/test_kernels*.py and launchers/profile_kernels.py, so a
shape means the same thing in all of them. The relative position index and the shift mask
come from the model (msgfm/models/swin.py), the one place that defines them.

Legend: B batch, H/W feature map, C channels, ws window size, N = ws * ws, nW windows per
image, B_ = B * nW, T = (2 ws - 1)^2 bias-table rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from msgfm.errors import UserError
from msgfm.ops.window_attention import window_attention
from msgfm.ops.window_geometry import relative_position_index, shift_attention_mask

# Max relative error (max |err| / max |ref|) of a fused kernel's (output, gradients) against the
# float64 reference, per activation dtype: tests/test_kernels_cuda.py and `msgfm doctor` hold to it.
PARITY_TOLERANCE = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 1e-2), torch.bfloat16: (2e-2, 5e-2)}


@dataclass
class AttentionCase:
    """One window-attention call: qkv of B * nW windows, bias table, index, optional shift mask."""

    qkv_BN3C: torch.Tensor
    bias_table_TH: torch.Tensor
    rel_index_NN: torch.Tensor
    mask_WNN: torch.Tensor | None
    num_heads: int
    scale: float

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
           table_dtype: torch.dtype | None = None) -> AttentionCase:
        """A detached copy with qkv in ``dtype`` and the table in ``table_dtype`` (default: ``dtype``)."""
        dtype = dtype or self.qkv_BN3C.dtype
        move: dict[str, Any] = {"device": device} if device is not None else {}
        return AttentionCase(
            qkv_BN3C=self.qkv_BN3C.detach().to(dtype=dtype, **move),
            bias_table_TH=self.bias_table_TH.detach().to(dtype=table_dtype or dtype, **move),
            rel_index_NN=self.rel_index_NN.to(**move),
            mask_WNN=None if self.mask_WNN is None else self.mask_WNN.to(**move),
            num_heads=self.num_heads, scale=self.scale)


def make_attention_case(*, batch: int, height: int, width: int, window_size: int, shift_size: int,
                        channels: int, num_heads: int, seed: int | None = None,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> AttentionCase:
    """Random qkv and bias table, Swin's relative position index, and the shift mask when
    ``shift_size`` > 0. With a seed the values are drawn on the CPU in fp32 (the same values on
    every device); without one they are drawn on ``device`` directly (fast for profiling shapes)."""
    if height % window_size or width % window_size:
        raise UserError(f"window {window_size} must divide the {height}x{width} feature map")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    draw_on = "cpu" if seed is not None else device
    num_windows = (height // window_size) * (width // window_size)
    N = window_size * window_size
    qkv_BN3C = torch.randn(batch * num_windows, N, 3 * channels, generator=generator, device=draw_on)
    # Std 1, not Swin's 0.02 init: a bias that matters makes the parity checks meaningful.
    bias_table_TH = torch.randn((2 * window_size - 1) ** 2, num_heads, generator=generator, device=draw_on)
    mask_WNN = shift_attention_mask(height, width, window_size, shift_size) if shift_size else None
    case = AttentionCase(qkv_BN3C, bias_table_TH, relative_position_index(window_size), mask_WNN, num_heads,
                         (channels // num_heads) ** -0.5)
    return case.to(dtype=dtype, device=device)


def attention_with_grads(case: AttentionCase, impl: str, grad_out_BNC: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run ``impl`` on a fresh leaf copy of ``case``; return (out, grad of qkv, grad of the table).
    Without ``grad_out_BNC`` no backward is run and the grads are None."""
    qkv = case.qkv_BN3C.detach().clone().requires_grad_(grad_out_BNC is not None)
    table = case.bias_table_TH.detach().clone().requires_grad_(grad_out_BNC is not None)
    out = window_attention(qkv, table, case.rel_index_NN, case.mask_WNN, case.num_heads, case.scale, impl)
    if grad_out_BNC is None:
        return out.detach(), None, None
    out.backward(grad_out_BNC)
    return out.detach(), qkv.grad, table.grad


def attention_reference_float64(case: AttentionCase, grad_out_BNC: torch.Tensor | None = None,
                                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The eager path in float64 on the case's device: the reference every implementation is held to."""
    grad64 = None if grad_out_BNC is None else grad_out_BNC.double()
    return attention_with_grads(case.to(dtype=torch.float64), "eager", grad64)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected| / max |expected| (in float64): one number per tensor, scale-free."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
