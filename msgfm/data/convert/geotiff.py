"""``msgfm convert geotiff``: a folder of single-sensor GeoTIFF tiles to unpaired shards.

Every file must hold the bands of ``--sensor`` (all of them in registry order, or the ones
``--bands`` selects by index or description, e.g. ``--bands 3,2,1`` for an ``rgb`` sample of
a 6-band scene), with one dtype and one nodata value across the folder; this is checked on
all files (headers only) before any pixel is converted, so a wrong folder fails in seconds.
Files larger than ``--size`` are cut into ``--size`` tiles with ``--stride``; smaller files
and tiles with too much nodata are skipped and reported. Pixels are copied as stored (no
resampling). The GSD recorded is ``--gsd-m``, else the sensor's, else the pixel size of the
rasters' transform (when all files share one).
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path

import rasterio
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window

from msgfm.data.convert.common import (
    LoadResult,
    Sample,
    add_common_args,
    find_inputs,
    invalid_mask,
    positive_int,
    run_from_args,
    storage_dtype,
    tile_offsets,
)
from msgfm.data.convert.raster_bands import (
    BandSelection,
    common_gsd_m,
    nodata_value,
    nominal_gsd_m,
    parse_band_selection,
    resolve_bands,
)
from msgfm.data.format import SensorArraySpec
from msgfm.data.georef import grid_georef
from msgfm.errors import MissingFileError, UserError
from msgfm.sensors import get_sensor

SUFFIXES = (".tif", ".tiff")
_LISTED = 5  # files named in an error before "and N more"


@dataclass(frozen=True)
class TileSource:
    """What all files of the folder share (checked on every header)."""

    dtype: str  # raw dtype of the selected bands
    nodata: float | None
    gsd_m: float | None  # from the transforms; None if unknown or different across files


def find_tiles(root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The GeoTIFFs under ``root`` (through linked folders) and (path, reason) of the links left out."""
    if root.is_file():
        return [root], []
    return find_inputs(root, SUFFIXES)


def check_tiles(paths: list[Path], sensor: str, bands: BandSelection | None = None) -> TileSource:
    """What the files share; ValueError naming the files that do not hold ``sensor``'s bands."""
    mismatches: list[str] = []
    kinds: dict[tuple[str, float | None], list[Path]] = {}
    gsds: list[float | None] = []
    for path in paths:
        try:
            with rasterio.open(path) as src:
                try:
                    indexes = resolve_bands(bands, src.descriptions, path=path, sensor=sensor)
                except ValueError as err:
                    mismatches.append(str(err))
                    continue
                dtypes = {src.dtypes[i - 1] for i in indexes}
                if len(dtypes) > 1:
                    mismatches.append(f"{path}: the selected bands mix dtypes {sorted(dtypes)}")
                    continue
                kinds.setdefault((dtypes.pop(), nodata_value(src.nodata)), []).append(path)
                gsds.append(nominal_gsd_m(src.crs, src.res) if src.crs is not None else None)
        except rasterio.errors.RasterioIOError:
            continue  # unreadable: skipped and reported during the conversion
    if len(paths) == 1 and mismatches:
        raise UserError(mismatches[0])
    if mismatches:
        more = f" ({len(mismatches) - 1} more file(s) likewise)" if len(mismatches) > 1 else ""
        raise UserError(f"{len(mismatches)} of {len(paths)} files do not fit sensor '{sensor}': "
                        f"{mismatches[0]}{more}")
    if len(kinds) > 1:
        listed = "; ".join(f"{dtype}, nodata {nodata}: e.g. {files[0]}" for (dtype, nodata), files in kinds.items())
        raise UserError(f"the files mix dtypes or nodata values ({listed}); convert each kind separately")
    if not kinds:
        raise UserError(f"none of the {len(paths)} files can be read as GeoTIFF")
    (dtype, nodata), = kinds
    return TileSource(dtype=dtype, nodata=nodata, gsd_m=common_gsd_m(gsds))


def load_file(path: Path, *, sensor: str, bands: BandSelection | None, size: int, stride: int, dtype: str,
              nodata: float | None, max_nodata: float) -> LoadResult:
    """All size x size tiles of one file (a file of exactly ``size`` is one tile)."""
    result = LoadResult()
    with rasterio.open(path) as src:
        indexes = resolve_bands(bands, src.descriptions, path=path, sensor=sensor)
        offsets = tile_offsets(src.height, src.width, size, stride)
        if not offsets:
            result.skipped.append((str(path), f"{src.height}x{src.width} is smaller than --size {size}"))
        for row, col in offsets:
            tile_id = path.stem if len(offsets) == 1 else f"{path.stem}_r{row}_c{col}"
            array_CHW = src.read(indexes, window=Window(col, row, size, size))
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


def recorded_gsd_m(args: argparse.Namespace, source: TileSource) -> float | None:
    """--gsd-m, else the sensor's GSD (None here: the writer takes it), else the rasters'; says which."""
    registry = get_sensor(args.sensor).gsd_m
    if args.gsd_m is not None:
        print(f"gsd_m {args.gsd_m} (--gsd-m)")
        return float(args.gsd_m)
    if registry is not None:
        print(f"gsd_m {registry} (sensor '{args.sensor}')")
        return None
    if source.gsd_m is None:
        print(f"gsd_m unknown: sensor '{args.sensor}' declares none and the files have no CRS or differ in pixel "
              f"size; pass --gsd-m to record one")
    else:
        print(f"gsd_m {source.gsd_m:.4g} (pixel size of the rasters' transform; sensor '{args.sensor}' declares none)")
    return source.gsd_m


def convert(args: argparse.Namespace) -> int:
    if not 0.0 <= args.max_nodata <= 1.0:
        raise UserError(f"--max-nodata must be in [0, 1], got {args.max_nodata}")
    if not args.input.exists():
        raise MissingFileError(f"{args.input}: no such file or folder")
    paths, left_out = find_tiles(args.input)
    if not paths:
        raise MissingFileError(f"no .tif/.tiff file under {args.input}")
    bands = parse_band_selection(args.bands) if args.bands else None
    source = check_tiles(paths, args.sensor, bands)
    dtype = storage_dtype(source.dtype)
    stride = args.stride or args.size
    spec = SensorArraySpec(dtype=dtype, channels=get_sensor(args.sensor).num_channels, height=args.size,
                           width=args.size, nodata=source.nodata, scale=args.scale, offset=args.offset,
                           gsd_m=recorded_gsd_m(args, source))
    load = functools.partial(load_file, sensor=args.sensor, bands=bands, size=args.size, stride=stride, dtype=dtype,
                             nodata=source.nodata, max_nodata=args.max_nodata)
    band_note = f", bands {args.bands}" if args.bands else ""
    run_from_args(args, items=paths, load=load, group=args.group or args.sensor, sensors={args.sensor: spec},
                  source=f"GeoTIFF tiles: {args.input}{band_note}", description="geotiff", skipped_before=left_out)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "geotiff", help="a folder of single-sensor GeoTIFF tiles -> unpaired shards",
        description="Converts every .tif under INPUT (recursively) holding the bands of --sensor; larger files are "
                    "cut into --size tiles with --stride, pixel values copied unchanged.")
    parser.add_argument("input", type=Path, help="a folder of GeoTIFFs (searched recursively) or one file")
    parser.add_argument("--sensor", required=True, help="registered sensor the files hold (band count is checked); "
                        "declare a new one with --sensors FILE.yaml")
    parser.add_argument("--bands", default=None, metavar="LIST",
                        help="the file bands that make the sensor's bands, in the sensor's order: 1-based indexes or "
                             "band descriptions, e.g. 3,2,1 or red,green,blue (default: all bands, as stored)")
    parser.add_argument("--size", type=positive_int, default=192, help="tile size in pixels (default 192)")
    parser.add_argument("--stride", type=int, default=None, help="step between tiles (default: --size)")
    parser.add_argument("--max-nodata", type=float, default=0.25,
                        help="skip tiles with a larger share of nodata pixels (default 0.25)")
    parser.add_argument("--scale", type=float, default=1.0, help="physical = raw * scale + offset (default 1)")
    parser.add_argument("--offset", type=float, default=0.0, help="see --scale (default 0)")
    parser.add_argument("--gsd-m", type=float, default=None, help="ground sample distance in metres "
                        "(default: the sensor's, else the pixel size of the rasters' transform)")
    parser.add_argument("--group", default=None, help="data group written in the shards (default: the sensor name)")
    add_common_args(parser, prefix="tiles")
    parser.set_defaults(func=convert)
