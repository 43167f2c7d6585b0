"""BigEarthNet v2 (reBEN) and the official splits: a v2 tree in the real layout (written from the
real v1 GeoTIFFs by tests/fixtures/make_bigearthnet_v2.py) and the v1 example with split lists in
BigEarthNet-MM's format. The expected labels come from ../shared/realdata's pairs_and_labels.json."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
from fixtures.make_bigearthnet_v2 import ASSIGNMENT, MISSING_PATCH, V2Patch, write_bigearthnet_v2

from msgfm.config import load_finetune_config
from msgfm.data.convert import run as convert
from msgfm.data.convert.bigearthnet import BEN19_CLASSES
from msgfm.data.convert.bigearthnet_index import detect_version
from msgfm.data.format import read_shard_info
from msgfm.data.georef import read_georef
from msgfm.data.stats import write_stats
from msgfm.finetune.data import TaskDataset, split_paths, task_stats

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def ben_v2(tmp_path_factory) -> tuple[Path, dict[str, V2Patch]]:
    source = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "bigearthnet_mm_v1"
    if not source.is_dir():
        pytest.skip(f"real sample data not found at {source}")
    root = tmp_path_factory.mktemp("ben_v2")
    return root, write_bigearthnet_v2(source, root)


def _samples(shard: Path) -> dict[str, dict]:
    with h5py.File(shard) as f:
        return {raw.decode(): {"labels": {BEN19_CLASSES[k] for k in np.flatnonzero(f["labels/multilabel"][i])},
                               "s2": f["s2"][i], "sar": f["sar"][i], "time": f["time"][i].decode(),
                               "georef": read_georef(f, i)}
                for i, raw in enumerate(f["ids"][:])}


def _reasons(report: Path) -> dict[str, str]:
    return {Path(e["item"]).name: e["reason"] for e in json.loads(report.read_text())["skipped"]}


def test_v2_official_splits_without_cloudy_patches(ben_v2, tmp_path: Path) -> None:
    root, patches = ben_v2
    assert detect_version(root / "BigEarthNet-S2") == 2
    out = tmp_path / "out"
    assert convert(["bigearthnet", str(root), "--splits", "-o", str(out), "--workers", "1"]) == 0
    expected = {"train": set(), "val": set(), "test": set()}
    for patch in patches.values():
        if not (patch.snow or patch.cloud):
            expected[{"validation": "val"}.get(patch.split, patch.split)].add(patch.patch_id)
    for split, ids in expected.items():
        samples = _samples(out / split / "bigearthnet-00000.h5")
        assert set(samples) == ids, split
        for patch_id, sample in samples.items():
            patch = patches[patch_id]
            assert sample["labels"] == set(patch.labels)
            s2_dir = root / "BigEarthNet-S2" / patch_id.rsplit("_", 2)[0] / patch_id
            with rasterio.open(s2_dir / f"{patch_id}_B04.tif") as src:
                np.testing.assert_array_equal(sample["s2"][3], src.read(1))
                assert sample["georef"].affine == src.transform
            s1_dir = root / "BigEarthNet-S1" / patch.s1_name.rsplit("_", 3)[0] / patch.s1_name
            with rasterio.open(s1_dir / f"{patch.s1_name}_VH.tif") as src:
                assert sample["sar"].dtype == np.float32
                np.testing.assert_array_equal(sample["sar"][1], src.read(1))
    assert _samples(out / "train" / "bigearthnet-00000.h5")[
        "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_87_48"]["time"] == "2017-06-13T10:10:31"
    # what was left out, and why, in the split it belongs to
    train = _reasons(out / "train" / "bigearthnet.skipped.json")
    cloudy = next(p.patch_id for p in patches.values() if p.cloud)
    snowy = next(p.patch_id for p in patches.values() if p.snow)
    assert train[cloudy].startswith("cloud or shadow") and "--keep-cloudy" in train[cloudy]
    assert train[MISSING_PATCH].startswith("S2 patch folder missing")
    assert _reasons(out / "test" / "bigearthnet.skipped.json")[snowy].startswith("seasonal snow")
    summary = json.loads((out / "bigearthnet.skipped.json").read_text())
    assert {s: v["samples"] for s, v in summary["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    assert summary["splits"]["train"]["shards"] == ["train/bigearthnet-00000.h5"]


def test_v2_keep_cloudy(ben_v2, tmp_path: Path) -> None:
    root, patches = ben_v2
    out = tmp_path / "out"
    convert(["bigearthnet", "--s1", str(root / "BigEarthNet-S1"), "--s2", str(root / "BigEarthNet-S2"), "--splits",
             "--keep-cloudy", "-o", str(out), "--workers", "1"])
    assert read_shard_info(out / "train" / "bigearthnet-00000.h5").num_samples == 3
    test = _samples(out / "test" / "bigearthnet-00000.h5")
    snowy = next(p for p in patches.values() if p.snow)
    assert snowy.patch_id in test and test[snowy.patch_id]["labels"] == set(snowy.labels)


def test_v2_without_splits_writes_one_folder(ben_v2, tmp_path: Path) -> None:
    root, _ = ben_v2
    out = tmp_path / "out"
    convert(["bigearthnet", str(root), "-o", str(out), "--workers", "1"])
    assert read_shard_info(out / "bigearthnet-00000.h5").num_samples == 4
    assert len(_reasons(out / "bigearthnet.skipped.json")) == 3  # cloudy, snowy, missing


def test_fine_tuning_reads_the_split_folders(ben_v2, tmp_path: Path) -> None:
    """docs/finetune.md's workflow: convert --splits, stats on train/, then the ft_ben config's splits."""
    root, patches = ben_v2
    out = tmp_path / "ben"
    convert(["bigearthnet", str(root), "--splits", "-o", str(out), "--workers", "1"])
    write_stats(sorted((out / "train").glob("*.h5")), progress=False)
    cfg = load_finetune_config("ft_ben", [f"data.root={out}"])
    stats = task_stats(cfg, out)
    for split, count in (("train", 2), ("val", 1), ("test", 1)):
        dataset = TaskDataset(split_paths(cfg, out, split), cfg.task, stats, train=False)
        assert len(dataset) == count
        sample = dataset[0]
        names = {BEN19_CLASSES[k] for k in np.flatnonzero(sample["target"].numpy())}
        assert names == set(patches[sample["id"]].labels)


def _bad_parquet(root: Path, tmp_path: Path, **changes) -> Path:
    table = pq.read_table(root / "metadata.parquet")
    for column, values in changes.items():
        table = table.set_column(table.column_names.index(column), column, pa.array(values, type=table[column].type))
    path = tmp_path / "metadata.parquet"
    pq.write_table(table, path)
    return path


def test_v2_metadata_errors_name_the_file_and_patch(ben_v2, tmp_path: Path) -> None:
    root, _ = ben_v2
    rows = pq.read_table(root / "metadata.parquet").num_rows
    args = ["bigearthnet", str(root), "--splits", "-o", str(tmp_path / "o"), "--metadata"]
    bad = _bad_parquet(root, tmp_path, labels=[["Non-irrigated arable land"]] + [["Pastures"]] * (rows - 1))
    with pytest.raises(ValueError, match=r"metadata.parquet: patch S2A_.*_87_48 has labels \['Non-irrigated arable "
                                         r"land'\] outside the 19-class nomenclature"):
        convert([*args, str(bad)])
    bad = _bad_parquet(root, tmp_path, split=["training"] * rows)
    with pytest.raises(ValueError, match=r"has split 'training'; expected one of \['train', 'validation', 'test'\]"):
        convert([*args, str(bad)])
    with pytest.raises(FileNotFoundError, match=r"nowhere.parquet: no such file; BigEarthNet v2 needs"):
        convert([*args, str(tmp_path / "nowhere.parquet")])
    with pytest.raises(FileNotFoundError, match="--keep-cloudy: .*metadata_for_patches_with_snow_cloud_or_shadow"):
        convert([*args, str(bad), "--keep-cloudy"])  # no snow/cloud parquet beside this one
    assert not (tmp_path / "o").exists()


def test_v1_official_split_lists(realdata: Path, tmp_path: Path) -> None:
    v1 = realdata / "bigearthnet_mm_v1"
    expected = json.loads((v1 / "pairs_and_labels.json").read_text())
    names = sorted(ASSIGNMENT)
    lists = tmp_path / "lists"
    lists.mkdir()
    # BigEarthNet-MM's format: "S2 patch,S1 patch" per line, no header; the official lists leave out the
    # patches of patches_with_cloud_and_shadow.csv / patches_with_seasonal_snow.csv
    split_of = {names[0]: "train", names[1]: "train", names[2]: "val", names[3]: "test", names[4]: "train"}
    for split in ("train", "val", "test"):
        rows = [f"{n},{expected[n]['s1_patch']}" for n, s in split_of.items() if s == split]
        if split == "test":
            rows.append("S2A_MSIL2A_20170613T101031_1_1,S1A_IW_GRDH_1SDV_20170613T165043_33UUP_1_1")
        (lists / f"{split}.csv").write_text("\n".join(rows) + "\n")
    (lists / "patches_with_cloud_and_shadow.csv").write_text(f"{names[5]}\n")
    (lists / "patches_with_seasonal_snow.csv").write_text(f"{names[4]}\n")  # listed in train.csv, yet snowy
    out = tmp_path / "out"
    convert(["bigearthnet", "--s1", str(v1 / "BigEarthNet-S1-Example"), "--s2", str(v1 / "BigEarthNet-S2-Example"),
             "--splits", "--split-lists", str(lists), "-o", str(out), "--workers", "1"])
    assert set(_samples(out / "train" / "bigearthnet-00000.h5")) == {names[0], names[1]}
    val = _samples(out / "val" / "bigearthnet-00000.h5")
    assert set(val) == {names[2]} and val[names[2]]["labels"] == set(expected[names[2]]["labels_ben19"])
    assert set(_samples(out / "test" / "bigearthnet-00000.h5")) == {names[3]}
    assert _reasons(out / "train" / "bigearthnet.skipped.json")[names[4]].startswith("seasonal snow")
    assert "no such S2 patch folder" in _reasons(out / "test" / "bigearthnet.skipped.json")[
        "S2A_MSIL2A_20170613T101031_1_1"]
    outside = _reasons(out / "bigearthnet.skipped.json")
    assert outside[names[5]].startswith("cloud or shadow")
    with pytest.raises(FileNotFoundError, match=r"--splits: .*train.csv.* not found; .*--split-lists DIR"):
        convert(["bigearthnet", "--s1", str(v1 / "BigEarthNet-S1-Example"), "--s2",
                 str(v1 / "BigEarthNet-S2-Example"), "--splits", "-o", str(tmp_path / "o")])


def test_v2_unreadable_metadata_is_one_line(ben_v2, tmp_path: Path) -> None:
    root, _ = ben_v2
    (tmp_path / "metadata.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match=r"metadata.parquet: cannot be read as parquet .*download it again"):
        convert(["bigearthnet", str(root), "--metadata", str(tmp_path / "metadata.parquet"), "-o", str(tmp_path / "o")])
