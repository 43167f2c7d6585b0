"""Task heads on top of the Swin encoder's features.

Shapes (legend): B = batch, C_i = channels of stage i, H_i x W_i = its token grid
(stride 4, 8, 16, 32 for i = 0..3 with patch 4), K = classes, H x W = input pixels;
for the SimMIM decoder h x w = the final grid, F = its width, s = the encoder stride.
Stage features arrive channels-first: ``features[i]`` is [B, C_i, H_i, W_i].

- :class:`LinearHead`: BigEarthNet multilabel logits from the pooled last stage.
- :class:`UPerNetHead`: UPerNet (Xiao et al., 2018) as Swin used it for segmentation:
  a pyramid pooling module on the last stage, an FPN over the four stages, the
  four FPN outputs upsampled to stride 4, concatenated and fused.
- :class:`SimMIMDecoder`: pretraining's per-sensor decoder D_i (final features back to pixels).
- :class:`RestorationDecoder`: dense regression (cloud removal, pan-sharpening): a
  light UNet-style decoder from stride 32 back to full resolution, with a shallow
  full-resolution skip from the input, predicting a residual on top of a base
  image (the cloudy bands, or the upsampled multispectral bands).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from msgfm.errors import UserError

Norm = Literal["bn", "gn"]


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        # GroupNorm does not depend on the batch: useful at batch 1-2 per device. At least 4 channels per
        # group, so that a 1x1 map (the pyramid pooling's coarsest level) still normalizes over 4 values.
        return nn.GroupNorm(max(1, min(32, channels // 4)), channels)
    raise UserError(f"head norm must be 'bn' or 'gn', got '{kind}'")


class ConvNormAct(nn.Sequential):
    """Conv (no bias: the norm has one) -> norm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, norm: Norm = "bn") -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class LinearHead(nn.Module):
    """Global average pool of the last stage, dropout, one linear layer: [B, C, h, w] -> [B, K]."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        pooled_BC = features[-1].mean(dim=(2, 3))
        return self.fc(self.dropout(pooled_BC))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: average-pool to each scale, 1x1 conv, upsample, concat, 3x3 fuse."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int] = (1, 2, 3, 6),
                 norm: Norm = "bn") -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(in_channels, channels, 1, norm)) for s in scales)
        self.fuse = ConvNormAct(in_channels + len(scales) * channels, channels, 3, norm)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        size = x_BCHW.shape[-2:]
        pooled = [F.interpolate(stage(x_BCHW), size=size, mode="bilinear", align_corners=False)
                  for stage in self.stages]
        return self.fuse(torch.cat([x_BCHW, *pooled], dim=1))


class UPerNetHead(nn.Module):
    """UPerNet decode head: four stage features -> class logits at stride 4 [B, K, H_0, W_0]."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, norm: Norm = "bn") -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise UserError(f"UPerNet needs at least two stages of features, got in_channels={list(in_channels)}")
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales, norm)
        self.lateral = nn.ModuleList(ConvNormAct(c, channels, 1, norm) for c in in_channels[:-1])
        self.fpn_out = nn.ModuleList(ConvNormAct(channels, channels, 3, norm) for _ in in_channels[:-1])
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.lateral) + 1:
            raise UserError(f"UPerNet was built for {len(self.lateral) + 1} stages, got {len(features)} feature maps")
        # top-down pathway: each level adds the upsampled coarser level
        levels = [lat(f) for lat, f in zip(self.lateral, features[:-1])] + [self.ppm(features[-1])]
        for i in range(len(levels) - 1, 0, -1):
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size=levels[i - 1].shape[-2:], mode="bilinear",
                                                          align_corners=False)
        outs = [conv(level) for conv, level in zip(self.fpn_out, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))


class _UpBlock(nn.Module):
    """Upsample x2, concatenate the skip, two 3x3 convs."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: Norm) -> None:
        super().__init__()
        self.convs = nn.Sequential(ConvNormAct(in_channels + skip_channels, out_channels, 3, norm),
                                   ConvNormAct(out_channels, out_channels, 3, norm))

    def forward(self, x_BCHW: Tensor, skip_BCHW: Tensor) -> Tensor:
        x_BCHW = F.interpolate(x_BCHW, size=skip_BCHW.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(torch.cat([x_BCHW, skip_BCHW], dim=1))


class RestorationDecoder(nn.Module):
    """Four stage features + the input image -> an image of ``out_channels`` bands at input size.

    The decoder climbs from stride 32 to stride 4 through the stage features,
    then to full resolution through a stride-2 and a stride-1 skip computed from
    the input image by shallow convolutions (the encoder has no features finer than
    stride 4, and pan-sharpening lives in the finest details). The last 1x1 conv
    starts tiny (not zero, so gradients reach the layers below from the first
    step): an untrained decoder returns ``base`` almost unchanged, and fine-tuning
    starts near the identity (cloudy input, or upsampled MS) and learns the residual.
    """

    def __init__(self, in_channels: Sequence[int], image_channels: int, out_channels: int,
                 widths: Sequence[int] = (256, 128, 64, 32, 32), norm: Norm = "gn") -> None:
        super().__init__()
        if len(widths) != len(in_channels) + 1:
            raise UserError(f"widths needs {len(in_channels) + 1} entries (one per stage below the last, plus "
                            f"the stride-2 and stride-1 levels), got {list(widths)}")
        self.bottleneck = ConvNormAct(in_channels[-1], widths[0], 1, norm)
        self.up = nn.ModuleList()
        channels = widths[0]
        for skip, width in zip(reversed(in_channels[:-1]), widths[1:]):
            self.up.append(_UpBlock(channels, skip, width, norm))
            channels = width
        self.image_skip_2 = ConvNormAct(image_channels, widths[-1], 3, norm)  # at stride 2
        self.image_skip_1 = ConvNormAct(image_channels, widths[-1], 3, norm)  # at stride 1
        self.up_2 = _UpBlock(channels, widths[-1], widths[-1], norm)
        self.up_1 = _UpBlock(widths[-1], widths[-1], widths[-1], norm)
        self.out = nn.Conv2d(widths[-1], out_channels, 1)
        nn.init.trunc_normal_(self.out.weight, std=1e-3)
        nn.init.zeros_(self.out.bias)  # type: ignore[arg-type]  # Conv2d(bias=True) has a bias

    def forward(self, features: Sequence[Tensor], image_BCHW: Tensor, base_BCHW: Tensor | None = None) -> Tensor:
        if len(features) != len(self.up) + 1:
            raise UserError(f"decoder was built for {len(self.up) + 1} stages, got {len(features)} feature maps")
        x = self.bottleneck(features[-1])
        for block, skip in zip(self.up, reversed(features[:-1])):
            x = block(x, skip)
        half = F.avg_pool2d(image_BCHW, 2)
        x = self.up_2(x, self.image_skip_2(half))
        x = self.up_1(x, self.image_skip_1(image_BCHW))
        delta = self.out(x)
        if base_BCHW is None:
            return delta
        if base_BCHW.shape != delta.shape:
            raise UserError(f"residual base {tuple(base_BCHW.shape)} does not match the decoder output "
                            f"{tuple(delta.shape)}: give the base image at input size with out_channels bands")
        return base_BCHW + delta


class SimMIMDecoder(nn.Module):
    """SimMIM's linear head: 1x1 conv F -> s*s*C, then PixelShuffle(s).

    Takes the encoder's NHWC features [B, h, w, F] and returns [B, C, H, W]. The 1x1 conv
    (weight kept in Conv2d layout, ``proj``) runs as a matmul on the NHWC tokens and the pixel
    shuffle as one permute: on CPU this is ~3x faster than Conv2d's im2col path and avoids
    the NHWC -> NCHW copy of the features; the numbers are those of Conv2d + PixelShuffle.
    """

    def __init__(self, num_features: int, out_chans: int, encoder_stride: int) -> None:
        super().__init__()
        self.out_chans = out_chans
        self.encoder_stride = encoder_stride
        self.proj = nn.Conv2d(num_features, encoder_stride**2 * out_chans, kernel_size=1)

    def forward(self, features_BhwF: torch.Tensor) -> torch.Tensor:
        B, h, w, _ = features_BhwF.shape
        s, C = self.encoder_stride, self.out_chans
        pixels = F.linear(features_BhwF, self.proj.weight.flatten(1), self.proj.bias)  # [B, h, w, C*s*s]
        # PixelShuffle's channel order is (c, row in cell, col in cell).
        pixels = pixels.view(B, h, w, C, s, s).permute(0, 3, 1, 4, 2, 5)
        return pixels.reshape(B, C, h * s, w * s)
