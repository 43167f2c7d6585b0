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

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

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

    def pin_memory(self) -> RawSensorBatch:
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
        normalizers: list[SensorNormalizer] = [x["normalizers"][sensor] for x in samples]
        # a batch holds samples of a few shards: stack each shard's gains once, then pick rows
        distinct = list({id(n): n for n in normalizers}.values())
        row_of = {id(n): row for row, n in enumerate(distinct)}
        row_B = torch.tensor([row_of[id(n)] for n in normalizers])
        sensors[sensor] = RawSensorBatch(
            raw_BCHW=raw_BCHW,
            crop_B4=torch.tensor([box.pixels(a.shape[-2], a.shape[-1]) for box, a in zip(boxes, arrays)]),
            gain_BC=torch.stack([n.gain_C11.view(-1) for n in distinct])[row_B],
            bias_BC=torch.stack([n.bias_C11.view(-1) for n in distinct])[row_B],
            nodata_B=torch.tensor([_nodata_as_stored(n.nodata, a.dtype) for n, a in zip(normalizers, arrays)],
                                  dtype=torch.float32),
            quantize_B=torch.tensor([resizes_in_uint8(a.dtype, n) for n, a in zip(normalizers, arrays)],
                                    dtype=torch.bool))
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
    flips = [tuple(f) for f in batch["flip_B2"].tolist()]
    images, valid = {}, {}
    for sensor, raw in batch["sensors"].items():
        x_BCSS, valid_BCSS = _sensor_batch(raw, flips, size, device)
        images[sensor] = x_BCSS if dtype is None else x_BCSS.to(dtype)
        valid[sensor] = valid_BCSS
    return {"images": images, "valid": valid, "ids": batch["ids"]}


def _sensor_batch(raw: RawSensorBatch, flips: list[tuple[bool, bool]], size: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # every branch and table below is decided from host-side tensors: no device sync per batch
    crops = raw.crop_B4.tolist()
    quantize = raw.quantize_B.tolist()
    taps = _max_taps(crops, size)
    gain_BC11 = raw.gain_BC.to(device, non_blocking=True)[..., None, None]
    bias_BC11 = raw.bias_BC.to(device, non_blocking=True)[..., None, None]
    stored_BCHW = _to_device(raw.raw_BCHW, device)
    x_BCSS = None
    if any(quantize):
        tables = [_batch_tables(crops, flips, [UINT8] * len(crops), size, taps, axis, device) for axis in (1, 0)]
        x_BCSS = _resize_uint8(stored_BCHW, tables, taps).mul_(gain_BC11).add_(bias_BC11)
        if all(quantize):
            return x_BCSS, torch.ones(x_BCSS.shape, dtype=torch.bool, device=device)
    x_BCWH = _transposed(stored_BCHW, torch.float32)  # the layout the first (width) pass reads
    valid_BCWH = None
    has_nodata = not bool(raw.nodata_B.isnan().all())
    if raw.raw_BCHW.is_floating_point() or has_nodata:
        valid_BCWH = torch.isfinite(x_BCWH)
        if has_nodata:  # NaN (no nodata value) never compares equal
            valid_BCWH &= x_BCWH != raw.nodata_B.to(device, non_blocking=True)[:, None, None, None]
    x_BCWH.mul_(gain_BC11).add_(bias_BC11)
    if valid_BCWH is not None:
        x_BCWH.masked_fill_(~valid_BCWH, 0.0)
    # the host antialiases both axes of a sample when its crop is larger than S in either
    kinds = [ANTIALIAS if h > size or w > size else BILINEAR for _, _, h, w in crops]
    tables = [_batch_tables(crops, flips, kinds, size, taps, axis, device) for axis in (1, 0)]
    y_BCSS = _resize_float(x_BCWH, tables)
    if valid_BCWH is None:
        valid_BCSS = torch.ones(y_BCSS.shape, dtype=torch.bool, device=device)
    else:
        # a pixel that mixed in an invalid source pixel is invalid too, and zeroed like nodata itself
        valid_BCSS = _resize_float(valid_BCWH.to(torch.float32), tables) >= VALID_MASK_THRESHOLD
        y_BCSS.masked_fill_(~valid_BCSS, 0.0)
    if x_BCSS is not None:  # a batch mixing 8-bit samples with others (shards of different kinds)
        pick_B111 = raw.quantize_B.to(device, non_blocking=True)[:, None, None, None]
        y_BCSS = torch.where(pick_B111, x_BCSS, y_BCSS)
        valid_BCSS = valid_BCSS | pick_B111
    return y_BCSS, valid_BCSS


def _to_device(stored: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The stored values on ``device``, in a dtype whose conversion to float every device has."""
    if stored.dtype == torch.uint16:  # few CUDA kernels take uint16: move the bits as int16
        bits = stored.view(torch.int16).to(device, non_blocking=True)
        return bits.to(torch.int32).bitwise_and_(0xFFFF)
    return stored.to(device, non_blocking=True)


def _max_taps(crops: list[list[int]], size: int) -> int:
    """Taps per output pixel that cover every sample: torch's filter spans ``2 x support``
    source pixels (support: the crop/output ratio when shrinking, else 1), so at most
    ``ceil(2 x support)`` of them have a weight."""
    longest = max(max(h, w) for _, _, h, w in crops)
    return math.ceil(2 * max(longest / size, 1.0))


# ---- resize tables: which source pixels (K taps) and weights make each output pixel ---------

# How the host resizes a sample (transforms.apply_box): float bilinear, float antialiased (the
# crop is larger than S), or torch's 8-bit kernel (antialiased, fixed-point weights).
BILINEAR, ANTIALIAS, UINT8 = "bilinear", "antialias", "uint8"


@dataclass(frozen=True)
class _AxisTable:
    """Resizing one crop axis of a given length to S: per output pixel K source pixels."""

    local_SK: torch.Tensor  # int64 index inside the crop (mirrored for a flipped crop)
    weight_SK: torch.Tensor  # float32; for UINT8 the integer fixed-point weights
    step: torch.Tensor  # [] float32: 2**-fractional bits of the UINT8 weights, else 1


@functools.lru_cache(maxsize=4096)
def _axis_table(length: int, size: int, taps: int, kind: str, flip: bool, device: torch.device) -> _AxisTable:
    """Cached per device: a batch needs one table per distinct crop length, and crop lengths
    take a few hundred values at most, so the tables are computed once per run."""
    if kind == UINT8:
        local_SK, weight_SK, bits = _uint8_taps(length, size, taps)
        step = 2.0 ** -bits
    elif kind == ANTIALIAS:
        scale = torch.tensor(length, dtype=torch.float32) / size
        local_SK, weight_SK = _antialias_taps(length, scale, size, taps, torch.float32)
        step = 1.0
    else:
        local_SK, weight_SK = _bilinear_taps(length, size, taps)
        step = 1.0
    if flip:
        local_SK = length - 1 - local_SK
    return _AxisTable(local_SK=local_SK.to(device), weight_SK=weight_SK.to(device, torch.float32),
                      step=torch.tensor(step, dtype=torch.float32, device=device))


def _batch_tables(crops: list[list[int]], flips: list[tuple[bool, bool]], kinds: list[str], size: int, taps: int,
                  axis: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stored-pixel index [B,S,K], weight [B,S,K] and step [B] of one axis (0 height, 1 width)
    for every sample of a batch."""
    start, length, flip = (TOP, HEIGHT, 1) if axis == 0 else (LEFT, WIDTH, 0)
    tables = [_axis_table(crop[length], size, taps, kind, f[flip], device)
              for crop, f, kind in zip(crops, flips, kinds)]
    start_B11 = torch.tensor([crop[start] for crop in crops]).to(device, non_blocking=True)[:, None, None]
    index_BSK = torch.stack([t.local_SK for t in tables]).add_(start_B11)
    return index_BSK, torch.stack([t.weight_SK for t in tables]), torch.stack([t.step for t in tables])


def _bilinear_taps(length: int, size: int, taps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch's float bilinear resize (``upsample_bilinear2d``, align_corners=False) of a
    length-``length`` axis to ``size``: 2 taps, computed in float32 in torch's order."""
    scale = torch.tensor(length, dtype=torch.float32) / size
    src_S = (scale * (torch.arange(size, dtype=torch.float32) + 0.5) - 0.5).clamp_min(0.0)
    first_S = src_S.floor().clamp_max(length - 1)
    lam_S = (src_S - first_S).clamp(0.0, 1.0)
    second_S = (first_S + 1).clamp_max(length - 1)
    local_SK = torch.stack([first_S, second_S], dim=-1).long()
    weight_SK = torch.stack([1.0 - lam_S, lam_S], dim=-1)
    return F.pad(local_SK, (0, taps - 2)), F.pad(weight_SK, (0, taps - 2))


def _antialias_taps(length: int, scale: torch.Tensor, size: int, taps: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch's antialiased bilinear weights (``_compute_indices_min_size_weights_aa``) in
    ``dtype``: a triangle filter stretched by the shrink factor, normalized to sum 1."""
    shrink = bool(scale >= 1.0)
    support = scale if shrink else torch.ones_like(scale)
    inv_scale = 1.0 / scale if shrink else torch.ones_like(scale)
    own_taps = support.ceil() * 2 + 1
    center_S = scale * (torch.arange(size, dtype=dtype) + 0.5)
    first_S = (center_S - support + 0.5).trunc().clamp_min(0.0)
    count_S = torch.minimum((center_S + support + 0.5).trunc().clamp_max(length) - first_S, own_taps).clamp_min(0.0)
    tap_K = torch.arange(taps, dtype=dtype)
    index_SK = first_S[:, None] + tap_K
    weight_SK = (1.0 - (((index_SK - center_S[:, None]) + 0.5) * inv_scale).abs()).clamp_min(0.0)
    weight_SK = torch.where(tap_K < count_S[:, None], weight_SK, 0.0)
    total_S = torch.zeros_like(center_S)
    for k in range(taps):  # summed in torch's order: the weights match it to the last bit
        total_S = total_S + weight_SK[:, k]
    weight_SK = torch.where(total_S[:, None] != 0, weight_SK / total_S[:, None], weight_SK)
    return index_SK.clamp_max(length - 1).long(), weight_SK


def _uint8_taps(length: int, size: int, taps: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Torch's uint8 antialiased bilinear (``_compute_index_ranges_int16_weights``): float64
    weights rounded to integers with ``bits`` fractional bits, the most that keep the largest
    weight of the axis under 2**15. Returns index [S,K], integer weights [S,K], bits."""
    scale = torch.tensor(length, dtype=torch.float64) / size
    local_SK, weight_SK = _antialias_taps(length, scale, size, taps, torch.float64)
    max_weight = float(weight_SK.max())
    bits = 0
    while bits < _MAX_WEIGHT_BITS and int(0.5 + max_weight * (1 << (bits + 1))) < 2**15:
        bits += 1
    return local_SK, (0.5 + weight_SK * (1 << bits)).trunc(), bits


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


Tables = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (index, weight, step) of width, then height


def _resize_float(x_BCWH: torch.Tensor, tables: Tables) -> torch.Tensor:
    """Crop, flip and resize float32 images given transposed, [B,C,W,H] -> [B,C,S,S], width first."""
    (width_index, width_weight, _), (height_index, height_weight, _) = tables
    x_BCSH = _resize_axis(x_BCWH, width_index, width_weight)
    return _resize_axis(_transposed(x_BCSH, torch.float32), height_index, height_weight)


def _resize_uint8(x_BCHW: torch.Tensor, tables: Tables, taps: int) -> torch.Tensor:
    """Torch's uint8 antialiased resize of [B,C,H,W] values in 0..255 -> [B,C,S,S] integers
    (as float32): integer multiply-adds, rounded half up and clamped to 8 bits after each
    pass, width first. The sums are exact in float32 below 2**24, i.e. up to 4 taps."""
    compute = torch.float32 if taps <= 4 else torch.float64
    out = x_BCHW
    for index_BSK, weight_BSK, step_B in tables:
        step_B111 = step_B.to(compute)[:, None, None, None]
        acc = _resize_axis(_transposed(out, compute), index_BSK, weight_BSK).add_(0.5 / step_B111)
        out = acc.mul_(step_B111).floor_().clamp_(0, 255)  # the kernel's (acc + half) >> bits
    return out.to(torch.float32)
