"""The shard format (v2, reads v1): writer round trip, georeference, atomic writes, and every bad input
read_shard_info must name."""
from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from msgfm.data.format import (
    FORMAT_VERSION,
    LabelSpec,
    SensorArraySpec,
    ShardError,
    ShardWriter,
    multilabel_spec,
    read_shard_info,
    segmentation_spec,
)
from msgfm.data.georef import Georef, read_georef
from msgfm.sensors import get_sensor

H = W = 8


def _specs() -> dict[str, SensorArraySpec]:
    return {"sar": SensorArraySpec(dtype="float32", channels=2, height=H, width=W, nodata=-99.0),
            "s2": SensorArraySpec(dtype="uint16", channels=12, height=H, width=W, scale=1e-4)}


def _sample(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"sar": rng.normal(-15, 3, (2, H, W)).astype("float32"),
            "s2": rng.integers(0, 10000, (12, H, W), dtype="uint16")}


def _write(path: Path, n: int = 3, **kwargs) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    samples = [_sample(rng) for _ in range(n)]
    classes = ["a", "b", "c"]
    with ShardWriter(path, "sen12ms", _specs(), labels=[multilabel_spec(classes),
                                                       segmentation_spec(classes, H, W)], **kwargs) as writer:
        for i, images in enumerate(samples):
            writer.append(images, f"id-{i}", labels={"multilabel": np.array([1, 0, i % 2], "u1"),
                                                     "segmentation": np.full((H, W), i, "u1")},
                          lat=45.0 + i, lon=None if i == 1 else 7.0, time=f"2017-06-1{i}T10:00:00")
    return samples


@pytest.mark.parametrize("compression", [None, "lzf", "gzip"])
def test_round_trip(tmp_path: Path, compression: str | None) -> None:
    path = tmp_path / "a.h5"
    samples = _write(path, compression=compression)
    info = read_shard_info(path)
    assert info.format_version == FORMAT_VERSION and info.group == "sen12ms"
    assert info.num_samples == 3 and list(info.sensors) == ["sar", "s2"]
    assert info.sensors["s2"].dtype == np.uint16 and info.sensors["s2"].shape == (3, 12, H, W)
    assert info.sensors["s2"].bands == get_sensor("s2").bands
    assert info.sensors["s2"].scale == pytest.approx(1e-4) and info.sensors["s2"].nodata is None
    assert info.sensors["sar"].nodata == -99.0 and math.isnan(info.sensors["sar"].wavelengths_nm[0])
    assert info.sensors["s2"].compression == compression
    assert info.has_ids and info.has_latlon and info.has_time and info.has_labels
    assert info.labels["multilabel"].attrs["class_names"] == ["a", "b", "c"]
    assert info.labels["segmentation"].attrs["ignore_index"] == 255
    with h5py.File(path) as f:
        assert f["s2"].chunks == (1, 12, H, W)
        for i, images in enumerate(samples):
            np.testing.assert_array_equal(f["s2"][i], images["s2"])
            np.testing.assert_array_equal(f["sar"][i], images["sar"])
        assert [s.decode() for s in f["ids"][:]] == ["id-0", "id-1", "id-2"]
        assert np.isnan(f["lon"][1]) and f["lat"][2] == 47.0
        np.testing.assert_array_equal(f["labels/multilabel"][:, 2], [0, 1, 0])
        assert f["labels/segmentation"].shape == (3, H, W)


def test_grows_past_block_and_trims(tmp_path: Path) -> None:
    path = tmp_path / "big.h5"
    spec = {"dsm": SensorArraySpec(dtype="float32", channels=1, height=4, width=4)}
    with ShardWriter(path, "mdas", spec) as writer:
        for i in range(70):
            writer.append({"dsm": np.full((1, 4, 4), i, "f4")}, f"t{i}")
    info = read_shard_info(path)
    assert info.num_samples == 70 and not info.has_latlon and not info.has_time and not info.has_labels
    with h5py.File(path) as f:
        assert f["dsm"][69, 0, 0, 0] == 69


def test_crash_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "crash.h5"
    with pytest.raises(RuntimeError):
        with ShardWriter(path, "sen12ms", _specs()) as writer:
            writer.append(_sample(np.random.default_rng(0)), "x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_crash_keeps_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    _write(path, n=2)
    with pytest.raises(RuntimeError):
        with ShardWriter(path, "sen12ms", _specs()):
            raise RuntimeError("boom")
    assert read_shard_info(path).num_samples == 2


def test_writer_rejects_bad_samples(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="12 bands"):
        ShardWriter(tmp_path / "x.h5", "g", {"s2": SensorArraySpec(dtype="uint16", channels=13, height=4, width=4)})
    with pytest.raises(ValueError, match="share H x W"):
        ShardWriter(tmp_path / "x.h5", "g", {"sar": SensorArraySpec(dtype="float32", channels=2, height=4, width=4),
                                            "dsm": SensorArraySpec(dtype="float32", channels=1, height=5, width=4)})
    with pytest.raises(ValueError, match="not supported"):
        SensorArraySpec(dtype="int64", channels=1, height=4, width=4)
    writer = ShardWriter(tmp_path / "x.h5", "sen12ms", _specs())
    good = _sample(rng)
    with pytest.raises(ValueError, match="shape"):
        writer.append({**good, "s2": good["s2"][:, :4]}, "bad-shape")
    with pytest.raises(ValueError, match="uint16"):
        writer.append({**good, "s2": good["s2"].astype("int64")}, "bad-dtype")
    with pytest.raises(ValueError, match="holds"):
        writer.append({"s2": good["s2"]}, "missing-sensor")
    with pytest.raises(ValueError, match="no samples"):
        writer.close()
    assert not (tmp_path / "x.h5").exists()


def test_custom_label_spec(tmp_path: Path) -> None:
    spec = LabelSpec(name="cloud_free", shape=(3, 4, 4), dtype="float32", attrs={"sensor": "s2"})
    path = tmp_path / "t.h5"
    with ShardWriter(path, "rgb", {"rgb": SensorArraySpec(dtype="uint8", channels=3, height=4, width=4)},
                     labels=[spec]) as writer:
        writer.append({"rgb": np.zeros((3, 4, 4), "u1")}, "a", labels={"cloud_free": np.ones((3, 4, 4))})
    info = read_shard_info(path)
    assert info.labels["cloud_free"].shape == (1, 3, 4, 4) and info.labels["cloud_free"].attrs == {"sensor": "s2"}


# ------------------------------------------------------------------------------------- bad shards


def _edit(path: Path, fn) -> None:
    with h5py.File(path, "r+") as f:
        fn(f)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="no such shard"):
        read_shard_info(tmp_path / "nope.h5")


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "junk.h5"
    path.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(ShardError, match="junk.h5.*corrupt or truncated"):
        read_shard_info(path)


def test_truncated(tmp_path: Path) -> None:
    path = tmp_path / "cut.h5"
    _write(path, n=3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="cut.h5.*(corrupt or truncated)"):
        read_shard_info(path)


def test_wrong_version(tmp_path: Path) -> None:
    path = tmp_path / "v3.h5"
    _write(path)
    _edit(path, lambda f: f.attrs.__setitem__("msgfm_format_version", 3))
    with pytest.raises(ShardError, match=r"v3.h5: shard format version 3.*reads versions 1, 2"):
        read_shard_info(path)


UTM = Georef(crs="EPSG:32633", transform=(10.0, 0.0, 399960.0, 0.0, -10.0, 5300040.0))


def _write_georef(path: Path, georefs: list[Georef | None]) -> None:
    rng = np.random.default_rng(1)
    with ShardWriter(path, "sen12ms", _specs()) as writer:
        for i, georef in enumerate(georefs):
            writer.append(_sample(rng), f"id-{i}", georef=georef)


def test_georef_round_trip_with_unknown_samples(tmp_path: Path) -> None:
    path = tmp_path / "g.h5"
    wkt = 'LOCAL_CS["a grid without EPSG code",UNIT["metre",1]]'
    other = Georef(crs=wkt, transform=(0.5, 0.0, 10.0, 0.0, -0.5, 20.0))
    _write_georef(path, [UTM, None, other])
    info = read_shard_info(path)
    assert info.format_version == FORMAT_VERSION == 2 and info.has_georef
    with h5py.File(path) as f:
        assert f["transform"].shape == (3, 6) and f["transform"].dtype == np.float64
        assert read_georef(f, 0) == UTM and read_georef(f, 1) is None and read_georef(f, 2) == other
        assert read_georef(f, 2).affine.a == 0.5 and read_georef(f, 2).affine.c == 10.0


def test_no_georef_written_when_no_sample_has_one(tmp_path: Path) -> None:
    path = tmp_path / "n.h5"
    _write_georef(path, [None, None])
    assert not read_shard_info(path).has_georef
    with h5py.File(path) as f:
        assert "crs" not in f and "transform" not in f and read_georef(f, 0) is None


def test_version_1_shards_stay_readable(tmp_path: Path) -> None:
    """A shard written by the v1 writer (version attribute 1, no /crs or /transform) reads as before."""
    path = tmp_path / "v1.h5"
    samples = _write(path)
    _edit(path, lambda f: f.attrs.__setitem__("msgfm_format_version", 1))
    info = read_shard_info(path)
    assert info.format_version == 1 and not info.has_georef and info.num_samples == 3 and info.has_latlon
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["s2"][2], samples[2]["s2"])
        assert read_georef(f, 0) is None


def test_georef_shapes_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "t.h5"
    _write_georef(path, [UTM, UTM])
    _edit(path, lambda f: f.__delitem__("crs"))
    with pytest.raises(ShardError, match="t.h5: has only one of 'crs' and 'transform'"):
        read_shard_info(path)
    path = tmp_path / "s.h5"
    _write_georef(path, [UTM, UTM])

    def cut(f: h5py.File) -> None:
        data = f["transform"][:, :4]
        del f["transform"]
        f.create_dataset("transform", data=data)

    _edit(path, cut)
    with pytest.raises(ShardError, match=r"s.h5: dataset 'transform' has shape \(2, 4\), expected \(2, 6\)"):
        read_shard_info(path)
    with pytest.raises(ValueError, match="6 coefficients"):
        Georef(crs="EPSG:4326", transform=(1.0, 0.0, 0.0))


def test_missing_sensor_dataset(tmp_path: Path) -> None:
    path = tmp_path / "m.h5"
    _write(path)
    _edit(path, lambda f: f.__delitem__("sar"))
    with pytest.raises(ShardError, match="m.h5: sensor 'sar' is listed .* missing"):
        read_shard_info(path)


def test_channel_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    _write(path)

    def shrink(f: h5py.File) -> None:
        data = f["s2"][:, :10]
        del f["s2"]
        f.create_dataset("s2", data=data)

    _edit(path, shrink)
    with pytest.raises(ShardError, match=r"c.h5: sensor 's2' has 10 channels .* expects 12"):
        read_shard_info(path)


def test_band_names_must_match_registry(tmp_path: Path) -> None:
    path = tmp_path / "b.h5"
    _write(path)
    _edit(path, lambda f: f["sar"].attrs.__setitem__("bands", ["VH", "VV"]))
    with pytest.raises(ShardError, match="stores bands"):
        read_shard_info(path)


def test_paired_length_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "p.h5"
    _write(path)
    _edit(path, lambda f: f["sar"].resize(2, axis=0))
    with pytest.raises(ShardError, match=r"p.h5: paired sensor datasets differ in length"):
        read_shard_info(path)


def test_empty_shard(tmp_path: Path) -> None:
    path = tmp_path / "e.h5"
    _write(path)

    def empty(f: h5py.File) -> None:
        for name in ("sar", "s2", "labels/multilabel", "labels/segmentation"):
            f[name].resize(0, axis=0)
        del f["ids"], f["lat"], f["lon"], f["time"]

    _edit(path, empty)
    with pytest.raises(ShardError, match="e.h5: the shard holds no samples"):
        read_shard_info(path)


def test_unknown_sensor(tmp_path: Path) -> None:
    path = tmp_path / "u.h5"
    _write(path)
    _edit(path, lambda f: f.attrs.__setitem__("sensors", ["sar", "hyperspectral"]))
    with pytest.raises(ShardError, match="u.h5: sensor 'hyperspectral': unknown sensor"):
        read_shard_info(path)


def test_plain_h5py_shard_is_accepted(tmp_path: Path) -> None:
    """A shard written by hand with h5py, following docs/data_format.md, reads back."""
    path = tmp_path / "manual.h5"
    with h5py.File(path, "w") as f:
        f.attrs["msgfm_format_version"] = 1
        f.attrs["group"] = "rgb"
        f.attrs["sensors"] = ["rgb"]
        ds = f.create_dataset("rgb", data=np.zeros((2, 3, 16, 16), "u1"), chunks=(1, 3, 16, 16))
        ds.attrs["bands"] = ["red", "green", "blue"]
        f.create_dataset("ids", data=["a", "b"], dtype=h5py.string_dtype())
    info = read_shard_info(path)
    assert info.num_samples == 2 and info.sensors["rgb"].scale == 1.0 and info.sensors["rgb"].gsd_m is None
