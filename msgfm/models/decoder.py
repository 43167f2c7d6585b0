"""SimMIM decoder D_i: final encoder features back to a sensor's pixels.

Legend: B batch, F encoder width (num_features), s encoder stride (32 for Swin-B/192), C sensor channels.
"""
from __future__ import annotations

import torch
from torch import nn


class SimMIMDecoder(nn.Module):
    """1x1 conv F -> s*s*C, then PixelShuffle(s): [B, F, H/s, W/s] -> [B, C, H, W] (SimMIM's linear head)."""

    def __init__(self, num_features: int, out_chans: int, encoder_stride: int) -> None:
        super().__init__()
        self.out_chans = out_chans
        self.encoder_stride = encoder_stride
        self.proj = nn.Conv2d(num_features, encoder_stride**2 * out_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(encoder_stride)

    def forward(self, features_BFhw: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.proj(features_BFhw))
