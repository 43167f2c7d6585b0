"""SimMIM random masking: square mask patches, a fixed number masked per sample.

A mask patch (``mask_patch_size`` pixels, 32 in the paper) is the unit of masking;
the model sees the mask at its own patch resolution (``model_patch_size``, 4), so
every mask patch covers a ``scale x scale`` block of model patches
(``scale = mask_patch_size // model_patch_size``).

Legend: B batch, G = (img_size / mask_patch_size) ** 2 mask patches per image,
h = w = img_size / model_patch_size model patches per side.

Every sample gets exactly ``num_masked = floor(mask_ratio * G + 0.5)`` masked mask
patches (round half up), drawn without replacement on the requested device, so a
mask costs no host round trip. For a paired sample each sensor gets its own,
independent mask (:meth:`SimMIMMaskGenerator.for_sensors`).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from msgfm.config import MaskingConfig, ModelConfig
from msgfm.errors import UserError


class SimMIMMaskGenerator:
    """Draws boolean SimMIM masks ``[B, h, w]`` at model-patch resolution (True = masked)."""

    def __init__(self, img_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float) -> None:
        if mask_patch_size % model_patch_size:
            raise UserError(f"masking.mask_patch_size {mask_patch_size} is not a multiple of the model patch "
                            f"size {model_patch_size}")
        if img_size % mask_patch_size:
            raise UserError(f"masking.mask_patch_size {mask_patch_size} does not divide the image size {img_size}")
        if not 0.0 < mask_ratio < 1.0:
            raise UserError(f"masking.mask_ratio must be in (0, 1), got {mask_ratio}")
        self.img_size = img_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.grid = img_size // mask_patch_size  # mask patches per side
        self.scale = mask_patch_size // model_patch_size  # model patches per mask patch side
        self.num_mask_patches = self.grid**2
        self.num_masked = int(math.floor(mask_ratio * self.num_mask_patches + 0.5))

    @classmethod
    def from_config(cls, model: ModelConfig, masking: MaskingConfig) -> SimMIMMaskGenerator:
        """The generator of a run's ``masking.*`` for its ``model.img_size/patch_size``."""
        return cls(model.img_size, masking.mask_patch_size, model.patch_size, masking.mask_ratio)

    @property
    def mask_shape(self) -> tuple[int, int]:
        """(h, w) of one mask: model patches per side."""
        side = self.grid * self.scale
        return side, side

    def __call__(self, batch_size: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """Masks for ``batch_size`` samples: Bool ``[B, h, w]``, True where the patch is masked.

        ``device`` defaults to the generator's device (or CPU); a generator must live on the
        device the mask is drawn on, as torch requires.
        """
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        # Random scores, then the num_masked smallest per row: exactly num_masked patches per sample.
        scores_BG = torch.rand(batch_size, self.num_mask_patches, generator=generator, device=device)
        ranks_BG = scores_BG.argsort(dim=1).argsort(dim=1)
        masked_BG = ranks_BG < self.num_masked
        mask_Bgg = masked_BG.view(batch_size, self.grid, self.grid)
        # Each mask patch covers scale x scale model patches.
        return mask_Bgg.repeat_interleave(self.scale, dim=1).repeat_interleave(self.scale, dim=2)

    def for_sensors(self, sensors: Iterable[str], batch_size: int, *, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """One independent mask per sensor of a (paired) sample: {sensor: Bool [B, h, w]}."""
        return {sensor: self(batch_size, generator=generator, device=device) for sensor in sensors}


def upsample_mask(mask_Bhw: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Model-patch mask ``[B, h, w]`` -> pixel mask ``[B, 1, h * patch, w * patch]`` (same dtype)."""
    return mask_Bhw.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2).unsqueeze(1)
