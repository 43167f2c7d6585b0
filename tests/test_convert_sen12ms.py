"""SEN12MS converter on a fixture in the real layout (tests/fixtures/sen12ms.py)."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
from fixtures.sen12ms import write_sen12ms
from rasterio.transform import from_origin

from msgfm.data.convert import run as convert
from msgfm.data.format import read_shard_info
from msgfm.sensors import get_sensor


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, list[tuple[Path, Path]]]:
    root = tmp_path / "sen12ms"
    return root, write_sen12ms(root, size=32)


def test_pairs_and_drops_b10_by_name(tree, tmp_path: Path) -> None:
    root, pairs = tree
    out = tmp_path / "out"
    assert convert(["sen12ms", str(root), "-o", str(out), "--workers", "2"]) == 0
    info = read_shard_info(out / "sen12ms-00000.h5")
    assert info.group == "sen12ms" and info.num_samples == 3 and info.has_latlon
    assert info.sensors["s2"].shape == (3, 12, 32, 32) and info.sensors["s2"].scale == pytest.approx(1e-4)
    keep = [i for i, band in enumerate(get_sensor("s2_l1c").bands) if band != "B10"]
    with h5py.File(out / "sen12ms-00000.h5") as f:
        ids = [s.decode() for s in f["ids"][:]]
        assert ids == ["ROIs1158_spring_1_p30", "ROIs1158_spring_1_p31", "ROIs1868_summer_73_p5"]
        for i, (s1_path, s2_path) in enumerate(pairs):
            with rasterio.open(s1_path) as s1, rasterio.open(s2_path) as s2:
                np.testing.assert_array_equal(f["sar"][i], s1.read())
                np.testing.assert_array_equal(f["s2"][i], s2.read()[keep])
        # patch p30 of ROI 1158 (UTM 31N) is centred 9,760 m east of the central meridian (3 deg E), at 44.2 deg N
        assert abs(f["lon"][0] - (3 + 9760 / (111_320 * np.cos(np.radians(44.24))))) < 0.003
        assert 44.1 < f["lat"][0] < 44.4
    report = json.loads((out / "sen12ms.skipped.json").read_text())
    assert [Path(e["item"]).name for e in report["skipped"]] == ["ROIs1158_spring_s1_1_p99.tif"]
    assert "no S2 partner" in report["skipped"][0]["reason"]


def test_keeps_13_bands_as_s2_l1c(tree, tmp_path: Path) -> None:
    root, pairs = tree
    out = tmp_path / "out"
    convert(["sen12ms", str(root), "-o", str(out), "--s2-sensor", "s2_l1c", "--workers", "1"])
    with h5py.File(out / "sen12ms-00000.h5") as f, rasterio.open(pairs[0][1]) as s2:
        assert list(f.attrs["sensors"]) == ["sar", "s2_l1c"]
        np.testing.assert_array_equal(f["s2_l1c"][0], s2.read())


def test_misregistered_pair_is_skipped(tree, tmp_path: Path) -> None:
    root, pairs = tree
    s2_path = pairs[1][1]
    with rasterio.open(s2_path) as src:
        data, profile = src.read(), src.profile
    profile["transform"] = from_origin(0.0, 0.0, 10.0, 10.0)
    with rasterio.open(s2_path, "w", **profile) as dst:
        dst.write(data)
    out = tmp_path / "out"
    convert(["sen12ms", str(root), "-o", str(out), "--workers", "1"])
    assert read_shard_info(out / "sen12ms-00000.h5").num_samples == 2
    reasons = [e["reason"] for e in json.loads((out / "sen12ms.skipped.json").read_text())["skipped"]]
    assert any("not on the same grid" in r for r in reasons)


def test_no_pairs_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no SEN12MS pair found"):
        convert(["sen12ms", str(tmp_path / "empty"), "-o", str(tmp_path / "out")])


def test_roi_folders_behind_symbolic_links_are_found_and_loops_reported(tree, tmp_path: Path) -> None:
    """A data folder of links to ROI folders on other disks: the pairs behind them are converted (a
    ``**`` glob does not enter linked folders, so they used to be missed without a word)."""
    from msgfm.data.convert.sen12ms import find_pairs

    root, _ = tree
    direct, _ = find_pairs(root)
    linked = tmp_path / "linked"
    linked.mkdir()
    for roi in sorted(p for p in root.iterdir() if p.is_dir()):
        (linked / roi.name).symlink_to(roi, target_is_directory=True)
    (linked / "again").symlink_to(linked, target_is_directory=True)
    pairs, skipped = find_pairs(linked)
    assert [(s1.name, s2.name) for s1, s2 in pairs] == [(s1.name, s2.name) for s1, s2 in direct] and len(pairs) == 3
    assert any(item.endswith("again") and reason.startswith("symbolic link loop") for item, reason in skipped)
