"""Which BigEarthNet patches ``msgfm convert bigearthnet`` converts, and into which official split.

Two releases, told apart by the depth of the S2 folder (``--version`` overrides):

- v1 (BigEarthNet-MM, 590,326 pairs)::

      BigEarthNet-v1.0/<S2 patch>/<S2 patch>_B02.tif ..., <S2 patch>_labels_metadata.json (CLC-43 labels)
      BigEarthNet-S1-v1.0/<S1 patch>/<S1 patch>_VV.tif, _VH.tif, _labels_metadata.json
                                          (its "corresponding_s2_patch" names the S2 patch)

  Official splits: ``train.csv``, ``val.csv``, ``test.csv`` of BigEarthNet-MM (one pair
  ``S2 patch,S1 patch`` per line, or an S2 patch alone); they leave out the patches in
  ``patches_with_seasonal_snow.csv`` and ``patches_with_cloud_and_shadow.csv`` (one S2 patch
  per line), which are also excluded without splits when those lists are found.

- v2 (reBEN, 549,488 pairs)::

      BigEarthNet-S2/<S2 tile>/<patch_id>/<patch_id>_B02.tif ...
      BigEarthNet-S1/<S1 tile>/<s1_name>/<s1_name>_VV.tif, _VH.tif
      metadata.parquet: patch_id, labels (19-class names), split (train|validation|test), country,
                        s1_name, s2v1_name, contains_seasonal_snow, contains_cloud_or_shadow
      metadata_for_patches_with_snow_cloud_or_shadow.parquet: the same for the patches the field
                        leaves out (read with --keep-cloudy, else reported as skipped)

  where ``<S2 tile>`` is the patch_id without its last two parts and ``<S1 tile>`` the
  s1_name without its last three.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from msgfm.errors import MissingFileError, UserError

V1_S1, V1_S2 = "BigEarthNet-S1-v1.0", "BigEarthNet-v1.0"
V2_S1, V2_S2 = "BigEarthNet-S1", "BigEarthNet-S2"
V2_METADATA = "metadata.parquet"
V2_SNOW_CLOUD = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
V2_COLUMNS = ("patch_id", "labels", "split", "s1_name")
V2_SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test"}  # parquet value -> folder
V1_SPLIT_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
V1_SNOW_LIST, V1_CLOUD_LIST = "patches_with_seasonal_snow.csv", "patches_with_cloud_and_shadow.csv"
SNOW = "seasonal snow: left out as the field does (--keep-cloudy keeps it)"
CLOUD = "cloud or shadow: left out as the field does (--keep-cloudy keeps it)"
_ACQUISITION = re.compile(r"_(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})_")


@dataclass(frozen=True)
class BenPatch:
    """One S1 + S2 pair to convert. v2 carries its labels (19-class names) and time from the
    metadata; v1 leaves them None and they are read from the S2 patch's JSON."""

    s1: Path
    s2: Path
    labels: tuple[str, ...] | None = None
    time: str | None = None

    def __str__(self) -> str:  # the skip report names the S2 patch folder
        return str(self.s2)


@dataclass(frozen=True)
class BenLayout:
    """Where one BigEarthNet release lies on disk."""

    version: int
    s1: Path
    s2: Path
    metadata: Path  # v2: metadata.parquet
    lists: Path  # v1: the folder with train.csv/val.csv/test.csv and the snow/cloud lists


@dataclass
class BenListing:
    """Patches per split ("all" when no splits were asked for) and what was left out, and why."""

    patches: dict[str, list[BenPatch]] = field(default_factory=dict)
    skipped_in_split: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    skipped_outside: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def detect_version(s2_root: Path) -> int:
    """1 when S2 patch folders hold the band files, 2 when they sit in tile folders."""
    for child in sorted(p for p in s2_root.iterdir() if p.is_dir()):
        if any(child.glob("*_B02.tif")):
            return 1
        if any(child.glob("*/*_B02.tif")):
            return 2
    raise MissingFileError(f"{s2_root}: no BigEarthNet S2 patch found (neither <patch>/<patch>_B02.tif of v1 "
                           f"nor <tile>/<patch>/<patch>_B02.tif of v2)")


def resolve_layout(root: Path | None, s1: Path | None, s2: Path | None, version: str, metadata: Path | None,
                   split_lists: Path | None) -> BenLayout:
    """The folders of the release, from ROOT and/or --s1/--s2; FileNotFoundError says what is missing."""
    if root is None:
        if s1 is None or s2 is None:
            raise UserError("give the dataset folder (ROOT), or both --s1 and --s2")
        root = s2.parent  # where metadata.parquet or the split lists lie beside the S2 folder
    elif not root.is_dir():
        raise MissingFileError(f"{root} is not a folder")
    if s2 is None:
        s2 = next((root / name for name in (V2_S2, V1_S2) if (root / name).is_dir()), root / V2_S2)
    if not s2.is_dir():
        raise MissingFileError(f"{s2}: no S2 folder ({V2_S2}/ of v2 or {V1_S2}/ of v1); give it with --s2")
    number = detect_version(s2) if version == "auto" else int(version)
    if s1 is None:
        s1 = root / (V2_S1 if number == 2 else V1_S1)
    if not s1.is_dir():
        raise MissingFileError(f"{s1}: no S1 folder; give it with --s1")
    return BenLayout(version=number, s1=s1, s2=s2, metadata=metadata or root / V2_METADATA,
                     lists=split_lists or root)


def _acquisition_time(patch_id: str) -> str | None:
    match = _ACQUISITION.search(patch_id)
    return "{}-{}-{}T{}:{}:{}".format(*match.groups()) if match else None


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path}: cannot be read as parquet ({err}); download it again") from None
    missing = [c for c in V2_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"{path}: columns {missing} are missing (it has {table.column_names}); expected the "
                        f"BigEarthNet v2 metadata")
    return table.to_pylist()


def list_v2(layout: BenLayout, *, by_split: bool, keep_cloudy: bool, classes: tuple[str, ...]) -> BenListing:
    """Patches of metadata.parquet (plus the snow/cloud parquet with ``keep_cloudy``) by split."""
    if not layout.metadata.is_file():
        raise MissingFileError(f"{layout.metadata}: no such file; BigEarthNet v2 needs its metadata.parquet "
                               f"(give it with --metadata)")
    rows = _read_parquet(layout.metadata)
    snow_cloud = layout.metadata.with_name(V2_SNOW_CLOUD)
    if snow_cloud.is_file():
        rows += [{**row, "_from_snow_cloud_list": True} for row in _read_parquet(snow_cloud)]
    elif keep_cloudy:
        raise MissingFileError(f"--keep-cloudy: {snow_cloud} not found; it comes with metadata.parquet in the "
                               f"BigEarthNet v2 download")
    listing, seen = BenListing(), set()
    known = set(classes)
    for row in rows:
        patch_id, split_value = str(row["patch_id"]), str(row["split"])
        if patch_id in seen:
            continue
        seen.add(patch_id)
        split = V2_SPLIT_NAMES.get(split_value)
        if split is None:
            raise UserError(f"{layout.metadata}: patch {patch_id} has split '{split_value}'; expected one of "
                            f"{list(V2_SPLIT_NAMES)}")
        labels = tuple(str(label) for label in (row["labels"] or ()))
        unknown = [label for label in labels if label not in known]
        if unknown:
            raise UserError(f"{layout.metadata}: patch {patch_id} has labels {unknown} outside the 19-class "
                            f"nomenclature {list(classes)}")
        key = split if by_split else "all"
        flagged = [reason for flag, reason in (("contains_seasonal_snow", SNOW), ("contains_cloud_or_shadow", CLOUD))
                   if row.get(flag)]
        if row.get("_from_snow_cloud_list") and not flagged:
            flagged = [CLOUD]  # listed among the snow/cloud/shadow patches without a flag: still one of them
        if flagged and not keep_cloudy:
            listing.skipped_in_split.setdefault(key, []).append((patch_id, flagged[0]))
            continue
        s1_name = str(row["s1_name"])
        listing.patches.setdefault(key, []).append(BenPatch(
            s1=layout.s1 / s1_name.rsplit("_", 3)[0] / s1_name, s2=layout.s2 / patch_id.rsplit("_", 2)[0] / patch_id,
            labels=labels, time=_acquisition_time(patch_id)))
    return listing


def _names(path: Path) -> list[list[str]]:
    """Rows of a headerless CSV of patch names (blank lines ignored)."""
    return [[part.strip() for part in line.split(",")] for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _v1_exclusions(layout: BenLayout) -> dict[str, str] | None:
    """S2 patch -> reason for the patches of the official snow and cloud lists; None without the lists."""
    lists = {name: layout.lists / name for name in (V1_SNOW_LIST, V1_CLOUD_LIST)}
    if not all(path.is_file() for path in lists.values()):
        return None
    excluded = {row[0]: CLOUD for row in _names(lists[V1_CLOUD_LIST])}
    excluded.update({row[0]: SNOW for row in _names(lists[V1_SNOW_LIST])})
    return excluded


def list_v1(layout: BenLayout, pairs: list[tuple[Path, Path]], unpaired: list[tuple[str, str]], *,
            by_split: bool, keep_cloudy: bool) -> BenListing:
    """v1 pairs (from the S1 metadata) by the official split lists, without the snow/cloud patches.

    ``unpaired`` (item, reason) from the pairing go to the split that lists them, else outside.
    The S1 column of the lists is not needed: the S1 metadata pairs the patches.
    """
    listing = BenListing()
    excluded = _v1_exclusions(layout)
    if excluded is None and not keep_cloudy:
        listing.notes.append(f"no {V1_SNOW_LIST} / {V1_CLOUD_LIST} in {layout.lists}: snow and cloud patches are "
                             f"NOT left out; put the official lists there (or give their folder with --split-lists)")
    excluded = {} if keep_cloudy else (excluded or {})
    split_of: dict[str, str] = {}
    if by_split:
        files = {split: layout.lists / name for split, name in V1_SPLIT_FILES.items()}
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            raise MissingFileError(f"--splits: {', '.join(missing)} not found; give the folder of BigEarthNet-MM's "
                                   f"train.csv, val.csv and test.csv with --split-lists DIR")
        split_of = {row[0]: split for split, path in files.items() for row in _names(path)}
    listed = set()
    for item, reason in unpaired:
        name = Path(item).name
        listed.add(name)
        split = split_of.get(name) if by_split else "all"
        (listing.skipped_in_split.setdefault(split, []) if split else listing.skipped_outside).append((item, reason))
    for s1, s2 in pairs:
        listed.add(s2.name)
        split = split_of.get(s2.name) if by_split else "all"
        if s2.name in excluded:
            target = listing.skipped_in_split.setdefault(split, []) if split else listing.skipped_outside
            target.append((str(s2), excluded[s2.name]))
        elif split is None:
            reason = "in none of the official lists train.csv, val.csv, test.csv"
            listing.skipped_outside.append((str(s2), reason))
        else:
            listing.patches.setdefault(split, []).append(BenPatch(s1=s1, s2=s2))
    for name, split in split_of.items():
        if name not in listed:
            listing.skipped_in_split.setdefault(split, []).append(
                (name, f"listed in {V1_SPLIT_FILES[split]} but no such S2 patch folder under {layout.s2}"))
    return listing

