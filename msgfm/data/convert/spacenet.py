"""SpaceNet converters: PAN + MS pairs for pan-sharpening, PAN + building masks for segmentation.

``msgfm convert spacenet``: co-registered WorldView PAN and multispectral GeoTIFFs, either
the SpaceNet folder layout ``PAN/PAN_<aoi>_img<N>.tif`` + ``MUL/MUL_<aoi>_img<N>.tif`` (in
each ROOT given, or in each AOI folder under it as SpaceNet 2 ships them: ``AOI_2_Vegas_Train/``,
``AOI_3_Paris_Train/``, ...) or explicit ``--pair PAN.tif MS.tif`` (repeatable; e.g. SpaceNet
6's ``pan1.tif``, ``ms1.tif``). The two must share a CRS, their pixel sizes must differ by an
integer ``ratio`` and their grids must line up (the PAN grid's origin on a PAN pixel corner
of the MS grid). Only whole MS pixels that the PAN image covers are kept: SpaceNet 2's 650 x 650
PAN tiles at 0.3 m and 163 x 163 MUL tiles at 1.2 m give 162 x 162 MS pixels (the last MS row
and column reach 2 PAN pixels past the PAN tile).

The MS sensor: ``--ms-sensor wv3_ms`` (WorldView-3, 8 bands: SpaceNet 2's MUL, the paper's
setup) or ``wv2_ms`` (4 bands: blue, green, red, nir1, for data that has only those, e.g.
SpaceNet 6); ``auto`` (default) takes wv3_ms for files with 8 or more bands, else wv2_ms.
``--ms-band-order`` names the file's bands in order (default: the sensor's own order, which is
WorldView-3's product order for wv3_ms).

Pan-sharpening is trained and scored at reduced resolution (Wald's protocol): no sharp
MS image exists to compare with, so the MS image itself is the reference and the inputs
are degraded by ``ratio``. The converter stores what does not change between epochs: the MS
image (the reference, native dtype, bands in the registry's order) and ``pan`` = the PAN image
block-averaged onto the MS grid (float32); both record the MS grid's pixel size as GSD. The
fine-tuning task degrades the MS input by ``ratio`` on the fly (msgfm/tasks/downstream.py).
Tiles ``--size`` x ``--size`` on the MS grid, stride ``--stride``.

``msgfm convert spacenet-buildings IMAGE MASK``: a PAN (or any single-band) image and a
pixel-aligned building mask (0 background, non-zero building; SpaceNet's solaris masks are
0/255) tiled into ``pan`` + ``labels/segmentation`` (background, building).
"""
from __future__ import annotations

import argparse
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from msgfm.data.convert.common import (
    LoadResult,
    Sample,
    SkipItem,
    add_common_args,
    positive_int,
    run_from_args,
    storage_dtype,
    tile_offsets,
)
from msgfm.data.convert.raster_bands import nominal_gsd_m
from msgfm.data.format import SensorArraySpec, segmentation_spec
from msgfm.data.georef import grid_georef
from msgfm.errors import MissingFileError, UserError
from msgfm.sensors import get_sensor

MS_SENSORS = ("wv3_ms", "wv2_ms")  # 8-band WorldView-3 (SpaceNet 2, the paper), 4-band WorldView-2
PAN_SENSOR = "pan"
BUILDING_CLASSES = ("background", "building")
IGNORE_INDEX = 255
_MUL = re.compile(r"MUL_(?P<key>.+)\.tif")
_GRID_TOLERANCE = 0.01  # of a pixel (ratio) / of a PAN pixel (origins): what rounding in the transforms allows


@dataclass(frozen=True)
class PairGrid:
    """How a PAN image lines up with its MS image: the integer ratio, and the MS window the PAN covers."""

    ratio: int
    ms_row: int  # the window in MS pixels
    ms_col: int
    height: int
    width: int
    pan_row: int  # the PAN pixel at the window's top-left corner
    pan_col: int


def find_pairs(root: Path) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """(PAN, MS) files of the SpaceNet layout PAN/PAN_<key>.tif + MUL/MUL_<key>.tif, in ``root`` and in
    each folder directly under it (SpaceNet 2's AOI folders)."""
    pairs, skipped = [], []
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []
    for folder in folders:
        for ms in sorted((folder / "MUL").glob("MUL_*.tif")):
            match = _MUL.fullmatch(ms.name)
            assert match is not None, f"{ms} was listed by the glob MUL_*.tif"
            pan = folder / "PAN" / f"PAN_{match['key']}.tif"
            if pan.is_file():
                pairs.append((pan, ms))
            else:
                skipped.append((str(ms), f"no PAN partner: expected {pan.relative_to(root)}"))
    return pairs, skipped


def block_mean(pan_HW: np.ndarray, ratio: int) -> np.ndarray:
    """Average ratio x ratio blocks: the PAN image on the MS grid (float32)."""
    h, w = pan_HW.shape[0] // ratio, pan_HW.shape[1] // ratio
    blocks = pan_HW[:h * ratio, :w * ratio].astype(np.float64).reshape(h, ratio, w, ratio)
    return blocks.mean(axis=(1, 3)).astype(np.float32)


def check_pair(pan: rasterio.DatasetReader, ms: rasterio.DatasetReader) -> PairGrid:
    """How the PAN and MS grids line up, or SkipItem saying why they are not a pair."""
    if pan.count != 1:
        raise SkipItem(f"PAN {Path(pan.name).name} has {pan.count} bands, expected 1")
    if pan.crs != ms.crs:
        raise SkipItem(f"PAN and MS are in different CRSs ({pan.crs} vs {ms.crs})")
    pan_t, ms_t = pan.transform, ms.transform
    if pan_t.b or pan_t.d or ms_t.b or ms_t.d:
        raise SkipItem("rotated grids are not supported; warp PAN and MS to north-up first")
    ratio_x, ratio_y = ms_t.a / pan_t.a, ms_t.e / pan_t.e
    ratio = int(round(ratio_x))
    if ratio < 1 or any(abs(r - ratio) > _GRID_TOLERANCE for r in (ratio_x, ratio_y)):
        raise SkipItem(f"MS pixels ({abs(ms_t.a):.6g} x {abs(ms_t.e):.6g}) are not an integer multiple of PAN "
                       f"pixels ({abs(pan_t.a):.6g} x {abs(pan_t.e):.6g})")
    # the MS grid's origin in PAN pixels: must fall on a PAN pixel corner
    col0, row0 = ~pan_t @ (ms_t.c, ms_t.f)
    if abs(col0 - round(col0)) > ratio * _GRID_TOLERANCE or abs(row0 - round(row0)) > ratio * _GRID_TOLERANCE:
        raise SkipItem(f"the MS grid's origin lies at PAN pixel ({row0:.3f}, {col0:.3f}), not on a PAN pixel corner")
    col0, row0 = round(col0), round(row0)
    # whole MS pixels whose ratio x ratio PAN blocks lie inside the PAN image
    ms_col, ms_row = max(0, math.ceil(-col0 / ratio)), max(0, math.ceil(-row0 / ratio))
    width = min(ms.width, (pan.width - col0) // ratio) - ms_col
    height = min(ms.height, (pan.height - row0) // ratio) - ms_row
    if width < 1 or height < 1:
        raise SkipItem("PAN and MS do not overlap")
    return PairGrid(ratio=ratio, ms_row=ms_row, ms_col=ms_col, height=height, width=width,
                    pan_row=row0 + ms_row * ratio, pan_col=col0 + ms_col * ratio)


def load_pair(pair: tuple[Path, Path], *, ms_sensor: str, band_index: list[int], size: int, stride: int,
              ms_dtype: str, expected_ratio: int) -> LoadResult:
    pan_path, ms_path = pair
    with rasterio.open(pan_path) as pan, rasterio.open(ms_path) as ms:
        grid = check_pair(pan, ms)
        if grid.ratio != expected_ratio:
            raise SkipItem(f"resolution ratio {grid.ratio}, the other pairs have {expected_ratio}")
        if ms.count < max(band_index):
            raise SkipItem(f"MS has {ms.count} bands; --ms-band-order needs {max(band_index)}")
        r = grid.ratio
        pan_HW = pan.read(1, window=Window(grid.pan_col, grid.pan_row, grid.width * r, grid.height * r))
        pan_on_ms = block_mean(pan_HW, r)[None]
        ms_CHW = ms.read(band_index, window=Window(grid.ms_col, grid.ms_row, grid.width, grid.height))
        ms_crs = ms.crs
        ms_transform = ms.transform @ Affine.translation(grid.ms_col, grid.ms_row)
    samples = []
    for row, col in tile_offsets(ms_CHW.shape[1], ms_CHW.shape[2], size, stride):
        samples.append(Sample(sample_id=f"{ms_path.stem}_r{row}_c{col}",
                              images={PAN_SENSOR: pan_on_ms[:, row:row + size, col:col + size],
                                      ms_sensor: ms_CHW[:, row:row + size, col:col + size].astype(ms_dtype)},
                              georef=grid_georef(ms_crs, ms_transform, row, col)))
    if not samples:
        raise SkipItem(f"MS image {ms_CHW.shape[1:]} is smaller than one {size}x{size} tile")
    return LoadResult(samples=samples)


def choose_ms_sensor(choice: str, file_bands: int) -> str:
    """``auto``: wv3_ms for files with 8 or more bands, else wv2_ms; otherwise the sensor named."""
    if choice != "auto":
        return choice
    return "wv3_ms" if file_bands >= get_sensor("wv3_ms").num_channels else "wv2_ms"


def ms_band_index(order: str | None, ms_sensor: str) -> list[int]:
    """1-based file band of each registry band of ``ms_sensor``, from the file's band order."""
    wanted = get_sensor(ms_sensor).bands
    names = list(wanted) if order is None else [b.strip() for b in order.split(",")]
    missing = [b for b in wanted if b not in names]
    if missing:
        raise UserError(f"--ms-band-order '{order}' lacks band(s) {missing} of {ms_sensor}; name the file's bands "
                        f"in order using {list(wanted)} (others: any name)")
    return [names.index(b) + 1 for b in wanted]


def convert(args: argparse.Namespace) -> int:
    pairs, skipped = [], []
    for root in args.root:
        if not root.is_dir():
            raise MissingFileError(f"{root}: no such folder (a SpaceNet folder with PAN/ and MUL/, or of AOI folders)")
        found, missed = find_pairs(root)
        pairs += found
        skipped += missed
    pairs += [(Path(p), Path(m)) for p, m in args.pair or []]
    if not pairs:
        raise MissingFileError("no PAN/MS pair: give a SpaceNet folder with PAN/ and MUL/ (or AOI folders holding "
                               "them), or --pair PAN.tif MS.tif")
    with rasterio.open(pairs[0][0]) as pan, rasterio.open(pairs[0][1]) as ms:
        try:
            grid = check_pair(pan, ms)  # the first pair sets the ratio, MS sensor, dtype and GSD of the shards
        except SkipItem as err:
            raise UserError(f"{pairs[0][0]} + {pairs[0][1]}: {err}") from None
        ms_sensor = choose_ms_sensor(args.ms_sensor, ms.count)
        band_index = ms_band_index(args.ms_band_order, ms_sensor)
        if ms.count < max(band_index):
            raise UserError(f"{pairs[0][1]} has {ms.count} bands; {ms_sensor} with --ms-band-order "
                            f"'{args.ms_band_order or ','.join(get_sensor(ms_sensor).bands)}' needs {max(band_index)} "
                            f"(4-band data: --ms-sensor wv2_ms)")
        ms_dtype = storage_dtype(ms.dtypes[0])
        gsd_m = nominal_gsd_m(ms.crs, ms.res) if ms.crs is not None else None
    size, stride = args.size, args.stride or args.size
    sensors = {PAN_SENSOR: SensorArraySpec(dtype="float32", channels=1, height=size, width=size, gsd_m=gsd_m),
               ms_sensor: SensorArraySpec(dtype=ms_dtype, channels=len(band_index), height=size, width=size,
                                          gsd_m=gsd_m)}
    print(f"MS sensor {ms_sensor} ({len(band_index)} bands); PAN/MS resolution ratio {grid.ratio}: fine-tune with "
          f"task.resolution_ratio={grid.ratio}" + (f" task.sensors=[pan,{ms_sensor}] task.target_sensor={ms_sensor}"
                                                   if ms_sensor != "wv3_ms" else ""))
    run_from_args(args, items=pairs, load=functools.partial(load_pair, ms_sensor=ms_sensor, band_index=band_index,
                                                            size=size, stride=stride, ms_dtype=ms_dtype,
                                                            expected_ratio=grid.ratio),
                  group="spacenet", sensors=sensors, skipped_before=skipped,
                  source=f"SpaceNet PAN+MS ({ms_sensor}, ratio {grid.ratio}, PAN block-averaged to the MS grid)",
                  description="spacenet")
    return 0


def load_buildings(item: tuple[Path, Path], *, size: int, stride: int) -> LoadResult:
    image_path, mask_path = item
    with rasterio.open(image_path) as image, rasterio.open(mask_path) as mask:
        if image.count != 1 or mask.count != 1:
            raise SkipItem(f"expected a 1-band image and a 1-band mask, got {image.count} and {mask.count}")
        if image.shape != mask.shape:
            raise SkipItem(f"image {image.shape} and mask {mask.shape} are not pixel-aligned")
        pan_HW = image.read(1).astype(np.float32)
        classes_HW = (mask.read(1) > 0).astype(np.uint8)
        crs, transform = image.crs, image.transform
    samples = [Sample(sample_id=f"{image_path.stem}_r{r}_c{c}",
                      images={PAN_SENSOR: pan_HW[None, r:r + size, c:c + size]},
                      labels={"segmentation": classes_HW[r:r + size, c:c + size]},
                      georef=grid_georef(crs, transform, r, c))
               for r, c in tile_offsets(pan_HW.shape[0], pan_HW.shape[1], size, stride)]
    return LoadResult(samples=samples)


def convert_buildings(args: argparse.Namespace) -> int:
    for path in (args.image, args.mask):
        if not path.is_file():
            raise MissingFileError(f"{path}: no such file")
    size, stride = args.size, args.stride or args.size
    run_from_args(args, items=[(args.image, args.mask)], load=functools.partial(load_buildings, size=size,
                                                                              stride=stride),
                  group="spacenet_buildings",
                  sensors={PAN_SENSOR: SensorArraySpec(dtype="float32", channels=1, height=size, width=size)},
                  labels=[segmentation_spec(BUILDING_CLASSES, size, size, IGNORE_INDEX)],
                  source=f"SpaceNet buildings: {args.image} + {args.mask}", description="spacenet-buildings")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "spacenet", help="SpaceNet PAN + MS GeoTIFF pairs -> pan-sharpening shards (Wald's protocol)",
        description="Pairs PAN/PAN_<key>.tif with MUL/MUL_<key>.tif (in ROOT or in each AOI folder under it, as "
                    "SpaceNet 2 ships them; or --pair files), checks CRS, an integer pixel-size ratio and aligned "
                    "grids, stores the MS image (reference: wv3_ms, 8 bands, or wv2_ms, 4) over the MS pixels the "
                    "PAN covers and the PAN image averaged onto the MS grid.")
    parser.add_argument("root", type=Path, nargs="*", default=[],
                        help="SpaceNet folders with PAN/ and MUL/ (e.g. SpaceNet 2's AOI_2_Vegas_Train), or folders of "
                             "such AOI folders")
    parser.add_argument("--pair", nargs=2, action="append", metavar=("PAN", "MS"), help="a PAN and an MS GeoTIFF")
    parser.add_argument("--ms-sensor", choices=("auto", *MS_SENSORS), default="auto",
                        help="the MS sensor stored: wv3_ms (8 bands, SpaceNet 2), wv2_ms (4 bands: blue, green, red, "
                             "nir1); auto (default): wv3_ms for files with 8 or more bands, else wv2_ms")
    parser.add_argument("--ms-band-order", default=None,
                        help="the MS file's bands in order, naming at least the sensor's bands (default: the "
                             "sensor's order; wv3_ms: 'coastal,blue,green,yellow,red,rededge,nir1,nir2', wv2_ms: "
                             "'blue,green,red,nir1'; SpaceNet 6 RGBNIR: 'red,green,blue,nir1')")
    parser.add_argument("--size", type=positive_int, default=128, help="tile size on the MS grid (default 128)")
    parser.add_argument("--stride", type=int, default=0, help="tile stride (default: size)")
    add_common_args(parser, prefix="spacenet")
    parser.set_defaults(func=convert)

    buildings = subparsers.add_parser(
        "spacenet-buildings", help="a PAN image + pixel-aligned building mask -> segmentation shards",
        description="Tiles a single-band image and its 0/non-zero building mask into pan + labels/segmentation.")
    buildings.add_argument("image", type=Path)
    buildings.add_argument("mask", type=Path)
    buildings.add_argument("--size", type=positive_int, default=128, help="tile size (default 128)")
    buildings.add_argument("--stride", type=int, default=0, help="tile stride (default: size)")
    add_common_args(buildings, prefix="spacenet_buildings")
    buildings.set_defaults(func=convert_buildings)
