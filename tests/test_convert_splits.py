"""Official splits of the downstream converters, one shard folder per split as the fine-tuning
configs read them: SEN12MS-CR's scene lists and Vaihingen's ISPRS train/test areas (fixtures in the
real layouts), and the split runner's bookkeeping."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from fixtures.make_sen12mscr import PATCH_WITHOUT_CLOUDY, PATCHES, ROI, write_sen12mscr
from fixtures.make_vaihingen import AREA_WITHOUT_DSM, write_vaihingen

from msgfm.config import load_finetune_config
from msgfm.data.convert import run as convert
from msgfm.data.convert.common import LoadResult, Sample, SkipItem, run_splits_from_args
from msgfm.data.convert.sen12mscr import OFFICIAL_SPLITS
from msgfm.data.format import SensorArraySpec
from msgfm.finetune.data import split_paths


def _ids(shard: Path) -> list[str]:
    with h5py.File(shard) as f:
        return [raw.decode() for raw in f["ids"][:]]


def _report(path: Path) -> dict[str, str]:
    return {Path(e["item"]).name: e["reason"] for e in json.loads(path.read_text())["skipped"]}


def test_sen12mscr_official_splits(tmp_path: Path) -> None:
    train_scene, val_scene, test_scene, no_scene = 1, 17, 106, 2
    assert train_scene in OFFICIAL_SPLITS["train"][ROI] and val_scene in OFFICIAL_SPLITS["val"][ROI]
    assert test_scene in OFFICIAL_SPLITS["test"][ROI]
    assert all(no_scene not in scenes[ROI] for scenes in OFFICIAL_SPLITS.values())
    write_sen12mscr(tmp_path / "cr", size=16, scenes=(train_scene, val_scene, test_scene, no_scene))
    out = tmp_path / "out"
    assert convert(["sen12mscr", str(tmp_path / "cr"), "--splits", "-o", str(out), "--workers", "1"]) == 0
    for split, scene in (("train", train_scene), ("val", val_scene), ("test", test_scene)):
        assert _ids(out / split / "sen12mscr-00000.h5") == [f"{ROI}_{scene}_p{p}" for p in PATCHES]
    # the patch without a cloudy partner is reported in its scene's split; the unlisted scene outside
    assert "no partner" in _report(out / "train" / "sen12mscr.skipped.json")[
        f"{ROI}_s1_{train_scene}_p{PATCH_WITHOUT_CLOUDY}.tif"]
    outside = _report(out / "sen12mscr.skipped.json")
    assert len(outside) == len(PATCHES) and all("none of the official SEN12MS-CR splits" in r for r in outside.values())
    cfg = load_finetune_config("ft_sen12mscr", [f"data.root={out}"])
    assert [p.name for p in split_paths(cfg, out, "val")] == ["sen12mscr-00000.h5"]


def test_official_split_lists_are_disjoint() -> None:
    seen: dict[tuple[str, int], str] = {}
    for split, rois in OFFICIAL_SPLITS.items():
        for roi, scenes in rois.items():
            for scene in scenes:
                assert (roi, scene) not in seen, f"{roi} s1_{scene} in {seen[(roi, scene)]} and {split}"
                seen[(roi, scene)] = split
    assert sum(s == "test" for s in seen.values()) == 10 and sum(s == "val" for s in seen.values()) == 10


def test_vaihingen_isprs_areas(tmp_path: Path) -> None:
    expected = write_vaihingen(tmp_path / "v", height=40, width=50, areas=(1, 3, 2))  # 1, 3 train; 2 test
    out = tmp_path / "out"
    assert convert(["vaihingen", str(tmp_path / "v"), "--splits", "--size", "32", "--stride", "16",
                    "--test-labels", "eroded", "-o", str(out), "--workers", "1"]) == 0
    train, test = _ids(out / "train" / "vaihingen-00000.h5"), _ids(out / "test" / "vaihingen-00000.h5")
    assert {i.split("_")[0] for i in train} == {"area1", "area3"} and {i.split("_")[0] for i in test} == {"area2"}
    # train overlaps (stride 16: 40x50 padded to 48x64 -> 2 x 3 tiles); test does not (64x64 -> 2 x 2)
    assert sum(i.startswith("area1_") for i in train) == 6 and len(test) == 4
    with h5py.File(out / "test" / "vaihingen-00000.h5") as f:
        labels = np.full((64, 64), 255, np.uint8)
        for i, tile_id in enumerate(test):
            r, c = (int(part[1:]) for part in tile_id.split("_")[1:])
            labels[r:r + 32, c:c + 32] = f["labels/segmentation"][i]
    boundary = labels[:40, :50] == 255  # eroded references: boundaries ignored, the rest as drawn
    assert boundary.any() and (labels[:40, :50][~boundary] == expected[2][~boundary]).all()
    assert f"area{AREA_WITHOUT_DSM}" in _report(out / "train" / "vaihingen.skipped.json")
    cfg = load_finetune_config("ft_vaihingen", [f"data.root={out}"])
    assert split_paths(cfg, out, "val") == split_paths(cfg, out, "test") == [out / "test" / "vaihingen-00000.h5"]
    with pytest.raises(ValueError, match="--splits converts the ISPRS train and test areas; leave out --areas"):
        convert(["vaihingen", str(tmp_path / "v"), "--splits", "--areas", "1", "-o", str(out)])


def _load(item: int) -> LoadResult:
    if item < 0:
        raise SkipItem("negative: not a sample")
    return LoadResult(samples=[Sample(sample_id=f"s{item}", images={"dsm": np.full((1, 4, 4), item, np.float32)})])


def test_split_runner_reports_and_clears_an_empty_split(tmp_path: Path) -> None:
    args = argparse.Namespace(output=tmp_path, prefix="p", workers=1, samples_per_shard=2, compression="none")
    common = dict(load=_load, group="g", sensors={"dsm": SensorArraySpec(dtype="float32", channels=1, height=4,
                                                                         width=4)}, description="test")
    run_splits_from_args(args, splits={"train": [1, 2, 3], "test": [4]}, **common)
    assert sorted(p.name for p in (tmp_path / "train").glob("*.h5")) == ["p-00000.h5", "p-00001.h5"]
    # a second run in which test has nothing left: its old shard goes, the report says so
    run_splits_from_args(args, splits={"train": [1, -1]}, skipped_in_split={"test": [("x", "gone: for a test")]},
                         skipped_outside=[("y", "in no split: for a test")], **common)
    assert not list((tmp_path / "test").glob("*.h5")) and _ids(tmp_path / "train" / "p-00000.h5") == ["s1"]
    assert not (tmp_path / "train" / "p-00001.h5").exists()
    summary = json.loads((tmp_path / "p.skipped.json").read_text())
    assert summary["splits"]["test"] == {"samples": 0, "shards": [], "skipped": 1}
    assert summary["splits"]["train"]["skipped"] == 1 and summary["skipped"][0]["item"] == "y"
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['validation'\]"):
        run_splits_from_args(args, splits={"validation": [1]}, **common)
