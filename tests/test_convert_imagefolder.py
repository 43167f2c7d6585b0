"""imagefolder converter and the shared conversion driver (workers, sharding, re-runs, skip report)."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from fixtures.imagefolder import write_imagefolder

from msgfm.data.convert import run as convert
from msgfm.data.format import read_shard_info


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "millionaid"
    return root, write_imagefolder(root)


def _all_samples(out: Path, prefix: str = "images") -> dict[str, np.ndarray]:
    samples = {}
    for shard in sorted(out.glob(f"{prefix}-*.h5")):
        with h5py.File(shard) as f:
            samples.update({raw.decode(): f["rgb"][i] for i, raw in enumerate(f["ids"][:])})
    return samples


def test_converts_good_images_and_reports_bad_ones(images, tmp_path: Path) -> None:
    root, good = images
    out = tmp_path / "out"
    assert convert(["imagefolder", str(root), "--size", "64", "-o", str(out), "--workers", "1"]) == 0
    samples = _all_samples(out)
    assert sorted(samples) == sorted([*good, "train/water_area/lake/P0000003", "test/P0000004"])
    square = "train/agriculture_land/arable_land/dry_field/P0000001"
    np.testing.assert_array_equal(samples[square], good[square].transpose(2, 0, 1))  # already 64: unchanged
    wide = "train/water_area/lake/P0000002"  # 64 x 128: shorter side is 64, so only the centre crop
    np.testing.assert_array_equal(samples[wide], good[wide][:, 32:96].transpose(2, 0, 1))
    gray = samples["train/water_area/lake/P0000003"]
    assert gray.shape == (3, 64, 64) and (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()
    report = json.loads((out / "images.skipped.json").read_text())
    reasons = {Path(e["item"]).name: e["reason"] for e in report["skipped"]}
    assert set(reasons) == {"P0000005.jpg", "P0000006.jpg", "P0000007.png"}
    assert "unreadable" in reasons["P0000005.jpg"] and "unreadable" in reasons["P0000006.jpg"]
    assert "mode I;16" in reasons["P0000007.png"]


def test_same_output_for_any_worker_count_and_sharding(images, tmp_path: Path) -> None:
    root, _ = images
    convert(["imagefolder", str(root), "--size", "48", "-o", str(tmp_path / "a"), "--workers", "1"])
    convert(["imagefolder", str(root), "--size", "48", "-o", str(tmp_path / "b"), "--workers", "2",
             "--samples-per-shard", "3", "--compression", "none"])
    assert [p.name for p in sorted((tmp_path / "b").glob("*.h5"))] == ["images-00000.h5", "images-00001.h5"]
    assert read_shard_info(tmp_path / "b" / "images-00001.h5").num_samples == 1
    a, b = _all_samples(tmp_path / "a"), _all_samples(tmp_path / "b")
    assert list(a) == list(b)  # same order
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_rerun_replaces_shards_and_removes_stale_ones(images, tmp_path: Path) -> None:
    root, _ = images
    out = tmp_path / "out"
    convert(["imagefolder", str(root), "--size", "32", "-o", str(out), "--samples-per-shard", "1", "--workers", "1"])
    assert len(list(out.glob("images-*.h5"))) == 4
    convert(["imagefolder", str(root), "--size", "32", "-o", str(out), "--workers", "1"])
    assert sorted(p.name for p in out.iterdir()) == ["images-00000.h5", "images.skipped.json"]
    assert read_shard_info(out / "images-00000.h5").num_samples == 4


def test_nothing_readable_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no sample could be converted"):
        convert(["imagefolder", str(root), "-o", str(tmp_path / "out"), "--workers", "1"])
    assert not list((tmp_path / "out").glob("*.h5"))


def test_msgfm_cli_runs_converters_and_reports_user_errors(images, tmp_path: Path, capsys) -> None:
    from msgfm.cli import main

    root, _ = images
    assert main(["convert", "imagefolder", str(root), "--size", "32", "-o", str(tmp_path / "out"),
                 "--workers", "1"]) == 0
    assert read_shard_info(tmp_path / "out" / "images-00000.h5").num_samples == 4
    assert main(["convert", "imagefolder", str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 2
    assert "missing is not a folder of images" in capsys.readouterr().err
