"""Per-sensor patch embedding f_i: a C_i-channel image to Swin tokens.

Legend: B batch, C input channels, H/W image size, D embedding width, p patch size.
"""
from __future__ import annotations

import torch
from torch import nn

from msgfm.errors import UserError


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D channels, then a norm; NCHW image in, NHWC tokens out.

    Parameter names (``proj``, ``norm``) are timm's ``SwinTransformer.patch_embed`` ones, so a
    state dict moves between the two with a prefix rename. The fine-tuning code reuses this class
    for channel-stacked embeddings (several sensors concatenated along C).
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int,
                 norm_layer: type[nn.Module] | None = nn.LayerNorm) -> None:
        super().__init__()
        if in_chans < 1 or embed_dim < 1 or patch_size < 1:
            raise UserError(f"PatchEmbed needs positive sizes, got in_chans={in_chans}, "
                            f"embed_dim={embed_dim}, patch_size={patch_size}")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, H/p, W/p, D]."""
        if x_BCHW.ndim != 4 or x_BCHW.shape[1] != self.in_chans:
            raise UserError(f"PatchEmbed expects [B, {self.in_chans}, H, W], got {list(x_BCHW.shape)}")
        H, W = x_BCHW.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise UserError(f"image size {H}x{W} is not a multiple of the patch size {self.patch_size}")
        return self.norm(self.proj(x_BCHW).permute(0, 2, 3, 1))
