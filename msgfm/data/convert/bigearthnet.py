"""``msgfm convert bigearthnet``: BigEarthNet v1 (BigEarthNet-MM) or v2 (reBEN) S1 + S2 patches to
paired shards, one folder per official split with ``--splits``.

The layouts, the official splits and the snow/cloud exclusion are in ``bigearthnet_index``.

Output: sensors ``sar`` (VV, VH float32 dB) and ``s2`` (12 bands uint16, reflectance x 1e4,
all on the 10 m 120 x 120 grid) plus ``labels/multilabel`` in the 19-class nomenclature.
The 10 m bands (B02, B03, B04, B08) are copied unchanged; the 20 m and 60 m bands are
resampled onto the 10 m grid with bilinear interpolation (GDAL warp, pixel-area aware).
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import reproject
from rasterio.warp import transform as warp_transform
from tqdm import tqdm

from msgfm.data.convert.bigearthnet_index import BenLayout, BenListing, BenPatch, list_v1, list_v2, resolve_layout
from msgfm.data.convert.common import LoadResult, Sample, SkipItem, add_common_args, run_from_args, run_splits_from_args
from msgfm.data.format import SensorArraySpec, multilabel_spec
from msgfm.data.georef import grid_georef
from msgfm.errors import UserError
from msgfm.sensors import get_sensor

# The 19-class BigEarthNet nomenclature (Sumbul et al., "BigEarthNet-MM", IEEE GRSM 2021, Table 1):
# each class and the CORINE Land Cover level-3 labels (of the 43 used in BigEarthNet v1) it merges.
# The 11 CLC labels absent here (e.g. "Airports", "Bare rock", "Intertidal flats") have no 19-class target.
BEN19_FROM_CLC43: dict[str, tuple[str, ...]] = {
    "Urban fabric": ("Continuous urban fabric", "Discontinuous urban fabric"),
    "Industrial or commercial units": ("Industrial or commercial units",),
    "Arable land": ("Non-irrigated arable land", "Permanently irrigated land", "Rice fields"),
    "Permanent crops": ("Vineyards", "Fruit trees and berry plantations", "Olive groves",
                        "Annual crops associated with permanent crops"),
    "Pastures": ("Pastures",),
    "Complex cultivation patterns": ("Complex cultivation patterns",),
    "Land principally occupied by agriculture, with significant areas of natural vegetation":
        ("Land principally occupied by agriculture, with significant areas of natural vegetation",),
    "Agro-forestry areas": ("Agro-forestry areas",),
    "Broad-leaved forest": ("Broad-leaved forest",),
    "Coniferous forest": ("Coniferous forest",),
    "Mixed forest": ("Mixed forest",),
    "Natural grassland and sparsely vegetated areas": ("Natural grassland", "Sparsely vegetated areas"),
    "Moors, heathland and sclerophyllous vegetation": ("Moors and heathland", "Sclerophyllous vegetation"),
    "Transitional woodland, shrub": ("Transitional woodland/shrub",),
    "Beaches, dunes, sands": ("Beaches, dunes, sands",),
    "Inland wetlands": ("Inland marshes", "Peatbogs"),
    "Coastal wetlands": ("Salt marshes", "Salines"),
    "Inland waters": ("Water courses", "Water bodies"),
    "Marine waters": ("Coastal lagoons", "Estuaries", "Sea and ocean"),
}
BEN19_CLASSES: tuple[str, ...] = tuple(BEN19_FROM_CLC43)
CLC43_WITHOUT_BEN19: frozenset[str] = frozenset({
    "Road and rail networks and associated land", "Port areas", "Airports", "Mineral extraction sites",
    "Dump sites", "Construction sites", "Green urban areas", "Sport and leisure facilities", "Bare rock",
    "Burnt areas", "Intertidal flats"})
_CLC43_TO_INDEX = {clc: i for i, merged in enumerate(BEN19_FROM_CLC43.values()) for clc in merged}
assert len(_CLC43_TO_INDEX) + len(CLC43_WITHOUT_BEN19) == 43

PATCH_SIZE = 120  # pixels of the 10 m grid
S2_SCALE = 1e-4  # BigEarthNet L2A stores reflectance x 10000
RESAMPLING = Resampling.bilinear


def ben19_vector(clc43_labels: list[str], where: str) -> np.ndarray:
    """(19,) uint8 multi-hot vector of the 19-class labels for a patch's CLC-43 labels."""
    vector = np.zeros(len(BEN19_CLASSES), dtype=np.uint8)
    for label in clc43_labels:
        if label in _CLC43_TO_INDEX:
            vector[_CLC43_TO_INDEX[label]] = 1
        elif label not in CLC43_WITHOUT_BEN19:
            raise UserError(f"{where}: '{label}' is not one of the 43 BigEarthNet CLC labels")
    return vector


def _metadata(folder: Path) -> dict:
    path = folder / f"{folder.name}_labels_metadata.json"
    if not path.is_file():
        raise SkipItem(f"{path.name} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def pair_patches(s1_root: Path, s2_root: Path) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """(S1 folder, S2 folder) pairs from each S1 patch's ``corresponding_s2_patch``, and what was left out."""
    s2_folders = {p.name: p for p in sorted(s2_root.iterdir()) if p.is_dir()}
    pairs, skipped, used = [], [], set()
    s1_folders = sorted(p for p in s1_root.iterdir() if p.is_dir())
    # v1 pairs through one JSON per S1 patch: 590k small reads, minutes on a network disk
    for s1 in tqdm(s1_folders, desc="pairing S1 with S2 patches", unit="patch", dynamic_ncols=True):
        try:
            s2_name = _metadata(s1).get("corresponding_s2_patch")
        except (SkipItem, ValueError) as err:
            skipped.append((str(s1), f"S1 metadata unusable: {err}"))
            continue
        if not s2_name:
            skipped.append((str(s1), "S1 metadata names no corresponding_s2_patch"))
        elif s2_name not in s2_folders:
            skipped.append((str(s1), f"its S2 patch {s2_name} is not in {s2_root}"))
        else:
            pairs.append((s1, s2_folders[s2_name]))
            used.add(s2_name)
    skipped += [(str(p), "no S1 patch names this S2 patch") for name, p in s2_folders.items() if name not in used]
    return pairs, skipped


def _read_band(path: Path, reference: rasterio.DatasetReader | None) -> np.ndarray:
    """A band on the 10 m grid: as stored when it is on it, else resampled onto ``reference``'s grid."""
    if not path.is_file():
        raise SkipItem(f"band file {path.name} is missing")
    with rasterio.open(path) as src:
        if src.shape == (PATCH_SIZE, PATCH_SIZE):
            return src.read(1)
        assert reference is not None
        out_HW = np.zeros((PATCH_SIZE, PATCH_SIZE), dtype=src.dtypes[0])
        reproject(rasterio.band(src, 1), out_HW, dst_transform=reference.transform, dst_crs=reference.crs,
                  resampling=RESAMPLING)
        return out_HW


def _read_s1_band(path: Path, reference: rasterio.DatasetReader) -> np.ndarray:
    if not path.is_file():
        raise SkipItem(f"band file {path.name} is missing")
    with rasterio.open(path) as src:
        if src.crs != reference.crs or src.transform != reference.transform or src.shape != reference.shape:
            raise SkipItem(f"{path.name} is not on the grid of its S2 patch (CRS, transform or size differ)")
        return src.read(1)


def ben19_from_names(names: tuple[str, ...]) -> np.ndarray:
    """(19,) uint8 multi-hot vector of labels already in the 19-class nomenclature (v2 metadata)."""
    vector = np.zeros(len(BEN19_CLASSES), dtype=np.uint8)
    vector[[BEN19_CLASSES.index(name) for name in names]] = 1
    return vector


def load_pair(patch: BenPatch, *, require_labels: bool = True) -> LoadResult:
    """Read one S1/S2 pair into a Sample with sar, s2 and the 19-class label vector."""
    s1, s2 = patch.s1, patch.s2
    for folder, what in ((s2, "S2"), (s1, "S1")):
        if not folder.is_dir():
            raise SkipItem(f"{what} patch folder missing: {folder}")
    s2_bands = get_sensor("s2").bands
    with rasterio.open(s2 / f"{s2.name}_B02.tif") as reference:
        if reference.shape != (PATCH_SIZE, PATCH_SIZE):
            raise SkipItem(f"B02 is {reference.shape}, expected {PATCH_SIZE}x{PATCH_SIZE}")
        s2_CHW = np.stack([_read_band(s2 / f"{s2.name}_{band}.tif", reference) for band in s2_bands])
        center = reference.xy(PATCH_SIZE / 2, PATCH_SIZE / 2, offset="ul")
        lons, lats = warp_transform(reference.crs, "EPSG:4326", [center[0]], [center[1]])
        georef = grid_georef(reference.crs, reference.transform)
        sar_CHW = np.stack([_read_s1_band(s1 / f"{s1.name}_{pol}.tif", reference)
                            for pol in get_sensor("sar").bands])
    if patch.labels is None:  # v1: CLC-43 labels and the date in the S2 patch's JSON
        meta = _metadata(s2)
        labels = ben19_vector(list(meta.get("labels", [])), f"{s2.name}_labels_metadata.json")
        time = str(meta.get("acquisition_date", "")).replace(" ", "T") or None
    else:
        labels, time = ben19_from_names(patch.labels), patch.time
    if require_labels and not labels.any():
        raise SkipItem("no 19-class label: none of its labels has a 19-class target (--keep-unlabelled keeps it)")
    return LoadResult(samples=[Sample(sample_id=s2.name, images={"sar": sar_CHW.astype("float32"), "s2": s2_CHW},
                                      labels={"multilabel": labels}, lat=lats[0], lon=lons[0], time=time,
                                      georef=georef)])


def list_patches(args: argparse.Namespace) -> tuple[BenLayout, BenListing]:
    """The release on disk and its patches, by split with --splits."""
    layout = resolve_layout(args.root, args.s1, args.s2, args.version, args.metadata, args.split_lists)
    if layout.version == 2:
        listing = list_v2(layout, by_split=args.splits, keep_cloudy=args.keep_cloudy, classes=BEN19_CLASSES)
    else:
        pairs, unpaired = pair_patches(layout.s1, layout.s2)
        listing = list_v1(layout, pairs, unpaired, by_split=args.splits, keep_cloudy=args.keep_cloudy)
    return layout, listing


def convert(args: argparse.Namespace) -> int:
    layout, listing = list_patches(args)
    for note in listing.notes:
        print(f"note: {note}")
    sensors = {"sar": SensorArraySpec(dtype="float32", channels=2, height=PATCH_SIZE, width=PATCH_SIZE),
               "s2": SensorArraySpec(dtype="uint16", channels=len(get_sensor("s2").bands), height=PATCH_SIZE,
                                     width=PATCH_SIZE, scale=S2_SCALE)}
    source = (f"BigEarthNet v{layout.version}: S1 {layout.s1}, S2 {layout.s2}"
              + (f", metadata {layout.metadata}" if layout.version == 2 else ""))
    common: dict[str, Any] = dict(load=functools.partial(load_pair, require_labels=not args.keep_unlabelled),
                                  group=args.group,
                  sensors=sensors, labels=[multilabel_spec(BEN19_CLASSES)], source=source)
    if args.splits:
        run_splits_from_args(args, splits=listing.patches, skipped_in_split=listing.skipped_in_split,
                             skipped_outside=listing.skipped_outside, description="bigearthnet", **common)
    else:
        run_from_args(args, items=listing.patches.get("all", []), description="bigearthnet",
                      skipped_before=listing.skipped_outside + listing.skipped_in_split.get("all", []), **common)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bigearthnet", help="BigEarthNet v1 or v2 (reBEN) S1 + S2 patches -> paired sar + s2 shards, 19 classes",
        description="Reads BigEarthNet v1 (BigEarthNet-MM) or v2 (reBEN), told apart by the layout; stacks the 12 "
                    "S2 bands on the 10 m 120x120 grid (10 m bands copied exactly; 20 m and 60 m bands resampled "
                    "with bilinear interpolation), keeps S1 VV, VH in dB and writes the 19-class labels "
                    "(Sumbul et al. 2021). With --splits, one shard folder per official split (train/, val/, "
                    "test/). Patches with seasonal snow, cloud or shadow are left out unless --keep-cloudy.")
    parser.add_argument("root", nargs="?", type=Path, default=None,
                        help="dataset folder: BigEarthNet-S1/, BigEarthNet-S2/ and metadata.parquet (v2), or "
                             "BigEarthNet-S1-v1.0/ and BigEarthNet-v1.0/ (v1)")
    parser.add_argument("--s1", type=Path, default=None, help="folder of the S1 patches (default: in ROOT)")
    parser.add_argument("--s2", type=Path, default=None, help="folder of the S2 patches (default: in ROOT)")
    parser.add_argument("--version", choices=["auto", "1", "2"], default="auto",
                        help="BigEarthNet release (default: detected from the S2 folder's layout)")
    parser.add_argument("--metadata", type=Path, default=None,
                        help="v2: metadata.parquet (default: in ROOT, or beside the S2 folder)")
    parser.add_argument("--splits", action="store_true",
                        help="write one shard folder per official split: OUTPUT/train, OUTPUT/val, OUTPUT/test "
                             "(v2: the split column of metadata.parquet; v1: train.csv, val.csv, test.csv)")
    parser.add_argument("--split-lists", type=Path, default=None,
                        help="v1: folder of BigEarthNet-MM's train.csv/val.csv/test.csv and of "
                             "patches_with_seasonal_snow.csv/patches_with_cloud_and_shadow.csv (default: ROOT, or "
                             "beside the S2 folder)")
    parser.add_argument("--keep-cloudy", action="store_true",
                        help="keep the patches with seasonal snow, cloud or shadow (left out by default, as the "
                             "official splits do)")
    parser.add_argument("--group", default="bigearthnet", help="data group written in the shards (default bigearthnet)")
    parser.add_argument("--keep-unlabelled", action="store_true",
                        help="keep patches none of whose labels has a 19-class target (skipped by default)")
    add_common_args(parser, prefix="bigearthnet")
    parser.set_defaults(func=convert)
