"""SpaceNet converters: PAN + MS pairs for pan-sharpening, PAN + building masks for segmentation.

``msgfm convert spacenet``: co-registered WorldView PAN and multispectral GeoTIFFs, either
the SpaceNet folder layout ``<root>/PAN/PAN_<aoi>_img<N>.tif`` + ``<root>/MUL/MUL_<aoi>_img<N>.tif``
or explicit ``--pair PAN.tif MS.tif`` (repeatable; e.g. SpaceNet 6's ``pan1.tif``, ``ms1.tif``).
The two must cover the same bounds (within half an MS pixel) in one CRS, the PAN grid being
an integer ``ratio`` finer than the MS grid in both axes.

Pan-sharpening is trained and scored at reduced resolution (Wald's protocol): no sharp
MS image exists to compare with, so the MS image itself is the reference and the inputs
are degraded by ``ratio``. The converter stores what does not change between epochs:
``wv2_ms`` = the MS image (the reference, native dtype, bands reordered to the registry's
blue, green, red, nir1 by ``--ms-band-order``) and ``pan`` = the PAN image block-averaged
onto the MS grid (float32). The fine-tuning task degrades the MS input by ``ratio`` on the
fly (msgfm/tasks/downstream.py). Tiles ``--size`` x ``--size`` on the MS grid, stride ``--stride``.

``msgfm convert spacenet-buildings IMAGE MASK``: a PAN (or any single-band) image and a
pixel-aligned building mask (0 background, non-zero building; SpaceNet's solaris masks are
0/255) tiled into ``pan`` + ``labels/segmentation`` (background, building).
"""
from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

import numpy as np
import rasterio

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
from msgfm.data.format import SensorArraySpec, segmentation_spec
from msgfm.data.georef import grid_georef
from msgfm.errors import MissingFileError, UserError
from msgfm.sensors import get_sensor

MS_SENSOR = "wv2_ms"
PAN_SENSOR = "pan"
BUILDING_CLASSES = ("background", "building")
IGNORE_INDEX = 255
_MUL = re.compile(r"MUL_(?P<key>.+)\.tif")


def find_pairs(root: Path) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """(PAN, MS) files of the SpaceNet layout PAN/PAN_<key>.tif + MUL/MUL_<key>.tif."""
    pairs, skipped = [], []
    for ms in sorted((root / "MUL").glob("MUL_*.tif")):
        match = _MUL.fullmatch(ms.name)
        assert match is not None, f"{ms} was listed by the glob MUL_*.tif"
        pan = root / "PAN" / f"PAN_{match['key']}.tif"
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


def check_pair(pan: rasterio.DatasetReader, ms: rasterio.DatasetReader) -> int:
    """The resolution ratio of a PAN / MS pair, or SkipItem saying why they are not a pair."""
    if pan.count != 1:
        raise SkipItem(f"PAN {Path(pan.name).name} has {pan.count} bands, expected 1")
    if pan.crs != ms.crs:
        raise SkipItem(f"PAN and MS are in different CRSs ({pan.crs} vs {ms.crs})")
    ratio_y, ratio_x = pan.height / ms.height, pan.width / ms.width
    ratio = int(round(ratio_y))
    if ratio < 1 or abs(ratio_y - ratio) > 1e-6 or abs(ratio_x - ratio) > 1e-6:
        raise SkipItem(f"PAN {pan.shape} is not an integer multiple of MS {ms.shape}")
    tolerance = 0.5 * abs(ms.transform.a)
    if any(abs(a - b) > tolerance for a, b in zip(pan.bounds, ms.bounds)):
        raise SkipItem(f"PAN bounds {tuple(pan.bounds)} and MS bounds {tuple(ms.bounds)} differ by more than half "
                       f"an MS pixel")
    return ratio


def load_pair(pair: tuple[Path, Path], *, band_index: list[int], size: int, stride: int, ms_dtype: str,
              expected_ratio: int) -> LoadResult:
    pan_path, ms_path = pair
    with rasterio.open(pan_path) as pan, rasterio.open(ms_path) as ms:
        ratio = check_pair(pan, ms)
        if ratio != expected_ratio:
            raise SkipItem(f"resolution ratio {ratio}, the other pairs have {expected_ratio}")
        if ms.count < max(band_index):
            raise SkipItem(f"MS has {ms.count} bands; --ms-band-order needs {max(band_index)}")
        pan_on_ms = block_mean(pan.read(1), ratio)[None]
        ms_CHW = ms.read(band_index)
        ms_crs, ms_transform = ms.crs, ms.transform
    samples = []
    for r, c in tile_offsets(ms_CHW.shape[1], ms_CHW.shape[2], size, stride):
        samples.append(Sample(sample_id=f"{ms_path.stem}_r{r}_c{c}",
                              images={PAN_SENSOR: pan_on_ms[:, r:r + size, c:c + size],
                                      MS_SENSOR: ms_CHW[:, r:r + size, c:c + size].astype(ms_dtype)},
                              georef=grid_georef(ms_crs, ms_transform, r, c)))
    if not samples:
        raise SkipItem(f"MS image {ms_CHW.shape[1:]} is smaller than one {size}x{size} tile")
    return LoadResult(samples=samples)


def ms_band_index(order: str) -> list[int]:
    """1-based file band of each registry band of wv2_ms, from the file's band order."""
    names = [b.strip() for b in order.split(",")]
    wanted = get_sensor(MS_SENSOR).bands
    missing = [b for b in wanted if b not in names]
    if missing:
        raise UserError(f"--ms-band-order '{order}' lacks band(s) {missing}; name the file's bands in order "
                        f"using {list(wanted)} (others: any name)")
    return [names.index(b) + 1 for b in wanted]


def convert(args: argparse.Namespace) -> int:
    pairs, skipped = find_pairs(args.root) if args.root else ([], [])
    pairs += [(Path(p), Path(m)) for p, m in args.pair or []]
    if not pairs:
        raise MissingFileError("no PAN/MS pair: give a SpaceNet folder with PAN/ and MUL/, or --pair PAN.tif MS.tif")
    band_index = ms_band_index(args.ms_band_order)
    with rasterio.open(pairs[0][0]) as pan, rasterio.open(pairs[0][1]) as ms:
        try:
            ratio = check_pair(pan, ms)  # the first pair sets the ratio and dtype of the shards
        except SkipItem as err:
            raise UserError(f"{pairs[0][0]} + {pairs[0][1]}: {err}") from None
        ms_dtype = storage_dtype(ms.dtypes[0])
    size, stride = args.size, args.stride or args.size
    sensors = {PAN_SENSOR: SensorArraySpec(dtype="float32", channels=1, height=size, width=size),
               MS_SENSOR: SensorArraySpec(dtype=ms_dtype, channels=len(band_index), height=size, width=size)}
    print(f"PAN/MS resolution ratio {ratio}: use task.resolution_ratio={ratio} when fine-tuning")
    run_from_args(args, items=pairs, load=functools.partial(load_pair, band_index=band_index, size=size,
                                                            stride=stride, ms_dtype=ms_dtype, expected_ratio=ratio),
                  group="spacenet", sensors=sensors, skipped_before=skipped,
                  source=f"SpaceNet PAN+MS (ratio {ratio}, PAN block-averaged to the MS grid)",
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
        description="Pairs PAN/PAN_<key>.tif with MUL/MUL_<key>.tif (or --pair files), checks CRS, bounds and an "
                    "integer resolution ratio, stores the MS image (reference) and the PAN image averaged onto "
                    "the MS grid.")
    parser.add_argument("root", type=Path, nargs="?", default=None, help="SpaceNet folder with PAN/ and MUL/")
    parser.add_argument("--pair", nargs=2, action="append", metavar=("PAN", "MS"), help="a PAN and an MS GeoTIFF")
    parser.add_argument("--ms-band-order", default="blue,green,red,nir1",
                        help="the MS file's bands in order, naming at least blue, green, red, nir1 (default "
                             "'blue,green,red,nir1'; SpaceNet 6 RGBNIR: 'red,green,blue,nir1'; WorldView-3 8-band "
                             "MUL: 'coastal,blue,green,yellow,red,rededge,nir1,nir2')")
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
