"""Swin window geometry shared by the encoder, the kernels' tests and the profiler.

Legend: H/W token grid, ws window side, N = ws * ws tokens per window, nW windows per image.
"""
from __future__ import annotations

import torch

from msgfm.ops.window_process import window_partition

# Additive attention mask between tokens of different regions of a shifted window (Swin, timm).
SHIFT_MASK_VALUE = -100.0


def relative_position_index(window_size: int) -> torch.Tensor:
    """[N, N] row of the bias table for each (query, key) pair of a window (Swin's layout)."""
    coords_2N = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                           indexing="ij")).flatten(1)
    rel_2NN = coords_2N[:, :, None] - coords_2N[:, None, :] + (window_size - 1)
    return rel_2NN[0] * (2 * window_size - 1) + rel_2NN[1]


def shift_attention_mask(height: int, width: int, window_size: int, shift_size: int,
                         device: torch.device | None = None) -> torch.Tensor:
    """[nW, N, N] additive mask (0 or -100) that keeps the rolled-in regions of a shifted window apart."""
    region_HW = torch.zeros(height, width, device=device)
    bounds = ((0, -window_size), (-window_size, -shift_size), (-shift_size, None))
    label = 0
    for h0, h1 in bounds:
        for w0, w1 in bounds:
            region_HW[h0:h1, w0:w1] = label
            label += 1
    region_WN = window_partition(region_HW[None, :, :, None], window_size, 0).squeeze(-1)
    different_WNN = region_WN[:, None, :] != region_WN[:, :, None]
    return different_WNN.float() * SHIFT_MASK_VALUE
