"""The input rasters of a prediction: checked against the model and each other, read tile by tile.

One raster per input sensor of the model, its bands in the sensor's storage order (or named with
``--band-order SENSOR=b1,b2,...`` in the file's order), values in the units of the training rasters
(the scale, offset and nodata the training shards recorded; a nodata value in the file's own
metadata wins). The first sensor's raster is the reference grid: the output gets its CRS,
transform and size. Every other raster lies on the same grid, with one exception: the sensor a
pan-sharpening model sharpens (``task.resolution_ratio`` > 0) may come on its native grid,
``ratio`` times coarser and covering the same bounds; its tiles are then read with a margin and
upsampled bicubically onto the reference grid (as the model saw its low-resolution input in
training; with the margin, a tile equals the same window of the whole upsampled image).

Reads are windowed (``rasterio`` ``window=``): at most one tile plus its margin per sensor at a
time, never the scene. Values are normalized with the model's recorded statistics exactly as the
fine-tuning readers do (:class:`~msgfm.data.transforms.SensorNormalizer`: invalid pixels become 0).

Legend: C channels, T tile side, h x w the part of a tile inside the scene.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rasterio
import torch
import torch.nn.functional as F
from rasterio.windows import Window
from torch import Tensor

from msgfm.data.transforms import SensorNormalizer
from msgfm.errors import MissingFileError, UserError
from msgfm.finetune.inputs import ModelInputs

# Coarse pixels read beyond a tile on each side: bicubic upsampling reaches 2 source pixels out.
UPSAMPLE_MARGIN = 3


@dataclass
class InputRaster:
    """One opened input: which file bands feed the sensor and how its values are normalized."""

    sensor: str
    path: Path
    dataset: Any  # rasterio.DatasetReader
    indexes: list[int]  # 1-based file bands, in the sensor's storage order
    normalizer: SensorNormalizer
    ratio: int  # 1: on the reference grid; r > 1: r times coarser


class SceneInputs:
    """The opened, checked input rasters of one prediction (close with :meth:`close` or ``with``)."""

    def __init__(self, paths: dict[str, Path], model: ModelInputs, *, band_orders: dict[str, list[str]],
                 coarse_sensor: str = "", coarse_ratio: int = 0) -> None:
        self.rasters: list[InputRaster] = []
        try:
            for sensor, path in paths.items():
                self.rasters.append(_open(sensor, path, model, band_orders.get(sensor)))
            reference = self.rasters[0].dataset
            self.crs, self.transform = reference.crs, reference.transform
            self.height, self.width = reference.height, reference.width
            for raster in self.rasters[1:]:
                raster.ratio = self._grid_ratio(raster, coarse_ratio if raster.sensor == coarse_sensor else 0)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> SceneInputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for raster in self.rasters:
            raster.dataset.close()

    @property
    def reference_path(self) -> Path:
        return self.rasters[0].path

    def _grid_ratio(self, raster: InputRaster, allowed_ratio: int) -> int:
        """1 when ``raster`` is on the reference grid, ``allowed_ratio`` when it is that much coarser."""
        ds, ref = raster.dataset, self.rasters[0]
        if ds.crs != self.crs:
            raise UserError(f"{raster.path} is in CRS {ds.crs}, {ref.path} in {self.crs}; reproject "
                            f"{raster.path.name} onto {ref.path.name}'s grid (gdalwarp or rasterio.warp.reproject)")
        pixel = abs(self.transform.a) or 1.0
        if (ds.height, ds.width) == (self.height, self.width) and \
                ds.transform.almost_equals(self.transform, precision=1e-3 * pixel):
            return 1
        r = allowed_ratio
        if r > 1 and (ds.height * r, ds.width * r) == (self.height, self.width) and \
                ds.transform.almost_equals(self.transform * self.transform.scale(r), precision=1e-3 * pixel * r):
            return r
        coarser = f", or {r} times coarser over the same bounds" if r > 1 else ""
        raise UserError(f"{raster.path} ({ds.height}x{ds.width} px, transform {tuple(ds.transform)[:6]}) is not on "
                        f"the grid of {ref.path} ({self.height}x{self.width} px, transform "
                        f"{tuple(self.transform)[:6]}); every input must share the first input's grid{coarser}: "
                        f"resample it (gdalwarp -te/-ts, or rasterio.warp.reproject)")

    def read(self, top: int, left: int, tile: int) -> tuple[dict[str, Tensor], Tensor]:
        """Normalized tiles ``{sensor: [C, T, T]}`` at (top, left) of the reference grid, zero beyond the
        scene, and the [T, T] mask of pixels where the first input has at least one valid band."""
        h, w = min(tile, self.height - top), min(tile, self.width - left)
        images, valid_TT = {}, torch.zeros(tile, tile, dtype=torch.bool)
        for i, raster in enumerate(self.rasters):
            if raster.ratio == 1:
                x_Chw, valid_Chw = raster.normalizer(raster.dataset.read(raster.indexes,
                                                                         window=Window(left, top, w, h)))
            else:
                x_Chw, valid_Chw = _read_upsampled(raster, top, left, h, w), None
            if i == 0:
                valid_TT[:h, :w] = True if valid_Chw is None else valid_Chw.any(0)
            images[raster.sensor] = F.pad(x_Chw, (0, tile - w, 0, tile - h))
        return images, valid_TT


def _read_upsampled(raster: InputRaster, top: int, left: int, h: int, w: int) -> Tensor:
    """The window (top, left, h, w) of the reference grid from a raster ``ratio`` times coarser."""
    r, ds = raster.ratio, raster.dataset
    row0, col0 = max(0, top // r - UPSAMPLE_MARGIN), max(0, left // r - UPSAMPLE_MARGIN)
    row1 = min(ds.height, math.ceil((top + h) / r) + UPSAMPLE_MARGIN)
    col1 = min(ds.width, math.ceil((left + w) / r) + UPSAMPLE_MARGIN)
    coarse_Chw, _ = raster.normalizer(ds.read(raster.indexes, window=Window(col0, row0, col1 - col0, row1 - row0)))
    fine_Chw = F.interpolate(coarse_Chw[None], scale_factor=r, mode="bicubic", align_corners=False)[0]
    dy, dx = top - row0 * r, left - col0 * r
    return fine_Chw[:, dy:dy + h, dx:dx + w]


def _open(sensor: str, path: Path, model: ModelInputs, band_order: list[str] | None) -> InputRaster:
    spec = model.sensors[sensor]
    if not path.is_file():
        raise MissingFileError(f"--input {path}: no such file (the raster of sensor '{sensor}')")
    try:
        ds = rasterio.open(path)
    except rasterio.errors.RasterioIOError as err:
        raise UserError(f"--input {path}: not a raster rasterio can read ({err})") from None
    try:
        indexes = _band_indexes(sensor, path, ds.count, list(spec.bands), band_order)
        if ds.crs is None:
            raise UserError(f"--input {path} has no CRS: msgfm predict writes a georeferenced map; give a "
                            f"georeferenced raster (GeoTIFF with a CRS and transform)")
        stats = model.stats.sensor(sensor)
        nodata = ds.nodata if ds.nodata is not None else spec.nodata
        normalizer = SensorNormalizer.from_stats(stats.mean, stats.std, scale=spec.scale, offset=spec.offset,
                                                 nodata=nodata)
    except BaseException:
        ds.close()
        raise
    return InputRaster(sensor=sensor, path=path, dataset=ds, indexes=indexes, normalizer=normalizer, ratio=1)


def _band_indexes(sensor: str, path: Path, count: int, bands: list[str], band_order: list[str] | None) -> list[int]:
    if band_order is None:
        if count != len(bands):
            raise UserError(f"--input {path} has {count} band(s), sensor '{sensor}' of the model has {len(bands)} "
                            f"({', '.join(bands)}); give a raster of those bands in that order, or name the "
                            f"file's bands with --band-order {sensor}=NAME,NAME,...")
        return list(range(1, count + 1))
    if len(band_order) != count:
        raise UserError(f"--band-order {sensor} names {len(band_order)} band(s), {path} has {count}")
    missing = [b for b in bands if b not in band_order]
    if missing:
        raise UserError(f"--band-order {sensor}={','.join(band_order)} lacks band(s) {missing} the model reads; "
                        f"name the file's bands using {bands}")
    return [band_order.index(b) + 1 for b in bands]
