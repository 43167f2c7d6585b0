"""BigEarthNet v1 round trip on real data: the example archives of the registry package
bigearthnet-common (downloaded once with pip) go in; ../shared/realdata/bigearthnet_mm_v1 is
the independent expected answer (GeoTIFF values, S1/S2 pairing, 19-class labels)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio

from msgfm.data.convert import run as convert
from msgfm.data.convert.bigearthnet import BEN19_CLASSES, BEN19_FROM_CLC43, CLC43_WITHOUT_BEN19, ben19_vector
from msgfm.data.fetch import FetchError, bigearthnet_examples
from msgfm.data.format import read_shard_info
from msgfm.sensors import S2_NATIVE_GSD_M, get_sensor

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="session")
def ben_examples() -> tuple[Path, Path]:
    try:
        return bigearthnet_examples()
    except FetchError as err:
        pytest.skip(f"cannot download bigearthnet-common with pip: {err}")


@pytest.fixture(scope="session")
def ben_shard(ben_examples, tmp_path_factory) -> Path:
    s1, s2 = ben_examples
    out = tmp_path_factory.mktemp("ben")
    assert convert(["bigearthnet", "--s1", str(s1), "--s2", str(s2), "-o", str(out), "--workers", "2",
                 "--samples-per-shard", "4", "--compression", "gzip"]) == 0
    return out


def test_mapping_covers_43_labels() -> None:
    merged = [clc for group in BEN19_FROM_CLC43.values() for clc in group]
    assert len(BEN19_CLASSES) == 19 and len(merged) == len(set(merged)) == 32
    assert len(set(merged) | CLC43_WITHOUT_BEN19) == 43
    with pytest.raises(ValueError, match="not one of the 43"):
        ben19_vector(["Glaciers and perpetual snow"], "x.json")


def test_round_trip_matches_geotiffs_and_expected_labels(ben_shard: Path, realdata: Path) -> None:
    expected = json.loads((realdata / "bigearthnet_mm_v1" / "pairs_and_labels.json").read_text())
    s2_root = realdata / "bigearthnet_mm_v1" / "BigEarthNet-S2-Example"
    s1_root = realdata / "bigearthnet_mm_v1" / "BigEarthNet-S1-Example"
    shards = sorted(ben_shard.glob("bigearthnet-*.h5"))
    assert [p.name for p in shards] == ["bigearthnet-00000.h5", "bigearthnet-00001.h5"]  # 6 samples, 4 per shard
    bands = get_sensor("s2").bands
    seen = set()
    for shard in shards:
        info = read_shard_info(shard)
        assert set(info.sensors) == {"sar", "s2"} and info.sensors["s2"].dtype == np.uint16
        assert info.labels["multilabel"].attrs["class_names"] == list(BEN19_CLASSES)
        with h5py.File(shard) as f:
            for i, raw_id in enumerate(f["ids"][:]):
                s2_name = raw_id.decode()
                seen.add(s2_name)
                for c, band in enumerate(bands):
                    if S2_NATIVE_GSD_M[band] == 10:  # 10 m bands are copied exactly
                        with rasterio.open(s2_root / s2_name / f"{s2_name}_{band}.tif") as src:
                            np.testing.assert_array_equal(f["s2"][i, c], src.read(1), err_msg=f"{s2_name} {band}")
                s1_name = expected[s2_name]["s1_patch"]
                for c, pol in enumerate(("VV", "VH")):
                    with rasterio.open(s1_root / s1_name / f"{s1_name}_{pol}.tif") as src:
                        np.testing.assert_array_equal(f["sar"][i, c], src.read(1), err_msg=f"{s1_name} {pol}")
                names = {BEN19_CLASSES[k] for k in np.flatnonzero(f["labels/multilabel"][i])}
                assert names == set(expected[s2_name]["labels_ben19"]), s2_name
                assert f["time"][i].decode().startswith(expected[s2_name]["s2_time"][:10])
    assert seen == set(expected)
    report = json.loads((ben_shard / "bigearthnet.skipped.json").read_text())
    assert report["samples_written"] == 6 and report["skipped"] == []


def _bilinear_reference(native_HW: np.ndarray, factor: int, size: int = 120) -> np.ndarray:
    """Plain-numpy bilinear upsampling on pixel centres, edges clamped: the independent expected answer."""
    u = np.clip((np.arange(size) + 0.5) / factor - 0.5, 0, native_HW.shape[0] - 1)
    i0 = np.floor(u).astype(int)
    i1 = np.minimum(i0 + 1, native_HW.shape[0] - 1)
    w = u - i0
    rows = native_HW[i0] * (1 - w)[:, None] + native_HW[i1] * w[:, None]
    return rows[:, i0] * (1 - w)[None, :] + rows[:, i1] * w[None, :]


def test_coarse_bands_resampled_bilinear_onto_10m_grid(ben_shard: Path, realdata: Path) -> None:
    s2_root = realdata / "bigearthnet_mm_v1" / "BigEarthNet-S2-Example"
    bands = get_sensor("s2").bands
    with h5py.File(ben_shard / "bigearthnet-00000.h5") as f:
        s2_name = f["ids"][0].decode()
        for band in ("B05", "B11", "B01", "B09"):
            with rasterio.open(s2_root / s2_name / f"{s2_name}_{band}.tif") as src:
                native = src.read(1).astype(float)
            expected = _bilinear_reference(native, S2_NATIVE_GSD_M[band] // 10)
            got = f["s2"][0, bands.index(band)].astype(float)
            np.testing.assert_allclose(got, expected, atol=0.5 + 1e-6, err_msg=band)  # uint16 rounding


def test_unpaired_and_broken_patches_are_reported(ben_examples, tmp_path: Path) -> None:
    s1_src, s2_src = ben_examples
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    shutil.copytree(s1_src, s1)
    shutil.copytree(s2_src, s2)
    s1_folders = sorted(p for p in s1.iterdir())
    shutil.rmtree(s1_folders[0])  # its S2 patch loses its partner
    broken = sorted(p for p in s2.iterdir())[-1]
    (broken / f"{broken.name}_B8A.tif").write_bytes(b"corrupt")
    out = tmp_path / "out"
    assert convert(["bigearthnet", "--s1", str(s1), "--s2", str(s2), "-o", str(out), "--workers", "1"]) == 0
    report = json.loads((out / "bigearthnet.skipped.json").read_text())
    reasons = {Path(entry["item"]).name if "no S1" in entry["reason"] else "broken": entry["reason"]
               for entry in report["skipped"]}
    assert report["samples_written"] == 4 and len(report["skipped"]) == 2
    assert any("no S1 patch names this S2 patch" in r for r in reasons.values())
    assert any("unreadable" in r and "B8A" in r for r in reasons.values())
