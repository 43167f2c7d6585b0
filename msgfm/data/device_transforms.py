"""Normalization and augmentation of whole batches, on the device the model trains on.

DataLoader workers only read: each sample's stored arrays (native dtype) and its crop box
and flips, drawn exactly as before from the sample's own random stream, so a run's crops
and flips do not depend on where they are applied. :func:`collate_raw` stacks them into a
*raw batch*; :func:`device_batch` turns it, on any device (the CPU for CPU training),
into the batch the model takes::

    batch = device_batch(raw_batch, device, dtype)
    # {"images": {sensor: float [B,C,S,S] normalized}, "valid": {sensor: bool [B,C,S,S]}, "ids": [...]}

It computes what the per-sample reference :func:`msgfm.data.transforms.apply_box`
computes, for every sample at once: crop, flips, normalization with the shard's
statistics, nodata/NaN -> validity mask and 0, resize to ``S``. The resize is separable
(width first, then height, as torch's CPU kernels do): each output column (row) is a
weighted sum of ``K`` source columns (rows) gathered per sample, with the weights torch's
``F.interpolate`` uses on the host: bilinear (antialiased when the crop is larger than
``S``) in float32, and for 8-bit data without nodata torch's fixed-point uint8 kernel,
reproduced in integers so that the result is bit for bit the host's. Flips map output
pixels to mirrored source pixels before resizing, as the host flips the crop first.

Legend: B batch, C channels, H x W stored side (the largest in the batch), S output side,
K taps per output pixel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from msgfm.data.transforms import VALID_MASK_THRESHOLD, SensorNormalizer, resizes_in_uint8

# Columns of ``RawSensorBatch.crop_B4``.
TOP, LEFT, HEIGHT, WIDTH = range(4)
# torch's uint8 kernel: weights are int16 with the most fractional bits that keep the
# largest weight of an axis under 2**15, searched up to this many bits.
_MAX_WEIGHT_BITS = 22


@dataclass
class RawSensorBatch:
    """One sensor of a raw batch: what the workers read, plus per-sample parameters
    (samples of one batch may come from shards with different scale, offset or nodata)."""

    raw_BCHW: torch.Tensor  # stored values, native dtype; zero-padded where samples are smaller
    crop_B4: torch.Tensor  # int64 (top, left, height, width) in this sensor's pixels
    gain_BC: torch.Tensor  # float32 scale / std
    bias_BC: torch.Tensor  # float32 (offset - mean) / std
    nodata_B: torch.Tensor  # float32 nodata value in the stored dtype, NaN where there is none
    quantize_B: torch.Tensor  # bool: resized as 8 bit (uint8 without nodata), like the host path

    def pin_memory(self) -> "RawSensorBatch":
        """Called by the DataLoader's pinning thread (``pin_memory=True``)."""
        return RawSensorBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


def collate_raw(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Raw samples (see ``GroupDataset``) -> raw batch ``{"sensors": {sensor: RawSensorBatch},
    "flip_B2": bool [B,2] (horizontal, vertical), "size": S, "ids": [...], "corrupt": [...]}``."""
    boxes = [x["box"] for x in samples]
    batch_arrays = samples[0].get("batch_arrays")
    if not (batch_arrays is not None and all(x.get("batch_arrays") is batch_arrays and x["slot"] == i
                                              for i, x in enumerate(samples))):
        batch_arrays = None
    sensors = {}
    for sensor in samples[0]["raw"]:
        arrays = [x["raw"][sensor] for x in samples]
        if batch_arrays is not None and len(batch_arrays[sensor]) == len(samples):
            raw_BCHW = torch.from_numpy(batch_arrays[sensor])  # the reader filled it row by row: no copy
        else:
            raw_BCHW = _stack(arrays)
        # a batch holds samples of a few shards: one row of gains per distinct normalizer
        distinct: dict[int, tuple[int, SensorNormalizer]] = {}
        rows = [distinct.setdefault(id(n), (len(distinct), n))[0] for n in (x["normalizers"][sensor] for x in samples)]
        normalizers = [n for _, n in distinct.values()]
        row_B = torch.tensor(rows)
        sensors[sensor] = RawSensorBatch(
            raw_BCHW=raw_BCHW,
            crop_B4=torch.tensor([box.pixels(a.shape[-2], a.shape[-1]) for box, a in zip(boxes, arrays)]),
            gain_BC=torch.stack([n.gain_C11.view(-1) for n in normalizers])[row_B],
            bias_BC=torch.stack([n.bias_C11.view(-1) for n in normalizers])[row_B],
            nodata_B=torch.tensor([_nodata_as_stored(x["normalizers"][sensor].nodata, a.dtype)
                                   for x, a in zip(samples, arrays)], dtype=torch.float32),
            quantize_B=torch.tensor([resizes_in_uint8(a.dtype, x["normalizers"][sensor])
                                     for x, a in zip(samples, arrays)], dtype=torch.bool))
    return {
        "sensors": sensors,
        "flip_B2": torch.tensor([[box.hflip, box.vflip] for box in boxes], dtype=torch.bool),
        "size": int(samples[0]["size"]),
        "ids": [x["id"] for x in samples],
        "corrupt": [rec for x in samples for rec in x.get("corrupt", ())],
    }


def _stack(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """[B,C,H,W] of the samples' arrays; shards of one group may differ in size or dtype, so
    mixed batches are promoted and zero-padded (crops never reach the padding)."""
    first = arrays[0]
    if all(a.shape == first.shape and a.dtype == first.dtype for a in arrays):
        return torch.from_numpy(np.stack(arrays))
    assert len({a.shape[0] for a in arrays}) == 1, "validate_data checks every shard stores the sensor's bands"
    height, width = max(a.shape[1] for a in arrays), max(a.shape[2] for a in arrays)
    out = np.zeros((len(arrays), first.shape[0], height, width), dtype=np.result_type(*arrays))
    for out_CHW, a in zip(out, arrays):
        out_CHW[:, :a.shape[1], :a.shape[2]] = a
    return torch.from_numpy(out)


def _nodata_as_stored(nodata: float | None, dtype: np.dtype) -> float:
    """The value a stored pixel equals when it is nodata: float data compare in their own
    precision on the host (a float16 shard's -9999 is stored as -10000)."""
    if nodata is None:
        return math.nan
    return float(np.asarray(nodata, dtype=dtype)) if dtype.kind == "f" else float(nodata)


def device_batch(batch: dict[str, Any], device: torch.device | str,
                 dtype: torch.dtype | None = None) -> dict[str, Any]:
    """A raw batch (from :func:`collate_raw`) -> ``{"images": {sensor: [B,C,S,S]}, "valid":
    {sensor: bool [B,C,S,S]}, "ids": [...]}`` on ``device``; images in ``dtype`` (default
    float32). Every sensor of a sample gets the sample's crop and flips."""
    device = torch.device(device)
    size = int(batch["size"])
    flip_B2 = batch["flip_B2"]
    images, valid = {}, {}
    for sensor, raw in batch["sensors"].items():
        x_BCSS, valid_BCSS = _sensor_batch(raw, flip_B2, size, device)
        images[sensor] = x_BCSS if dtype is None else x_BCSS.to(dtype)
        valid[sensor] = valid_BCSS
    return {"images": images, "valid": valid, "ids": batch["ids"]}


def _sensor_batch(raw: RawSensorBatch, flip_B2: torch.Tensor, size: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # every branch below is decided from host-side tensors: no device sync per batch
    quantize_B = raw.quantize_B
    all_quantized = bool(quantize_B.all())
    crop_B4 = raw.crop_B4.to(device, non_blocking=True)
    flip_B2 = flip_B2.to(device, non_blocking=True)
    gain_BC11 = raw.gain_BC.to(device, non_blocking=True)[..., None, None]
    bias_BC11 = raw.bias_BC.to(device, non_blocking=True)[..., None, None]
    stored = _to_device(raw.raw_BCHW, device)
    x_BCSS = None
    if quantize_B.any():
        max_taps = _max_taps(raw.crop_B4, size)
        x_BCSS = _resize_uint8(stored, crop_B4, flip_B2, size, max_taps).mul_(gain_BC11).add_(bias_BC11)
        if all_quantized:
            return x_BCSS, torch.ones(x_BCSS.shape, dtype=torch.bool, device=device)
    x_BCWH = _transposed(stored, torch.float32)  # the layout the first (width) pass reads
    valid_BCWH = None
    has_nodata = not bool(raw.nodata_B.isnan().all())
    if raw.raw_BCHW.is_floating_point() or has_nodata:
        valid_BCWH = torch.isfinite(x_BCWH)
        if has_nodata:  # NaN (no nodata value) never compares equal
            valid_BCWH &= x_BCWH != raw.nodata_B.to(device, non_blocking=True)[:, None, None, None]
    x_BCWH.mul_(gain_BC11).add_(bias_BC11)
    if valid_BCWH is not None:
        x_BCWH.masked_fill_(~valid_BCWH, 0.0)
    antialias_B = ((raw.crop_B4[:, HEIGHT] > size) | (raw.crop_B4[:, WIDTH] > size)).to(device, non_blocking=True)
    max_taps = _max_taps(raw.crop_B4, size)
    y_BCSS = _resize_float(x_BCWH, crop_B4, flip_B2, antialias_B, size, max_taps)
    if valid_BCWH is None:
        valid_BCSS = torch.ones(y_BCSS.shape, dtype=torch.bool, device=device)
    else:
        # a pixel that mixed in an invalid source pixel is invalid too, and zeroed like nodata itself
        valid_BCSS = _resize_float(valid_BCWH.to(torch.float32), crop_B4, flip_B2, antialias_B, size,
                                   max_taps) >= VALID_MASK_THRESHOLD
        y_BCSS.masked_fill_(~valid_BCSS, 0.0)
    if x_BCSS is not None:  # a batch mixing 8-bit samples with others (shards of different kinds)
        pick_B111 = quantize_B.to(device, non_blocking=True)[:, None, None, None]
        y_BCSS = torch.where(pick_B111, x_BCSS, y_BCSS)
        valid_BCSS = valid_BCSS | pick_B111
    return y_BCSS, valid_BCSS


def _to_device(stored: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The stored values on ``device``, in a dtype whose conversion to float every device has."""
    if stored.dtype == torch.uint16:  # few CUDA kernels take uint16: move the bits as int16
        bits = stored.view(torch.int16).to(device, non_blocking=True)
        return bits.to(torch.int32).bitwise_and_(0xFFFF)
    return stored.to(device, non_blocking=True)


def _max_taps(crop_B4: torch.Tensor, size: int) -> int:
    """Taps per output pixel that cover every sample: torch's filter spans ``2 x support``
    source pixels (support: the crop/output ratio when shrinking, else 1), so at most
    ``ceil(2 x support)`` of them have a weight."""
    longest = int(crop_B4[:, HEIGHT:].max())
    return math.ceil(2 * max(longest / size, 1.0))


# ---- resize tables: which source pixels (K taps) and weights make each output pixel ---------

def _float_taps(length_B: torch.Tensor, antialias_B: torch.Tensor, size: int,
                max_taps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop-local source index and float32 weight [B,S,K] of torch's float bilinear resize of
    a length-``length_B`` axis to ``size``: plain bilinear (``upsample_bilinear2d``) or, where
    ``antialias_B``, the antialiased filter; computed in float32 in torch's order of operations."""
    f32 = torch.float32
    device = length_B.device
    length = length_B.to(f32)
    scale_B1 = (length / size)[:, None]
    out_S = torch.arange(size, dtype=f32, device=device)
    # plain bilinear, align_corners=False: src = max(scale * (i + 0.5) - 0.5, 0)
    src_BS = (scale_B1 * (out_S + 0.5) - 0.5).clamp_min(0.0)
    first_BS = torch.minimum(src_BS.floor(), length[:, None] - 1)
    lam_BS = (src_BS - first_BS).clamp(0.0, 1.0)
    second_BS = torch.minimum(first_BS + 1, length[:, None] - 1)
    plain_index = torch.stack([first_BS, second_BS], dim=-1)
    plain_weight = torch.stack([1.0 - lam_BS, lam_BS], dim=-1)
    pad = max_taps - 2
    plain_index = torch.nn.functional.pad(plain_index, (0, pad))
    plain_weight = torch.nn.functional.pad(plain_weight, (0, pad))
    aa_index, aa_weight = _antialias_taps(length, scale_B1, size, max_taps, f32)
    pick = antialias_B[:, None, None]
    return torch.where(pick, aa_index, plain_index).long(), torch.where(pick, aa_weight, plain_weight)


def _antialias_taps(length_B: torch.Tensor, scale_B1: torch.Tensor, size: int, max_taps: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's antialiased bilinear weights (``_compute_indices_min_size_weights_aa``) in
    ``dtype``: a triangle filter stretched by the shrink factor, normalized to sum 1."""
    device = length_B.device
    shrink_B1 = scale_B1 >= 1.0
    support_B1 = torch.where(shrink_B1, scale_B1, torch.ones_like(scale_B1))
    inv_scale_B1 = torch.where(shrink_B1, 1.0 / scale_B1, torch.ones_like(scale_B1))
    own_taps_B1 = support_B1.ceil() * 2 + 1
    center_BS = scale_B1 * (torch.arange(size, dtype=dtype, device=device) + 0.5)
    first_BS = (center_BS - support_B1 + 0.5).trunc().clamp_min(0.0)
    count_BS = torch.minimum((center_BS + support_B1 + 0.5).trunc(), length_B.to(dtype)[:, None]) - first_BS
    count_BS = torch.minimum(count_BS.clamp_min(0.0), own_taps_B1)
    tap_K = torch.arange(max_taps, dtype=dtype, device=device)
    index_BSK = first_BS[..., None] + tap_K
    weight_BSK = (1.0 - (((index_BSK - center_BS[..., None]) + 0.5) * inv_scale_B1[..., None]).abs()).clamp_min(0.0)
    weight_BSK = torch.where(tap_K < count_BS[..., None], weight_BSK, 0.0)
    total_BS = torch.zeros_like(center_BS)
    for k in range(max_taps):  # summed in torch's order: the weights match it to the last bit
        total_BS = total_BS + weight_BSK[..., k]
    weight_BSK = torch.where(total_BS[..., None] != 0, weight_BSK / total_BS[..., None], weight_BSK)
    return index_BSK.clamp_max(length_B.to(dtype)[:, None, None] - 1), weight_BSK


def _uint8_taps(length_B: torch.Tensor, size: int, max_taps: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch's uint8 antialiased bilinear (``_compute_index_ranges_int16_weights``): float64
    weights rounded to integers with ``bits_B`` fractional bits. Returns index [B,S,K],
    integer weights [B,S,K] (as float64) and bits [B]."""
    length = length_B.to(torch.float64)
    index_BSK, weight_BSK = _antialias_taps(length, (length / size)[:, None], size, max_taps, torch.float64)
    max_weight_B1 = weight_BSK.flatten(1).amax(dim=1, keepdim=True)
    bits = torch.arange(_MAX_WEIGHT_BITS, dtype=torch.float64, device=length.device)
    fits_BP = (0.5 + max_weight_B1 * torch.exp2(bits + 1)).floor() < 2**15
    bits_B = fits_BP.sum(dim=1)  # the first number of bits at which the next one would overflow int16
    int_weight_BSK = (0.5 + weight_BSK * torch.exp2(bits_B.to(torch.float64))[:, None, None]).trunc()
    return index_BSK.long(), int_weight_BSK, bits_B


def _source_index(local_BSK: torch.Tensor, start_B: torch.Tensor, length_B: torch.Tensor,
                  flip_B: torch.Tensor) -> torch.Tensor:
    """Crop-local indices -> stored indices; a flipped crop reads its pixels mirrored."""
    mirrored = length_B[:, None, None] - 1 - local_BSK
    return start_B[:, None, None] + torch.where(flip_B[:, None, None], mirrored, local_BSK)


# ---- the two separable passes ---------------------------------------------------------------

def _resize_axis(x_BCLR: torch.Tensor, index_BSK: torch.Tensor, weight_BSK: torch.Tensor) -> torch.Tensor:
    """out[b,c,s,:] = sum_k weight[b,s,k] * x[b,c,index[b,s,k],:]: [B,C,L,R] -> [B,C,S,R].

    One ``embedding_bag`` (gather K whole rows and sum them weighted, in one kernel), so the
    resized axis is the second to last; the caller transposes between the passes."""
    B, C, L, R = x_BCLR.shape
    _, S, K = index_BSK.shape
    plane_BC11 = torch.arange(B * C, device=x_BCLR.device).view(B, C, 1, 1) * L
    rows_BCSK = plane_BC11 + index_BSK[:, None]
    weight_BCSK = weight_BSK.to(x_BCLR.dtype)[:, None].expand(B, C, S, K)
    out = F.embedding_bag(rows_BCSK.reshape(-1, K), x_BCLR.reshape(B * C * L, R),
                          per_sample_weights=weight_BCSK.reshape(-1, K), mode="sum")
    return out.view(B, C, S, R)


def _transposed(x_BCHW: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B,C,W,H] contiguous in ``dtype``: converts and transposes in one copy."""
    B, C, H, W = x_BCHW.shape
    return torch.empty((B, C, W, H), dtype=dtype, device=x_BCHW.device).copy_(x_BCHW.transpose(2, 3))


def _resize_float(x_BCWH: torch.Tensor, crop_B4: torch.Tensor, flip_B2: torch.Tensor, antialias_B: torch.Tensor,
                  size: int, max_taps: int) -> torch.Tensor:
    """Crop, flip and resize float32 images given transposed, [B,C,W,H] -> [B,C,S,S], width first."""
    local, weight = _float_taps(crop_B4[:, WIDTH], antialias_B, size, max_taps)
    index = _source_index(local, crop_B4[:, LEFT], crop_B4[:, WIDTH], flip_B2[:, 0])
    x_BCSH = _resize_axis(x_BCWH, index, weight)
    local, weight = _float_taps(crop_B4[:, HEIGHT], antialias_B, size, max_taps)
    index = _source_index(local, crop_B4[:, TOP], crop_B4[:, HEIGHT], flip_B2[:, 1])
    return _resize_axis(_transposed(x_BCSH, torch.float32), index, weight)


def _resize_uint8(x_BCHW: torch.Tensor, crop_B4: torch.Tensor, flip_B2: torch.Tensor, size: int,
                  max_taps: int) -> torch.Tensor:
    """torch's uint8 antialiased resize of [B,C,H,W] values in 0..255 -> [B,C,S,S] integers
    (as float32): integer multiply-adds, rounded half up and clamped to 8 bits after each
    pass, width first. The sums are exact in float32 below 2**24, i.e. up to 4 taps."""
    compute = torch.float32 if max_taps <= 4 else torch.float64
    out = x_BCHW
    for start, length, flip in ((LEFT, WIDTH, 0), (TOP, HEIGHT, 1)):
        local, weight, bits_B = _uint8_taps(crop_B4[:, length], size, max_taps)
        index = _source_index(local, crop_B4[:, start], crop_B4[:, length], flip_B2[:, flip])
        scale_B111 = torch.exp2(-bits_B.to(compute))[:, None, None, None]
        acc = _resize_axis(_transposed(out, compute), index, weight).add_(0.5 / scale_B111)
        out = acc.mul_(scale_B111).floor_().clamp_(0, 255)  # the kernel's (acc + half) >> bits
    return out.to(torch.float32)
