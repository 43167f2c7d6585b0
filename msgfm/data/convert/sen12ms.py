"""``msgfm convert sen12ms``: the SEN12MS layout to paired SAR + Sentinel-2 shards.

Input layout (Schmitt et al. 2019, as distributed)::

    ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p30.tif   2 bands float32 (VV, VH, dB), 256 x 256
    ROIs1158_spring/s2_1/ROIs1158_spring_s2_1_p30.tif   13 bands uint16 (L1C B01..B12 incl. B10, x 1e4)

The S1 and S2 patch of a pair share season, scene and patch number and lie on the same
10 m grid (checked: CRS, transform and size must agree, else the pair is skipped).
By default S2 is stored as sensor ``s2`` (the 12 bands of the registry: B10 dropped by
band name); ``--s2-sensor s2_l1c`` keeps all 13.
"""
from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

import rasterio
from rasterio.warp import transform as warp_transform

from msgfm.data.convert.common import (
    LoadResult,
    Sample,
    SkipItem,
    add_common_args,
    find_in_layout,
    positive_int,
    run_from_args,
)
from msgfm.data.format import SensorArraySpec
from msgfm.data.georef import grid_georef
from msgfm.errors import MissingFileError
from msgfm.sensors import get_sensor

S2_SCALE = 1e-4  # SEN12MS L1C digital numbers are reflectance x 10000
SOURCE_S2_SENSOR = "s2_l1c"  # what the files hold: all 13 L1C bands in this order
S1_NAME = re.compile(r"(?P<roi>ROIs\d+_[a-z]+)_s1_(?P<scene>\d+)_p(?P<patch>\d+)\.tif")


def find_pairs(root: Path) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """(S1 file, S2 file) pairs under ``root`` (one ROI folder or a folder of them), and unpaired files."""
    pairs: list[tuple[Path, Path]] = []
    s1_files, skipped = find_in_layout(root, "s1_*", "*_s1_*_p*.tif")
    for s1 in s1_files:
        match = S1_NAME.fullmatch(s1.name)
        if not match:
            skipped.append((str(s1), "file name does not follow ROIsNNNN_season_s1_SCENE_pPATCH.tif"))
            continue
        s2 = s1.parent.parent / f"s2_{match['scene']}" / f"{match['roi']}_s2_{match['scene']}_p{match['patch']}.tif"
        if s2.is_file():
            pairs.append((s1, s2))
        else:
            skipped.append((str(s1), f"no S2 partner: expected {s2.relative_to(root)}"))
    return pairs, skipped


def _patch_id(s1: Path) -> str:
    match = S1_NAME.fullmatch(s1.name)
    assert match is not None, f"{s1} was listed by S1_NAME"
    return f"{match['roi']}_{match['scene']}_p{match['patch']}"


def s2_band_indices(s2_sensor: str) -> list[int]:
    """1-based rasterio band indices of ``s2_sensor``'s bands in a 13-band SEN12MS L1C file."""
    source_bands = get_sensor(SOURCE_S2_SENSOR).bands
    return [source_bands.index(b) + 1 for b in get_sensor(s2_sensor).bands]


S2_SENSOR_CHOICES = ("s2", "s2_l1c")  # 12 bands without B10 (the pretrained s2 embedding), or all 13


def patch_size(first_patch: Path, size: int | None) -> int:
    """``--size`` when given, else the height of the first patch (256 in SEN12MS)."""
    if size is not None:
        return size
    with rasterio.open(first_patch) as first:
        return first.height


def sensor_specs(size: int, s2_sensor: str) -> dict[str, SensorArraySpec]:
    """How SEN12MS-style S1 (float32 dB) and S2 (uint16 reflectance x 1e4) patches are stored."""
    return {"sar": SensorArraySpec(dtype="float32", channels=2, height=size, width=size),
            s2_sensor: SensorArraySpec(dtype="uint16", channels=get_sensor(s2_sensor).num_channels,
                                       height=size, width=size, scale=S2_SCALE)}


def load_pair(pair: tuple[Path, Path], *, size: int, s2_sensor: str) -> LoadResult:
    s1_path, s2_path = pair
    source_bands = get_sensor(SOURCE_S2_SENSOR).bands
    band_index = s2_band_indices(s2_sensor)
    with rasterio.open(s1_path) as s1, rasterio.open(s2_path) as s2:
        if s1.count != 2 or s2.count != len(source_bands):
            raise SkipItem(f"expected 2 S1 bands and {len(source_bands)} S2 bands, got {s1.count} and {s2.count}")
        if s1.shape != (size, size) or s2.shape != (size, size):
            raise SkipItem(f"patch size S1 {s1.shape}, S2 {s2.shape}; expected {size}x{size} (--size)")
        if s1.crs != s2.crs or not s1.transform.almost_equals(s2.transform):
            raise SkipItem("S1 and S2 are not on the same grid (CRS or transform differ)")
        sar_CHW = s1.read().astype("float32")
        s2_CHW = s2.read(band_index).astype("uint16")
        x, y = s2.xy(size / 2, size / 2, offset="ul")
        lons, lats = warp_transform(s2.crs, "EPSG:4326", [x], [y])
        georef = grid_georef(s2.crs, s2.transform)
    return LoadResult(samples=[Sample(sample_id=_patch_id(s1_path), images={"sar": sar_CHW, s2_sensor: s2_CHW},
                                      lat=lats[0], lon=lons[0], georef=georef)])


def convert(args: argparse.Namespace) -> int:
    if not args.root.is_dir():
        raise MissingFileError(f"{args.root} is not a folder (expected SEN12MS ROI folders with s1_*/ and s2_*/)")
    pairs, skipped = find_pairs(args.root)
    if not pairs:
        raise MissingFileError(f"no SEN12MS pair found under {args.root}: expected "
                               f"ROIs*/s1_*/ROIs*_s1_*_p*.tif with matching s2_* files")
    size = patch_size(pairs[0][0], args.size)
    sensors = sensor_specs(size, args.s2_sensor)
    run_from_args(args, items=pairs, load=functools.partial(load_pair, size=size, s2_sensor=args.s2_sensor),
                  group=args.group, sensors=sensors, skipped_before=skipped, source=f"SEN12MS: {args.root}",
                  description="sen12ms")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sen12ms", help="SEN12MS ROI folders -> paired sar + s2 shards",
        description="Pairs ROIs*/s1_N/*_s1_N_pP.tif with ROIs*/s2_N/*_s2_N_pP.tif (same grid, no resampling). "
                    "S2 is written as sensor s2 (12 bands, B10 dropped) or, with --s2-sensor s2_l1c, all 13.")
    parser.add_argument("root", type=Path, help="a SEN12MS ROI folder or a folder holding several")
    parser.add_argument("--s2-sensor", choices=S2_SENSOR_CHOICES, default="s2",
                        help="s2: 12 bands without B10 (default, as the pretraining config expects); "
                             "s2_l1c: all 13 L1C bands")
    parser.add_argument("--size", type=positive_int, default=None,
                        help="patch size in pixels (default: that of the first patch, 256 in SEN12MS); "
                             "patches of another size are skipped")
    parser.add_argument("--group", default="sen12ms", help="data group written in the shards (default sen12ms)")
    add_common_args(parser, prefix="sen12ms")
    parser.set_defaults(func=convert)
