"""``msgfm convert vaihingen``: ISPRS Vaihingen 2D labelling tiles to segmentation shards.

Input layout (the ISPRS benchmark package, as distributed)::

    top/top_mosaic_09cm_area<N>.tif                      IRRG true ortho photo, 3 bands uint8, 9 cm
    dsm/dsm_09cm_matching_area<N>.tif                    DSM, 1 band float32, metres, same grid
    gts_for_participants/top_mosaic_09cm_area<N>.tif     colour-coded reference (RGB uint8), or
    gts_eroded_for_participants/top_mosaic_09cm_area<N>_noBoundary.tif   (--labels eroded)

Output: sensors ``rgb`` (the IRRG bands, stored in the three channels of sensor rgb: the
paper's "RGB" input for Vaihingen is this false-colour IRRG) and ``dsm`` (float32), plus
``labels/segmentation`` with the six ISPRS classes. Tiles are cut ``--size`` x ``--size``
with ``--stride``; the area is first padded to cover every pixel (padding: label
``ignore_index``, image 0 and DSM nodata), so that an evaluation split with stride = size
counts every labelled pixel exactly once. In the eroded references, pixels within 3 px of
a class boundary are black: they become ``ignore_index`` as well, as the ISPRS protocol
("no boundary") intends. A colour outside the legend is an error naming the file.

Standard split (ISPRS / most papers): train areas 1 3 5 7 11 13 15 17 21 23 26 28 30 32 34
37, test areas 2 4 6 8 10 12 14 16 20 22 24 27 29 31 33 35 38: ``--splits`` writes them to
``train/`` and ``test/`` (test tiles without overlap, stride = size, so every labelled pixel
is scored once; ``--test-labels eroded`` for the ISPRS "no boundary" scoring), or pick areas
by hand with ``--areas``.
"""
from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from msgfm.data.convert.common import (
    LoadResult,
    Sample,
    SkipItem,
    add_common_args,
    positive_int,
    run_from_args,
    run_splits_from_args,
    tile_offsets,
)
from msgfm.data.format import SensorArraySpec, segmentation_spec
from msgfm.data.georef import grid_georef
from msgfm.errors import MissingFileError, UserError

# ISPRS legend: class name -> RGB colour in the reference images.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "impervious_surfaces": (255, 255, 255),
    "building": (0, 0, 255),
    "low_vegetation": (0, 255, 255),
    "tree": (0, 255, 0),
    "car": (255, 255, 0),
    "clutter": (255, 0, 0),
}
CLASSES = tuple(CLASS_COLOURS)
BOUNDARY_COLOUR = (0, 0, 0)  # eroded references only
IGNORE_INDEX = 255
DSM_NODATA = -9999.0
TRAIN_AREAS = (1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37)
TEST_AREAS = (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38)
_AREA = re.compile(r"top_mosaic_09cm_area(\d+)\.tif")


def colours_to_classes(rgb_3HW: np.ndarray, where: str) -> np.ndarray:
    """Colour-coded reference -> (H, W) uint8 class indices (black boundary -> IGNORE_INDEX)."""
    code_HW = (rgb_3HW[0].astype(np.int32) << 16) | (rgb_3HW[1].astype(np.int32) << 8) | rgb_3HW[2]
    out_HW = np.full(code_HW.shape, 254, dtype=np.uint8)
    for index, (r, g, b) in enumerate(CLASS_COLOURS.values()):
        out_HW[code_HW == (r << 16 | g << 8 | b)] = index
    out_HW[code_HW == 0] = IGNORE_INDEX
    unknown = out_HW == 254
    if unknown.any():
        y, x = np.argwhere(unknown)[0]
        raise UserError(f"{where}: colour {tuple(int(c) for c in rgb_3HW[:, y, x])} at pixel ({y}, {x}) is not in "
                        f"the ISPRS legend {CLASS_COLOURS}")
    return out_HW


def reference_path(root: Path, area: int, labels: str) -> Path:
    if labels == "eroded":
        return root / "gts_eroded_for_participants" / f"top_mosaic_09cm_area{area}_noBoundary.tif"
    return root / "gts_for_participants" / f"top_mosaic_09cm_area{area}.tif"


def find_areas(root: Path, areas: list[int] | None, labels: str) -> tuple[list[int], list[tuple[str, str]]]:
    """Areas with an ortho photo, a DSM and a reference; the others as (item, reason)."""
    tops = (root / "top").glob("top_mosaic_09cm_area*.tif")
    found = sorted(int(m[1]) for p in tops if (m := _AREA.fullmatch(p.name)))
    wanted = found if areas is None else areas
    usable, skipped = [], []
    for area in wanted:
        needs = {"ortho photo": root / "top" / f"top_mosaic_09cm_area{area}.tif",
                 "DSM": root / "dsm" / f"dsm_09cm_matching_area{area}.tif",
                 "reference": reference_path(root, area, labels)}
        missing = [f"{what} {path.relative_to(root)}" for what, path in needs.items() if not path.is_file()]
        if missing:
            skipped.append((f"area{area}", f"missing {', '.join(missing)}"))
        else:
            usable.append(area)
    return usable, skipped


def _pad(array: np.ndarray, height: int, width: int, value: float) -> np.ndarray:
    pad = [(0, 0)] * (array.ndim - 2) + [(0, height - array.shape[-2]), (0, width - array.shape[-1])]
    return np.pad(array, pad, constant_values=value)


def load_area(area: int, *, root: Path, labels: str, size: int, stride: int) -> LoadResult:
    top_path = root / "top" / f"top_mosaic_09cm_area{area}.tif"
    with rasterio.open(top_path) as top, rasterio.open(root / "dsm" / f"dsm_09cm_matching_area{area}.tif") as dsm, \
            rasterio.open(reference_path(root, area, labels)) as ref:
        if top.count != 3 or dsm.count != 1 or ref.count != 3:
            raise SkipItem(f"expected 3-band IRRG, 1-band DSM and 3-band reference, got {top.count}, {dsm.count}, "
                           f"{ref.count}")
        if not top.shape == dsm.shape == ref.shape:
            raise SkipItem(f"ortho {top.shape}, DSM {dsm.shape} and reference {ref.shape} differ in size")
        image = top.read().astype(np.uint8)
        height_m = dsm.read(1).astype(np.float32)[None]
        classes = colours_to_classes(ref.read(), str(ref.name))
        crs, transform = top.crs, top.transform
    H, W = image.shape[1:]
    padded_h, padded_w = -(-max(H - size, 0) // stride) * stride + size, -(-max(W - size, 0) // stride) * stride + size
    image, height_m = _pad(image, padded_h, padded_w, 0), _pad(height_m, padded_h, padded_w, DSM_NODATA)
    classes = _pad(classes, padded_h, padded_w, IGNORE_INDEX)
    samples = []
    for r, c in tile_offsets(padded_h, padded_w, size, stride):
        label = classes[r:r + size, c:c + size]
        if (label == IGNORE_INDEX).all():
            continue  # nothing to learn or score
        samples.append(Sample(sample_id=f"area{area}_r{r}_c{c}",
                              images={"rgb": image[:, r:r + size, c:c + size],
                                      "dsm": height_m[:, r:r + size, c:c + size]},
                              labels={"segmentation": label}, georef=grid_georef(crs, transform, r, c)))
    return LoadResult(samples=samples)


def convert(args: argparse.Namespace) -> int:
    root = args.root
    if not (root / "top").is_dir():
        raise MissingFileError(f"{root}: no top/ folder; expected the ISPRS Vaihingen layout "
                               f"(top/top_mosaic_09cm_area*.tif, dsm/, gts_for_participants/)")
    size, stride = args.size, args.stride or args.size
    sensors = {"rgb": SensorArraySpec(dtype="uint8", channels=3, height=size, width=size, gsd_m=0.09),
               "dsm": SensorArraySpec(dtype="float32", channels=1, height=size, width=size, nodata=DSM_NODATA,
                                      gsd_m=0.09)}
    common: dict[str, Any] = dict(group="vaihingen", sensors=sensors,
                                  labels=[segmentation_spec(CLASSES, size, size, IGNORE_INDEX)],
                  description="vaihingen")
    if args.splits:
        if args.areas:
            raise UserError("--splits converts the ISPRS train and test areas; leave out --areas (or use --areas "
                            "without --splits)")
        test_labels = args.test_labels or args.labels
        train, train_skipped = find_areas(root, list(TRAIN_AREAS), args.labels)
        test, test_skipped = find_areas(root, list(TEST_AREAS), test_labels)
        if stride != size:
            print(f"test split: stride {size} (= --size, every labelled pixel once); --stride {stride} applies to "
                  f"train")
        loads = {"train": functools.partial(load_area, root=root, labels=args.labels, size=size, stride=stride),
                 "test": functools.partial(load_area, root=root, labels=test_labels, size=size, stride=size)}
        run_splits_from_args(args, splits={"train": train, "test": test}, load=loads,
                             skipped_in_split={"train": train_skipped, "test": test_skipped},
                             source=f"ISPRS Vaihingen: {root} (train: {args.labels}, test: {test_labels} "
                                    f"references)", **common)
        return 0
    if args.test_labels:
        raise UserError("--test-labels applies to the test split of --splits; without --splits use --labels")
    areas = [int(a) for a in args.areas.split(",")] if args.areas else None
    usable, skipped = find_areas(root, areas, args.labels)
    if not usable:
        raise MissingFileError(f"{root}: no area has an ortho photo, a DSM and a reference: {skipped}")
    run_from_args(args, items=usable, load=functools.partial(load_area, root=root, labels=args.labels, size=size,
                                                             stride=stride),
                  skipped_before=skipped, source=f"ISPRS Vaihingen: {root} ({args.labels} references)", **common)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "vaihingen", help="ISPRS Vaihingen tiles -> rgb (IRRG) + dsm segmentation shards",
        description="Tiles the ISPRS Vaihingen areas (top/, dsm/, gts_*/) into size x size samples with the six "
                    "ISPRS classes; pads each area so every pixel is covered (padding is ignore_index 255).")
    parser.add_argument("root", type=Path, help="folder holding top/, dsm/ and gts_for_participants/")
    parser.add_argument("--areas", default="", help="comma-separated area numbers (default: all found); "
                        "ISPRS train: " + ",".join(map(str, TRAIN_AREAS)))
    parser.add_argument("--labels", choices=["full", "eroded"], default="full",
                        help="full: gts_for_participants; eroded: the _noBoundary references (boundaries ignored)")
    parser.add_argument("--splits", action="store_true",
                        help="write the ISPRS split: train areas to OUTPUT/train, test areas to OUTPUT/test (test "
                             "tiles without overlap)")
    parser.add_argument("--test-labels", choices=["full", "eroded"], default=None,
                        help="with --splits: references of the test split (default: --labels); eroded = the ISPRS "
                             "'no boundary' scoring")
    parser.add_argument("--size", type=positive_int, default=512, help="tile size in pixels (default 512)")
    parser.add_argument("--stride", type=int, default=0, help="tile stride (default: size, no overlap)")
    add_common_args(parser, prefix="vaihingen")
    parser.set_defaults(func=convert)
