"""``msgfm convert raster-pair``: two large co-registered rasters tiled into paired patches.

For MDAS-style pairs (airborne RGB + DSM) or any optical + elevation pair. Each raster
holds its sensor's bands (or ``--bands SENSOR=LIST`` selects them by index or description,
e.g. ``--bands rgb=3,2,1`` of a 6-band scene). The two rasters must share a CRS (else:
refused, reproject one first) and overlap (the intersection is used). Tiles are cut on the
grid of the finer raster; the coarser one is resampled onto each tile's grid with
``--resampling`` (bilinear by default, GDAL warp, nodata-aware). Tiles whose share of
nodata pixels (in either raster) exceeds ``--max-nodata`` are skipped and reported. Both
sensors record the GSD of the tile grid (the finer raster's pixel size), which is what their
pixels are after resampling.

``--resize PX`` stores every tile at PX x PX pixels instead of ``--size``: both rasters are
resampled (``--resampling``; GDAL widens the kernel when it downsamples) straight from the
source onto the tile's footprint at the coarser pixel size ``size / PX``, which the shards
record as GSD and georeference. The paper resizes MDAS to 384 before use (Section 3.3):
``--size 768 --resize 384`` (docs/data_format.md says why 768).
"""
from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.warp import reproject
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window, from_bounds

from msgfm.data.convert.common import (
    LoadResult,
    Sample,
    SkipItem,
    add_common_args,
    invalid_mask,
    positive_int,
    run_from_args,
    storage_dtype,
    tile_offsets,
)
from msgfm.data.convert.raster_bands import (
    BandSelection,
    nodata_value,
    nominal_gsd_m,
    parse_band_selection,
    resolve_bands,
)
from msgfm.data.format import SensorArraySpec
from msgfm.data.georef import grid_georef
from msgfm.errors import MissingFileError, UserError
from msgfm.sensors import get_sensor

RESAMPLINGS = ("bilinear", "nearest", "cubic", "average")


@dataclass(frozen=True)
class RasterInfo:
    sensor: str
    path: str
    dtype: str  # as stored in the shard
    nodata: float | None
    pixel_area: float
    band_indexes: tuple[int, ...]  # 1-based raster bands that make the sensor's bands, in its order


@dataclass(frozen=True)
class PairGrid:
    """Where the tiles are cut: the intersection of both rasters on the finer raster's grid."""

    rasters: tuple[RasterInfo, RasterInfo]
    fine: str  # sensor whose pixels are copied as they are
    crs_wkt: str
    col_off: int  # the intersection window in the fine raster's pixels
    row_off: int
    height: int
    width: int
    transform: Affine  # of the intersection window
    gsd_m: float  # nominal pixel size of the tiles on the ground


def plan_pair(rasters: dict[str, Path], bands: dict[str, BandSelection] | None = None) -> PairGrid:
    """Check both rasters (bands, CRS, overlap) and find the common grid; ValueError says why not."""
    if len(rasters) != 2:
        raise UserError(f"raster-pair needs exactly two --raster SENSOR=PATH, got {len(rasters)}")
    bands = dict(bands or {})
    unknown = sorted(set(bands) - set(rasters))
    if unknown:
        raise UserError(f"--bands names sensor(s) {unknown} without a --raster; the rasters are {sorted(rasters)}")
    infos, sources = [], {}
    for sensor, path in rasters.items():
        if not Path(path).is_file():
            raise MissingFileError(f"--raster {sensor}={path}: no such file")
        with rasterio.open(path) as src:
            indexes = resolve_bands(bands.get(sensor), src.descriptions, path=path, sensor=sensor)
            dtypes = {src.dtypes[i - 1] for i in indexes}
            if len(dtypes) > 1:
                raise UserError(f"{path}: the bands of sensor '{sensor}' mix dtypes {sorted(dtypes)}; convert "
                                f"them to one dtype first")
            if src.crs is None:
                raise UserError(f"{path} has no CRS; georeference it first")
            sources[sensor] = (src.crs, src.bounds, src.transform, src.shape, src.res)
            infos.append(RasterInfo(sensor=sensor, path=str(path), dtype=storage_dtype(dtypes.pop()),
                                    nodata=nodata_value(src.nodata), pixel_area=abs(src.res[0] * src.res[1]),
                                    band_indexes=tuple(indexes)))
    (name_a, (crs_a, bounds_a, *_)), (name_b, (crs_b, bounds_b, *_)) = sources.items()
    if crs_a != crs_b:
        raise UserError(f"the rasters have different CRS: {name_a} {crs_a.to_string()}, {name_b} "
                        f"{crs_b.to_string()}; reproject one onto the other's CRS first (e.g. gdalwarp -t_srs)")
    left, bottom = max(bounds_a.left, bounds_b.left), max(bounds_a.bottom, bounds_b.bottom)
    right, top = min(bounds_a.right, bounds_b.right), min(bounds_a.top, bounds_b.top)
    if left >= right or bottom >= top:
        raise UserError(f"the rasters do not overlap: {name_a} covers {tuple(bounds_a)}, {name_b} covers "
                        f"{tuple(bounds_b)} (in {crs_a.to_string()})")
    fine = min(infos, key=lambda info: info.pixel_area)
    _, _, fine_transform, (fine_h, fine_w), fine_res = sources[fine.sensor]
    window = from_bounds(left, bottom, right, top, transform=fine_transform)
    eps = 1e-6  # keep only whole fine pixels inside the intersection
    col0, row0 = max(0, math.ceil(window.col_off - eps)), max(0, math.ceil(window.row_off - eps))
    col1 = min(fine_w, math.floor(window.col_off + window.width + eps))
    row1 = min(fine_h, math.floor(window.row_off + window.height + eps))
    inner = Window(col0, row0, col1 - col0, row1 - row0)
    return PairGrid(rasters=(infos[0], infos[1]), fine=fine.sensor, crs_wkt=crs_a.to_wkt(), col_off=col0, row_off=row0,
                    height=row1 - row0, width=col1 - col0,
                    transform=rasterio.windows.transform(inner, fine_transform),
                    gsd_m=nominal_gsd_m(crs_a, fine_res))


def load_tile(offset: tuple[int, int], *, grid: PairGrid, size: int, resampling: str,
              max_nodata: float, resize: int | None = None) -> LoadResult:
    """Cut one size x size tile at (row, col) of the intersection: fine raster copied, coarse one resampled;
    with ``resize``, both resampled onto resize x resize pixels over the same footprint."""
    row, col = offset
    tile_transform = grid.transform @ Affine.translation(col, row)
    out_size = resize or size
    if resize:
        tile_transform = tile_transform @ Affine.scale(size / resize)
    images, invalid_HW = {}, np.zeros((out_size, out_size), dtype=bool)
    for info in grid.rasters:
        with rasterio.open(info.path) as src:
            indexes = list(info.band_indexes)
            if info.sensor == grid.fine and not resize:
                array_CHW = src.read(indexes, window=Window(grid.col_off + col, grid.row_off + row, size, size))
            else:
                array_CHW = np.full((len(indexes), out_size, out_size), info.nodata if info.nodata is not None else 0,
                                    dtype=src.dtypes[indexes[0] - 1])
                reproject(rasterio.band(src, indexes), array_CHW,
                          dst_transform=tile_transform, dst_crs=grid.crs_wkt, src_nodata=info.nodata,
                          dst_nodata=info.nodata, resampling=Resampling[resampling])
        images[info.sensor] = array_CHW.astype(info.dtype)
        invalid_HW |= invalid_mask(array_CHW, info.nodata)
    sample_id = f"{Path(grid.rasters[0].path).stem}+{Path(grid.rasters[1].path).stem}_r{row}_c{col}"
    fraction = float(invalid_HW.mean())
    if fraction > max_nodata:
        raise SkipItem(f"nodata fraction {fraction:.2f} > --max-nodata {max_nodata}")
    x, y = tile_transform @ (out_size / 2, out_size / 2)
    crs = rasterio.crs.CRS.from_wkt(grid.crs_wkt)
    lons, lats = warp_transform(crs, "EPSG:4326", [x], [y])
    return LoadResult(samples=[Sample(sample_id=sample_id, images=images, lat=lats[0], lon=lons[0],
                                      georef=grid_georef(crs, tile_transform))])


def parse_rasters(values: list[str]) -> dict[str, Path]:
    rasters = {}
    for value in values:
        sensor, sep, path = value.partition("=")
        if not sep or not sensor or not path:
            raise UserError(f"--raster {value!r}: expected SENSOR=PATH, e.g. --raster dsm=dsm.tif")
        get_sensor(sensor)
        if sensor in rasters:
            raise UserError(f"--raster: sensor '{sensor}' given twice")
        rasters[sensor] = Path(path)
    return rasters


def parse_bands(values: list[str]) -> dict[str, BandSelection]:
    """``["rgb=3,2,1"]`` -> {"rgb": (3, 2, 1)}."""
    bands = {}
    for value in values:
        sensor, sep, selection = value.partition("=")
        if not sep or not sensor or not selection:
            raise UserError(f"--bands {value!r}: expected SENSOR=LIST, e.g. --bands rgb=3,2,1")
        if sensor in bands:
            raise UserError(f"--bands: sensor '{sensor}' given twice")
        bands[sensor] = parse_band_selection(selection)
    return bands


def convert(args: argparse.Namespace) -> int:
    if not 0.0 <= args.max_nodata <= 1.0:
        raise UserError(f"--max-nodata must be in [0, 1], got {args.max_nodata}")
    if args.resize is not None and args.resize < 1:
        raise UserError(f"--resize must be a size in pixels >= 1, got {args.resize}")
    grid = plan_pair(parse_rasters(args.raster), parse_bands(args.bands or []))
    stride = args.stride or args.size
    offsets = tile_offsets(grid.height, grid.width, args.size, stride)
    if not offsets:
        raise UserError(f"the overlap of the rasters is {grid.height}x{grid.width} pixels on the {grid.fine} grid, "
                        f"smaller than one --size {args.size} tile; use a smaller --size")
    out_size = args.resize or args.size
    gsd_m = grid.gsd_m * args.size / out_size
    print(f"overlap {grid.height}x{grid.width} px on the {grid.fine} grid -> {len(offsets)} tiles of {args.size} px "
          f"(stride {stride}); " + (f"both rasters resampled to {out_size} x {out_size} px ({gsd_m:.4g} m)"
                                    if args.resize else "the other raster is resampled")
          + f" ({args.resampling})")
    sensors = {info.sensor: SensorArraySpec(dtype=info.dtype, channels=get_sensor(info.sensor).num_channels,
                                            height=out_size, width=out_size, nodata=info.nodata, gsd_m=gsd_m)
               for info in grid.rasters}
    load = functools.partial(load_tile, grid=grid, size=args.size, resampling=args.resampling,
                             max_nodata=args.max_nodata, resize=args.resize)
    run_from_args(args, items=offsets, load=load, group=args.group, sensors=sensors, description="raster-pair",
                  source=" + ".join(f"{i.sensor}={i.path} (bands {list(i.band_indexes)})" for i in grid.rasters)
                  + f"; tiled on the {grid.fine} grid, the other resampled ({args.resampling})"
                  + (f"; tiles of {args.size} px resized to {args.resize} px" if args.resize else ""))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "raster-pair", help="two co-registered rasters (e.g. RGB + DSM) -> paired tiles",
        description="Tiles the overlap of two rasters in the same CRS into paired patches on the finer raster's "
                    "grid; the coarser raster is resampled onto it (--resampling, default bilinear). Refuses "
                    "rasters in different CRS or without overlap.")
    parser.add_argument("--raster", action="append", required=True, metavar="SENSOR=PATH",
                        help="a raster and the registered sensor it holds; give it twice (e.g. rgb=ortho.tif "
                             "dsm=dsm.tif)")
    parser.add_argument("--bands", action="append", metavar="SENSOR=LIST",
                        help="the raster bands that make SENSOR's bands, in its order: 1-based indexes or band "
                             "descriptions, e.g. rgb=3,2,1 (default: all bands of the raster, as stored)")
    parser.add_argument("--size", type=positive_int, default=192, help="tile size in pixels (default 192)")
    parser.add_argument("--stride", type=int, default=None, help="step between tiles (default: --size)")
    parser.add_argument("--resampling", choices=RESAMPLINGS, default="bilinear",
                        help="how the coarser raster is resampled onto the finer grid, and with --resize both "
                             "(default bilinear)")
    parser.add_argument("--resize", type=int, default=None, metavar="PX",
                        help="store each --size tile resampled to PX x PX pixels (same footprint, coarser pixels); "
                             "MDAS as in the paper: --size 768 --resize 384")
    parser.add_argument("--max-nodata", type=float, default=0.25,
                        help="skip tiles with a larger share of nodata pixels in either raster (default 0.25)")
    parser.add_argument("--group", default="mdas", help="data group written in the shards (default mdas)")
    add_common_args(parser, prefix="pair")
    parser.set_defaults(func=convert)
