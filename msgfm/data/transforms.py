"""Per-sample transforms: normalization with the recorded statistics, validity masks,
and the paper's augmentation (random resized crop to the model size, scale
(0.67, 1), flips) drawn once per sample and applied identically to every sensor
of a pair, so that the pair stays co-registered.

Order of work for one sensor of one sample (cheapest first):
crop the raw array (a numpy view) -> validity mask on the crop -> float32 and
normalize in one multiply-add -> invalid pixels set to 0 (= the band mean) ->
resize to ``img_size`` with ``torch.nn.functional.interpolate``. Flips are views of
the crop, taken before the copy. uint8 data without nodata is resized before
normalizing, in uint8 (see :func:`apply_box`).

Training does this work batched on the training device (msgfm.data.device_transforms,
which must give the same result); the per-sample functions here are its reference and the
host path ``python -m msgfm.bench.data`` compares it with. Workers use only the drawing
of the boxes (:meth:`SampleTransform.draw`).

Shape legend: C channels, H x W the stored sample, h x w the crop, S the output
side (``model.img_size``).
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# A resized validity mask is valid only where every source pixel it mixes was valid
# (bilinear weights of fully valid neighbourhoods sum to 1 up to rounding).
VALID_MASK_THRESHOLD = 1.0 - 1e-4


@dataclass(frozen=True)
class CropBox:
    """A crop in fractions of the sample's height and width (so it maps onto sensors
    stored at different pixel sizes), plus the flips to apply."""

    top: float
    left: float
    height: float
    width: float
    hflip: bool = False
    vflip: bool = False

    def pixels(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) in pixels of a sensor stored at ``height`` x ``width``."""
        top = int(round(self.top * height))
        left = int(round(self.left * width))
        h = max(1, min(height - top, int(round(self.height * height))))
        w = max(1, min(width - left, int(round(self.width * width))))
        return top, left, h, w


FULL_FRAME = CropBox(top=0.0, left=0.0, height=1.0, width=1.0)


def random_crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                    rng: random.Random, *, hflip: bool = True, vflip: bool = False) -> CropBox:
    """A RandomResizedCrop box: area fraction in ``scale``, aspect ratio (w/h) log-uniform in
    ``ratio``, uniform position; falls back to the largest centred box within ``ratio`` after
    ten misses (the usual recipe). Flips with probability 0.5 each when enabled."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    box = None
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            box = (rng.randint(0, height - h), rng.randint(0, width - w), h, w)
            break
    if box is None:
        aspect = width / height
        if aspect < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif aspect > ratio[1]:
            h, w = height, int(round(height * ratio[1]))
        else:
            h, w = height, width
        box = ((height - h) // 2, (width - w) // 2, h, w)
    top, left, h, w = box
    do_hflip = hflip and rng.random() < 0.5
    do_vflip = vflip and rng.random() < 0.5
    return CropBox(top=top / height, left=left / width, height=h / height, width=w / width,
                   hflip=do_hflip, vflip=do_vflip)


def center_crop_box(height: int, width: int) -> CropBox:
    """The centred square of side min(height, width): validation resizes it to the model size."""
    side = min(height, width)
    return CropBox(top=(height - side) // 2 / height, left=(width - side) // 2 / width,
                   height=side / height, width=side / width)


@dataclass(frozen=True)
class SensorNormalizer:
    """Raw stored values -> normalized float32, for one sensor of one shard.

    ``(raw * scale + offset - mean) / std`` folded into one gain and bias per band, so
    the statistics apply in physical units whatever scale/offset a shard was written with.
    """

    gain_C11: torch.Tensor  # scale / std
    bias_C11: torch.Tensor  # (offset - mean) / std
    nodata: float | None

    @classmethod
    def from_stats(cls, mean: Sequence[float], std: Sequence[float], *, scale: float = 1.0,
                   offset: float = 0.0, nodata: float | None = None) -> SensorNormalizer:
        mean64 = np.asarray(mean, dtype=np.float64)
        std64 = np.asarray(std, dtype=np.float64)
        assert mean64.shape == std64.shape and (std64 > 0).all(), "stats are validated by load_stats"
        gain = scale / std64
        bias = (offset - mean64) / std64
        return cls(gain_C11=torch.from_numpy(gain.astype(np.float32)).view(-1, 1, 1),
                   bias_C11=torch.from_numpy(bias.astype(np.float32)).view(-1, 1, 1),
                   nodata=nodata)

    def __call__(self, raw_Chw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalized float32 [C,h,w] with invalid pixels set to 0, and the validity mask
        (None when every pixel is valid by construction: integer data without nodata)."""
        valid_Chw = None
        if self.nodata is not None:
            valid_Chw = raw_Chw != self.nodata
        if raw_Chw.dtype.kind == "f":
            finite = np.isfinite(raw_Chw)
            valid_Chw = finite if valid_Chw is None else valid_Chw & finite
        contiguous = np.ascontiguousarray(raw_Chw)  # copies crops and flipped views
        # float32 input that was not copied must not be normalized in the caller's buffer
        x_Chw = torch.from_numpy(contiguous).to(torch.float32, copy=contiguous is raw_Chw)
        x_Chw.mul_(self.gain_C11).add_(self.bias_C11)
        if valid_Chw is None:
            return x_Chw, None
        valid_t = torch.from_numpy(valid_Chw)
        if bool(valid_t.all()):
            return x_Chw, None
        x_Chw.masked_fill_(~valid_t, 0.0)
        return x_Chw, valid_t


def _resize(x_Chw: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x_Chw.shape[-2:]
    if h == size and w == size:
        return x_Chw
    downscale = h > size or w > size  # antialias only matters (and only costs) when shrinking
    return F.interpolate(x_Chw[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=downscale)[0]


def apply_box(raw_CHW: np.ndarray, normalizer: SensorNormalizer, box: CropBox,
              size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop, flip, normalize and resize one sensor's raw sample.

    Returns the float32 image [C,S,S] and its bool validity mask [C,S,S]; a pixel whose
    resize mixes in an invalid source pixel is invalid too; every invalid pixel is 0.
    Flips are taken as numpy views of the crop before resizing (bilinear resizing commutes
    with flips), so they cost nothing: the crop is copied once anyway. uint8 data without
    nodata is resized as uint8 before normalizing, as PIL does in the paper's SimMIM
    pipeline (and several times faster than the float path: torch has a SIMD uint8 kernel).
    """
    top, left, h, w = box.pixels(raw_CHW.shape[-2], raw_CHW.shape[-1])
    crop_Chw = raw_CHW[:, top:top + h, left:left + w]
    if box.hflip:
        crop_Chw = crop_Chw[:, :, ::-1]
    if box.vflip:
        crop_Chw = crop_Chw[:, ::-1, :]
    if resizes_in_uint8(raw_CHW.dtype, normalizer):
        x_CSS = _resize_uint8(torch.from_numpy(np.ascontiguousarray(crop_Chw)), size)
        x_CSS = x_CSS.to(torch.float32).mul_(normalizer.gain_C11).add_(normalizer.bias_C11)
        return x_CSS, torch.ones(x_CSS.shape, dtype=torch.bool)
    x_Chw, valid_Chw = normalizer(crop_Chw)
    x_CSS = _resize(x_Chw, size)
    if valid_Chw is None:
        return x_CSS, torch.ones(x_CSS.shape, dtype=torch.bool)
    valid_CSS = _resize(valid_Chw.to(torch.float32), size) >= VALID_MASK_THRESHOLD
    # pixels that mixed in an invalid source pixel are invalid too, and zeroed like nodata itself
    return x_CSS.masked_fill_(~valid_CSS, 0.0), valid_CSS


def resizes_in_uint8(dtype: np.dtype, normalizer: SensorNormalizer) -> bool:
    """Is a sample resized as 8-bit values (rounded to integers), as PIL does in the paper's
    SimMIM pipeline? uint8 data without nodata (nodata needs the float path's masks)."""
    return dtype == np.uint8 and normalizer.nodata is None


def _resize_uint8(x_Chw: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of uint8 data, rounded back to uint8."""
    if x_Chw.shape[-2:] == (size, size):
        return x_Chw
    # uint8 with antialias=True takes torch's SIMD kernel (for enlarging it is plain bilinear);
    # measured faster in the stored [C,h,w] layout than with channels-last round trips
    out = F.interpolate(x_Chw[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0]


@dataclass(frozen=True)
class SampleTransform:
    """Training (random resized crop + flips) or validation (centre crop + resize) for a
    sample of one or two sensors; one box per sample, shared by its sensors."""

    img_size: int
    train: bool
    crop_scale: tuple[float, float] = (0.67, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    vflip: bool = False

    def box(self, height: int, width: int, rng: random.Random) -> CropBox:
        if not self.train:
            return center_crop_box(height, width)
        return random_crop_box(height, width, self.crop_scale, self.crop_ratio, rng,
                               hflip=self.hflip, vflip=self.vflip)

    def draw(self, raw: dict[str, np.ndarray], rng: random.Random) -> CropBox:
        """The box of one sample (sensor -> [C,H,W] stored arrays), shared by its sensors."""
        first = next(iter(raw.values()))
        return self.box(first.shape[-2], first.shape[-1], rng)

    def __call__(self, raw: dict[str, np.ndarray], normalizers: dict[str, SensorNormalizer],
                 rng: random.Random) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """raw: sensor -> [C,H,W] stored array. Returns (images, valid): sensor -> [C,S,S]."""
        box = self.draw(raw, rng)
        images, valid = {}, {}
        for sensor, raw_CHW in raw.items():
            images[sensor], valid[sensor] = apply_box(raw_CHW, normalizers[sensor], box, self.img_size)
        return images, valid
