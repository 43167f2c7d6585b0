"""Cyclic shift + window partition and its inverse, with an implementation switch.

Legend: B batch, H/W feature-map height/width, C channels, ws window size,
nW windows per image, N = ws * ws tokens per window.
"""
from __future__ import annotations

import torch

from msgfm.errors import UserError

WINDOW_PROCESS_IMPLS = ("auto", "fused", "torch")


def resolve_window_process_impl(requested: str, device: torch.device) -> str:
    """Turn ``auto`` into ``fused`` (CUDA device and extension available) or ``torch``; explicit ``fused``
    fails with the reason it cannot run."""
    if requested not in WINDOW_PROCESS_IMPLS:
        raise UserError(f"kernels.window_process: '{requested}' is not one of {WINDOW_PROCESS_IMPLS}")
    from msgfm.ops.window_attention import resolve_fused

    return resolve_fused(requested, device, "kernels.window_process", "torch")


def window_partition_torch(x_BHWC: torch.Tensor, window_size: int, shift_size: int) -> torch.Tensor:
    """Reference path: torch.roll, then a view/permute copy."""
    B, H, W, C = x_BHWC.shape
    if shift_size:
        x_BHWC = torch.roll(x_BHWC, shifts=(-shift_size, -shift_size), dims=(1, 2))
    x = x_BHWC.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, C)  # [B*nW, N, C]


def window_merge_torch(windows_BNC: torch.Tensor, window_size: int, shift_size: int, H: int, W: int) -> torch.Tensor:
    """Reference path: a view/permute copy, then torch.roll."""
    C = windows_BNC.shape[-1]
    x = windows_BNC.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)
    if shift_size:
        x = torch.roll(x, shifts=(shift_size, shift_size), dims=(1, 2))
    return x  # [B, H, W, C]


def window_partition(x_BHWC: torch.Tensor, window_size: int, shift_size: int, impl: str = "torch") -> torch.Tensor:
    """Roll by -shift and cut into windows: [B, H, W, C] -> [B*nW, N, C]."""
    if impl == "fused":
        from msgfm.ops import fused

        return fused.window_partition(x_BHWC, window_size, shift_size)
    return window_partition_torch(x_BHWC, window_size, shift_size)


def window_merge(windows_BNC: torch.Tensor, window_size: int, shift_size: int, H: int, W: int,
                 impl: str = "torch") -> torch.Tensor:
    """Inverse of :func:`window_partition`: [B*nW, N, C] -> [B, H, W, C], rolled back by +shift."""
    if impl == "fused":
        from msgfm.ops import fused

        return fused.window_merge(windows_BNC, window_size, shift_size, H, W)
    return window_merge_torch(windows_BNC, window_size, shift_size, H, W)
