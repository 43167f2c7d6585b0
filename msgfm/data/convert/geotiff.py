"""``msgfm convert geotiff``: a folder of single-sensor GeoTIFF tiles to unpaired shards.

Every file must hold the bands of ``--sensor`` in registry order, with one dtype and one
nodata value across the folder; this is checked on all files (headers only) before any
pixel is converted, so a wrong folder fails in seconds. Files larger than ``--size`` are
cut into ``--size`` tiles with ``--stride``; smaller files and tiles with too much nodata
are skipped and reported. Pixels are copied as stored (no resampling).
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import rasterio
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window

from msgfm.data.convert.common import (LoadResult, Sample, add_common_args, invalid_mask, run_from_args,
                                       storage_dtype, tile_offsets)
from msgfm.data.convert.raster_pair import _nodata
from msgfm.data.format import SensorArraySpec
from msgfm.data.georef import grid_georef
from msgfm.sensors import get_sensor

SUFFIXES = (".tif", ".tiff")


def find_tiles(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())


def check_tiles(paths: list[Path], sensor: str) -> tuple[str, float | None]:
    """The common (dtype, nodata) of the files; ValueError listing every file that does not fit ``sensor``."""
    spec = get_sensor(sensor)
    wrong_bands, kinds = [], {}
    for path in paths:
        try:
            with rasterio.open(path) as src:
                if src.count != spec.num_channels:
                    wrong_bands.append(f"{path} ({src.count} bands)")
                kinds.setdefault((src.dtypes[0], _nodata(src.nodata)), []).append(path)
        except rasterio.errors.RasterioIOError:
            continue  # unreadable: skipped and reported during the conversion
    if wrong_bands:
        listed = ", ".join(wrong_bands[:5]) + (f" and {len(wrong_bands) - 5} more" if len(wrong_bands) > 5 else "")
        raise ValueError(f"sensor '{sensor}' has {spec.num_channels} bands {list(spec.bands)} but {len(wrong_bands)} "
                         f"of {len(paths)} files differ: {listed}; pick the sensor these files hold, or register one "
                         f"with their bands (sensors: in the config)")
    if len(kinds) > 1:
        listed = "; ".join(f"{dtype}, nodata {nodata}: e.g. {files[0]}" for (dtype, nodata), files in kinds.items())
        raise ValueError(f"the files mix dtypes or nodata values ({listed}); convert each kind separately")
    if not kinds:
        raise ValueError(f"none of the {len(paths)} files can be read as GeoTIFF")
    (dtype, nodata), = kinds
    return dtype, nodata


def load_file(path: Path, *, sensor: str, size: int, stride: int, dtype: str, nodata: float | None,
              max_nodata: float) -> LoadResult:
    """All size x size tiles of one file (a file of exactly ``size`` is one tile)."""
    result = LoadResult()
    with rasterio.open(path) as src:
        offsets = tile_offsets(src.height, src.width, size, stride)
        if not offsets:
            result.skipped.append((str(path), f"{src.height}x{src.width} is smaller than --size {size}"))
        for row, col in offsets:
            tile_id = path.stem if len(offsets) == 1 else f"{path.stem}_r{row}_c{col}"
            array_CHW = src.read(window=Window(col, row, size, size))
            fraction = float(invalid_mask(array_CHW, nodata).mean())
            if fraction > max_nodata:
                result.skipped.append((tile_id, f"nodata fraction {fraction:.2f} > --max-nodata {max_nodata}"))
                continue
            lat = lon = None
            if src.crs is not None:
                x, y = src.xy(row + size / 2, col + size / 2, offset="ul")
                lons, lats = warp_transform(src.crs, "EPSG:4326", [x], [y])
                lat, lon = lats[0], lons[0]
            result.samples.append(Sample(sample_id=tile_id, images={sensor: array_CHW.astype(dtype)}, lat=lat, lon=lon,
                                         georef=grid_georef(src.crs, src.transform, row, col)))
    return result


def convert(args: argparse.Namespace) -> int:
    if not 0.0 <= args.max_nodata <= 1.0:
        raise ValueError(f"--max-nodata must be in [0, 1], got {args.max_nodata}")
    if not args.input.exists():
        raise FileNotFoundError(f"{args.input}: no such file or folder")
    paths = find_tiles(args.input)
    if not paths:
        raise FileNotFoundError(f"no .tif/.tiff file under {args.input}")
    raw_dtype, nodata = check_tiles(paths, args.sensor)
    dtype = storage_dtype(raw_dtype)
    stride = args.stride or args.size
    spec = SensorArraySpec(dtype=dtype, channels=get_sensor(args.sensor).num_channels, height=args.size,
                           width=args.size, nodata=nodata, scale=args.scale, offset=args.offset, gsd_m=args.gsd_m)
    load = functools.partial(load_file, sensor=args.sensor, size=args.size, stride=stride, dtype=dtype,
                             nodata=nodata, max_nodata=args.max_nodata)
    run_from_args(args, items=paths, load=load, group=args.group or args.sensor, sensors={args.sensor: spec},
                  source=f"GeoTIFF tiles: {args.input}", description="geotiff")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "geotiff", help="a folder of single-sensor GeoTIFF tiles -> unpaired shards",
        description="Converts every .tif under INPUT (recursively) holding the bands of --sensor; larger files are "
                    "cut into --size tiles with --stride, pixel values copied unchanged.")
    parser.add_argument("input", type=Path, help="a folder of GeoTIFFs (searched recursively) or one file")
    parser.add_argument("--sensor", required=True, help="registered sensor the files hold (band count is checked)")
    parser.add_argument("--size", type=int, default=192, help="tile size in pixels (default 192)")
    parser.add_argument("--stride", type=int, default=None, help="step between tiles (default: --size)")
    parser.add_argument("--max-nodata", type=float, default=0.25,
                        help="skip tiles with a larger share of nodata pixels (default 0.25)")
    parser.add_argument("--scale", type=float, default=1.0, help="physical = raw * scale + offset (default 1)")
    parser.add_argument("--offset", type=float, default=0.0, help="see --scale (default 0)")
    parser.add_argument("--gsd-m", type=float, default=None, help="ground sample distance in metres "
                        "(default: the sensor's from the registry)")
    parser.add_argument("--group", default=None, help="data group written in the shards (default: the sensor name)")
    add_common_args(parser, prefix="tiles")
    parser.set_defaults(func=convert)
