"""SimMIM mask generator: exact ratio, mask-patch structure, reproducibility, independence per sensor."""
from __future__ import annotations

import pytest
import torch

from msgfm.config import load_config
from msgfm.tasks.masking import SimMIMMaskGenerator, upsample_mask


@pytest.mark.parametrize("config", ["msgfm_swinb_192", "demo_cpu"])
def test_ratio_and_patch_structure_follow_the_config(config):
    cfg = load_config(config)
    gen = SimMIMMaskGenerator.from_config(cfg.model, cfg.masking)
    masks = gen(16, generator=torch.Generator().manual_seed(0))
    side = cfg.model.img_size // cfg.model.patch_size
    assert masks.dtype == torch.bool and masks.shape == (16, side, side)
    scale = cfg.masking.mask_patch_size // cfg.model.patch_size
    # Constant within every mask patch: max-pooling and min-pooling agree.
    blocks = masks.view(16, side // scale, scale, side // scale, scale)
    per_patch = blocks.any(dim=(2, 4))
    assert torch.equal(per_patch, blocks.all(dim=(2, 4)))
    num_patches = (cfg.model.img_size // cfg.masking.mask_patch_size) ** 2
    expected = round(cfg.masking.mask_ratio * num_patches)
    assert per_patch.flatten(1).sum(1).tolist() == [expected] * 16


def test_paper_numbers():
    gen = SimMIMMaskGenerator(img_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    assert (gen.grid, gen.scale, gen.num_mask_patches, gen.num_masked) == (6, 8, 36, 22)
    assert gen.mask_shape == (48, 48)


def test_generator_makes_masks_reproducible_and_samples_differ():
    gen = SimMIMMaskGenerator(img_size=64, mask_patch_size=16, model_patch_size=4, mask_ratio=0.6)
    a = gen(8, generator=torch.Generator().manual_seed(3))
    b = gen(8, generator=torch.Generator().manual_seed(3))
    c = gen(8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(m.flatten().tolist()) for m in a}) > 1  # per-sample masks, not one repeated


def test_paired_sensors_get_independent_masks():
    gen = SimMIMMaskGenerator(img_size=64, mask_patch_size=16, model_patch_size=4, mask_ratio=0.5)
    masks = gen.for_sensors(["sar", "s2"], 32, generator=torch.Generator().manual_seed(0))
    assert set(masks) == {"sar", "s2"}
    assert not torch.equal(masks["sar"], masks["s2"])


def test_upsample_mask_to_pixels():
    mask = torch.tensor([[[True, False], [False, True]]])
    pixels = upsample_mask(mask, 4)
    assert pixels.shape == (1, 1, 8, 8)
    assert pixels[0, 0, :4, :4].all() and not pixels[0, 0, :4, 4:].any() and pixels[0, 0, 4:, 4:].all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(img_size=64, mask_patch_size=12, model_patch_size=4, mask_ratio=0.6), "does not divide"),
    (dict(img_size=64, mask_patch_size=16, model_patch_size=3, mask_ratio=0.6), "not a multiple"),
    (dict(img_size=64, mask_patch_size=16, model_patch_size=4, mask_ratio=1.0), "mask_ratio"),
])
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimMIMMaskGenerator(**kwargs)
