"""``msgfm convert sen12mscr``: SEN12MS-CR cloud-removal triplets to shards.

Input layout (Ebel et al. 2020, one folder per ROI, season and modality, as the archives unpack)::

    ROIs1158_spring_s1/s1_1/ROIs1158_spring_s1_1_p30.tif                 2 bands float32 (VV, VH dB)
    ROIs1158_spring_s2/s2_1/ROIs1158_spring_s2_1_p30.tif                 13 bands uint16, cloud-free
    ROIs1158_spring_s2_cloudy/s2_cloudy_1/ROIs1158_spring_s2_cloudy_1_p30.tif   13 bands uint16, cloudy

Output: sensors ``sar`` and ``s2`` (the *cloudy* image: the model's input; 12 bands, B10
dropped by name, as the pretrained ``s2`` embedding expects; ``--s2-sensor s2_l1c`` keeps 13)
and ``labels/s2_cloud_free`` (the target, same bands, uint16, attrs ``bands`` and
``scale`` = 1e-4 to reflectance). All three must share one grid (CRS, transform, size).

``--splits`` writes the official train/val/test split (scenes listed below, one folder each);
triplets of scenes in none of the lists are reported, not converted.
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from msgfm.data.convert.common import (
    LoadResult,
    Sample,
    SkipItem,
    add_common_args,
    find_in_layout,
    positive_int,
    run_from_args,
    run_splits_from_args,
)
from msgfm.data.convert.sen12ms import S1_NAME as _S1
from msgfm.data.convert.sen12ms import (
    S2_SCALE,
    S2_SENSOR_CHOICES,
    SOURCE_S2_SENSOR,
    patch_size,
    s2_band_indices,
    sensor_specs,
)
from msgfm.data.format import LabelSpec
from msgfm.data.georef import grid_georef
from msgfm.errors import MissingFileError
from msgfm.sensors import get_sensor

TARGET_LABEL = "s2_cloud_free"

# The official split by scene (ROI folder -> scene numbers s1_<n>), as the dataset's authors define
# it for SEN12MS-CR and SEN12MS-CR-TS (Ebel et al.; the data loader of their UnCRtainTS code).
OFFICIAL_SPLITS: dict[str, dict[str, tuple[int, ...]]] = {
    "train": {
        "ROIs1158_spring": (1, 6, 8, 9, 15, 21, 26, 39, 40, 45, 58, 63, 66, 75, 77, 97, 100, 101, 109, 110, 113, 115,
                            117, 119, 120, 121, 124, 126, 128, 132, 134, 141, 142, 145, 147),
        "ROIs1868_summer": (4, 7, 11, 15, 25, 27, 31, 36, 40, 42, 43, 47, 55, 56, 72, 76, 86, 87, 89, 90, 93, 95, 100,
                            101, 102, 113, 114, 115, 120, 121, 123, 124, 125, 126, 132, 133, 135, 137, 139, 140, 143,
                            146, 147),
        "ROIs1970_fall": (1, 3, 4, 6, 11, 14, 19, 22, 26, 27, 28, 30, 31, 33, 35, 37, 39, 40, 41, 42, 57, 64, 71, 77,
                          81, 82, 83, 85, 88, 91, 93, 100, 104, 105, 107, 109, 110, 112, 114, 116, 119, 120, 122, 125,
                          128, 131, 133, 134, 135, 136, 141, 142, 144, 147, 148, 149),
        "ROIs2017_winter": (8, 21, 25, 42, 47, 49, 55, 59, 61, 62, 64, 68, 75, 81, 94, 102, 104, 112, 116, 135, 146),
    },
    "val": {"ROIs1158_spring": (17,), "ROIs1868_summer": (17, 19, 80, 127), "ROIs1970_fall": (65,),
            "ROIs2017_winter": (22, 84, 107, 130)},
    "test": {"ROIs1158_spring": (31, 44, 106, 123, 140), "ROIs1868_summer": (73, 119), "ROIs1970_fall": (139,),
             "ROIs2017_winter": (63, 108)},
}
_SPLIT_OF_SCENE = {(roi, scene): split for split, rois in OFFICIAL_SPLITS.items()
                   for roi, scenes in rois.items() for scene in scenes}


def find_triplets(root: Path) -> tuple[list[tuple[Path, Path, Path]], list[tuple[str, str]]]:
    """(S1, cloud-free S2, cloudy S2) files under ``root``, and S1 patches lacking a partner."""
    triplets: list[tuple[Path, Path, Path]] = []
    s1_files, skipped = find_in_layout(root, "*_s1", "s1_*", "*_s1_*_p*.tif")
    for s1 in s1_files:
        match = _S1.fullmatch(s1.name)
        if not match:
            skipped.append((str(s1), "file name does not follow ROIsNNNN_season_s1_SCENE_pPATCH.tif"))
            continue
        roi, scene, patch = match["roi"], match["scene"], match["patch"]
        base = s1.parent.parent.parent
        clear = base / f"{roi}_s2" / f"s2_{scene}" / f"{roi}_s2_{scene}_p{patch}.tif"
        cloudy = base / f"{roi}_s2_cloudy" / f"s2_cloudy_{scene}" / f"{roi}_s2_cloudy_{scene}_p{patch}.tif"
        missing = [p.relative_to(root).as_posix() for p in (clear, cloudy) if not p.is_file()]
        if missing:
            skipped.append((str(s1), f"no partner: expected {', '.join(missing)}"))
        else:
            triplets.append((s1, clear, cloudy))
    return triplets, skipped


def scene_split(s1_path: str | Path) -> str | None:
    """The official split of an S1 patch file's ROI and scene; None for a scene in no split."""
    match = _S1.fullmatch(Path(s1_path).name)
    return _SPLIT_OF_SCENE.get((match["roi"], int(match["scene"]))) if match else None


def split_triplets(triplets: list[tuple[Path, Path, Path]], skipped: list[tuple[str, str]]
                   ) -> tuple[dict[str, list], dict[str, list[tuple[str, str]]], list[tuple[str, str]]]:
    """Triplets and skipped S1 patches by official split, and what belongs to no listed scene."""
    splits: dict[str, list] = {}
    skipped_in_split: dict[str, list[tuple[str, str]]] = {}
    outside = []
    for triplet in triplets:
        split = scene_split(triplet[0])
        if split is None:
            outside.append((str(triplet[0]), "scene in none of the official SEN12MS-CR splits"))
        else:
            splits.setdefault(split, []).append(triplet)
    for item, reason in skipped:
        split = scene_split(item)
        (skipped_in_split.setdefault(split, []) if split else outside).append((item, reason))
    return splits, skipped_in_split, outside


def load_triplet(triplet: tuple[Path, Path, Path], *, size: int, s2_sensor: str) -> LoadResult:
    s1_path, clear_path, cloudy_path = triplet
    source_bands = get_sensor(SOURCE_S2_SENSOR).bands
    band_index = s2_band_indices(s2_sensor)
    with rasterio.open(s1_path) as s1, rasterio.open(clear_path) as clear, rasterio.open(cloudy_path) as cloudy:
        if s1.count != 2 or clear.count != len(source_bands) or cloudy.count != len(source_bands):
            raise SkipItem(f"expected 2 S1 bands and {len(source_bands)} S2 bands, got {s1.count}, {clear.count}, "
                           f"{cloudy.count}")
        for src in (s1, clear, cloudy):
            if src.shape != (size, size):
                raise SkipItem(f"{Path(src.name).name} is {src.shape}, expected {size}x{size} (--size)")
            if src.crs != s1.crs or not src.transform.almost_equals(s1.transform):
                raise SkipItem(f"{Path(src.name).name} is not on the S1 patch's grid (CRS or transform differ)")
        sar_CHW = s1.read().astype(np.float32)
        clear_CHW = clear.read(band_index).astype(np.uint16)
        cloudy_CHW = cloudy.read(band_index).astype(np.uint16)
        georef = grid_georef(s1.crs, s1.transform)
    match = _S1.fullmatch(s1_path.name)
    assert match is not None  # find_triplets lists only files with such names
    sample_id = f"{match['roi']}_{match['scene']}_p{match['patch']}"
    return LoadResult(samples=[Sample(sample_id=sample_id, images={"sar": sar_CHW, s2_sensor: cloudy_CHW},
                                      labels={TARGET_LABEL: clear_CHW}, georef=georef)])


def convert(args: argparse.Namespace) -> int:
    if not args.root.is_dir():
        raise MissingFileError(f"{args.root} is not a folder (expected ROIs*_s1/, ROIs*_s2/, ROIs*_s2_cloudy/)")
    triplets, skipped = find_triplets(args.root)
    if not triplets:
        raise MissingFileError(f"no SEN12MS-CR triplet under {args.root}: expected ROIs*_s1/s1_N/*_s1_N_pP.tif "
                               f"with matching ROIs*_s2/ and ROIs*_s2_cloudy/ files")
    size = patch_size(triplets[0][0], args.size)
    sensor = get_sensor(args.s2_sensor)
    sensors = sensor_specs(size, args.s2_sensor)
    target = LabelSpec(name=TARGET_LABEL, shape=(sensor.num_channels, size, size), dtype="uint16",
                       attrs={"bands": list(sensor.bands), "sensor": args.s2_sensor, "scale": S2_SCALE,
                              "description": "cloud-free Sentinel-2 L1C target, reflectance x 1e4"})
    common: dict[str, Any] = dict(load=functools.partial(load_triplet, size=size, s2_sensor=args.s2_sensor),
                                  group="sen12mscr",
                  sensors=sensors, labels=[target], source=f"SEN12MS-CR: {args.root}", description="sen12mscr")
    if args.splits:
        splits, skipped_in_split, outside = split_triplets(triplets, skipped)
        run_splits_from_args(args, splits=splits, skipped_in_split=skipped_in_split, skipped_outside=outside,
                             **common)
    else:
        run_from_args(args, items=triplets, skipped_before=skipped, **common)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sen12mscr", help="SEN12MS-CR (S1, cloudy S2, cloud-free S2) -> cloud-removal shards",
        description="Matches ROIs*_s1/s1_N/*_pP.tif with ROIs*_s2/s2_N/ and ROIs*_s2_cloudy/s2_cloudy_N/; writes "
                    "sar + cloudy s2 as inputs and labels/s2_cloud_free as the target.")
    parser.add_argument("root", type=Path, help="folder holding the ROIs*_s1, ROIs*_s2 and ROIs*_s2_cloudy folders")
    parser.add_argument("--s2-sensor", choices=S2_SENSOR_CHOICES, default="s2",
                        help="s2: 12 bands without B10 (default, matches the pretrained s2 embedding); "
                             "s2_l1c: all 13 L1C bands")
    parser.add_argument("--size", type=positive_int, default=None, help="patch size (default: the first patch's, 256)")
    parser.add_argument("--splits", action="store_true",
                        help="write the official split, one folder each: OUTPUT/train, OUTPUT/val, OUTPUT/test "
                             "(scenes of none of them are reported, not converted)")
    add_common_args(parser, prefix="sen12mscr")
    parser.set_defaults(func=convert)
