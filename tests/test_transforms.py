"""Per-sample transforms: normalization, validity masks, co-registered paired augmentation."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from msgfm.data.transforms import CropBox, SampleTransform, SensorNormalizer, apply_box, random_crop_box


def test_normalizer_applies_scale_offset_then_stats():
    raw = np.random.default_rng(0).integers(0, 10000, (3, 5, 5), dtype=np.uint16)
    mean, std = [0.1, 0.2, 0.3], [0.05, 0.1, 0.2]
    x, valid = SensorNormalizer.from_stats(mean, std, scale=1e-4, offset=0.01)(raw)
    expected = (raw * 1e-4 + 0.01 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert valid is None and x.dtype == torch.float32


def test_nodata_and_nonfinite_pixels_become_zero_and_invalid():
    raw = np.full((2, 4, 4), 5.0, np.float32)
    raw[0, 0, 0], raw[0, 1, 1], raw[1, 2, 2], raw[1, 3, 3] = np.nan, np.inf, -np.inf, -99.0
    norm = SensorNormalizer.from_stats([1.0, 1.0], [2.0, 2.0], nodata=-99.0)
    x, valid = norm(raw)
    bad = np.zeros((2, 4, 4), bool)
    bad[0, 0, 0] = bad[0, 1, 1] = bad[1, 2, 2] = bad[1, 3, 3] = True
    assert np.array_equal(valid.numpy(), ~bad)
    assert torch.isfinite(x).all()
    assert (x.numpy()[bad] == 0).all() and np.allclose(x.numpy()[~bad], 2.0)
    assert np.isnan(raw[0, 0, 0])  # the caller's buffer is left alone


def test_random_crop_box_respects_scale_and_ratio():
    rng = random.Random(0)
    flips = 0
    for _ in range(300):
        box = random_crop_box(120, 120, (0.67, 1.0), (3 / 4, 4 / 3), rng)
        top, left, h, w = box.pixels(120, 120)
        assert 0.6 <= h * w / 120**2 <= 1.0 and 0.7 <= w / h <= 1.4
        assert top + h <= 120 and left + w <= 120
        flips += box.hflip
    assert 100 < flips < 200


def _paired_sample(size: int, seed: int, dtype=np.uint8) -> dict[str, np.ndarray]:
    """rgb random; dsm = 2 * red + 5 pixel by pixel (a deterministic function of the partner)."""
    rgb = np.random.default_rng(seed).integers(0, 256, (3, size, size), dtype=np.uint8)
    return {"rgb": rgb.astype(dtype), "dsm": (2.0 * rgb[:1] + 5.0).astype(np.float32)}


# uint8 is resized as uint8 (fixed-point weights, off by at most 1): dsm = 2 red + 5 then holds to
# 2 x 1; float data exactly.
# A crop misaligned by even one pixel breaks the relation by tens of units on this random image.
@pytest.mark.parametrize("dtype,atol", [(np.uint8, 2.01), (np.float32, 1e-3)])
@pytest.mark.parametrize("stored", [48, 20])  # shrink (antialiased) and enlarge to 32
def test_paired_augmentation_keeps_sensors_coregistered(stored, dtype, atol):
    tf = SampleTransform(img_size=32, train=True, crop_scale=(0.3, 1.0), vflip=True)
    norms = {"rgb": SensorNormalizer.from_stats([100.0] * 3, [50.0] * 3),
             "dsm": SensorNormalizer.from_stats([200.0], [80.0])}
    boxes = set()
    for seed in range(12):
        raw = _paired_sample(stored, seed, dtype)
        rng = random.Random(seed)
        images, valid = tf(raw, norms, rng)
        boxes.add(tf.box(stored, stored, random.Random(seed)))
        red = images["rgb"][0] * 50.0 + 100.0  # back to raw units
        dsm = images["dsm"][0] * 80.0 + 200.0
        # resize and flips are linear with weights summing to 1: the relation survives only if both
        # sensors got the same crop, size and flips
        torch.testing.assert_close(dsm, 2.0 * red + 5.0, rtol=0, atol=atol)
        assert images["rgb"].shape == (3, 32, 32) and images["dsm"].shape == (1, 32, 32)
        assert valid["rgb"].all() and valid["dsm"].all()
    assert len(boxes) == 12 and any(b.hflip for b in boxes) and any(b.vflip for b in boxes)


def test_mismatched_boxes_would_break_the_relation():
    """Guards the test above: different crops for the two sensors do violate dsm = 2 red + 5."""
    raw = _paired_sample(48, 0, np.float32)
    norm = SensorNormalizer.from_stats([0.0] * 3, [1.0] * 3)
    red, _ = apply_box(raw["rgb"], norm, CropBox(top=0.0, left=0.0, height=0.8, width=0.8), 32)
    dsm, _ = apply_box(raw["dsm"], SensorNormalizer.from_stats([0.0], [1.0]),
                       CropBox(top=0.1, left=0.0, height=0.8, width=0.8), 32)
    assert (dsm[0] - (2.0 * red[0] + 5.0)).abs().max() > 20


def test_valid_masks_follow_the_pair():
    """The same nodata square in both sensors stays in the same place after augmentation."""
    tf = SampleTransform(img_size=32, train=True)
    rgb = np.full((3, 40, 40), 100, np.uint8)
    dsm = np.full((1, 40, 40), 12.0, np.float32)  # normalized: 2
    rgb[:, 5:15, 20:30] = 0
    dsm[:, 5:15, 20:30] = -1.0
    norms = {"rgb": SensorNormalizer.from_stats([100.0] * 3, [10.0] * 3, nodata=0),
             "dsm": SensorNormalizer.from_stats([10.0], [1.0], nodata=-1.0)}
    for seed in range(8):
        images, valid = tf({"rgb": rgb, "dsm": dsm}, norms, random.Random(seed))
        assert torch.equal(valid["rgb"][0], valid["dsm"][0]) and torch.equal(valid["rgb"][0], valid["rgb"][2])
        assert 0 < (~valid["dsm"]).sum() < 32 * 32
        # valid pixels never mix in the 0-filled nodata: they keep the exact normalized value
        torch.testing.assert_close(images["dsm"][valid["dsm"]], torch.full_like(images["dsm"][valid["dsm"]], 2.0))
        assert (images["dsm"][~valid["dsm"]] < 2.0 - 1e-3).all()


def test_validation_transform_is_deterministic_centre_crop():
    tf = SampleTransform(img_size=16, train=False)
    raw = {"rgb": np.random.default_rng(0).integers(0, 256, (3, 24, 32), dtype=np.uint8)}
    norms = {"rgb": SensorNormalizer.from_stats([0.0] * 3, [1.0] * 3)}
    a, _ = tf(raw, norms, random.Random(1))
    b, _ = tf(raw, norms, random.Random(2))
    assert torch.equal(a["rgb"], b["rgb"])
    assert tf.box(24, 32, random.Random(0)).pixels(24, 32) == (0, 4, 24, 24)
    same = SampleTransform(img_size=24, train=False)({"rgb": raw["rgb"][:, :, 4:28]}, norms, random.Random(0))[0]
    assert torch.equal(same["rgb"], torch.from_numpy(raw["rgb"][:, :, 4:28]).float())
