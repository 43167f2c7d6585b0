"""--bands on the geotiff and raster-pair converters (select and order bands by index or by
description) and the GSD taken from the raster's transform when the sensor declares none."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
from fixtures.six_band_scene import PIXEL_M, write_six_band_scene
from rasterio.windows import Window

from msgfm.data.convert import run as convert
from msgfm.data.convert.raster_bands import parse_band_selection, resolve_bands
from msgfm.data.format import read_shard_info
from msgfm.sensors import SensorSpec, register_sensor


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    write_six_band_scene(tmp_path / "scene.tif", size=96)
    return tmp_path / "scene.tif"


def _geotiff(scene: Path, out: Path, *args: str) -> Path:
    assert convert(["geotiff", str(scene), "--size", "48", "-o", str(out), "--workers", "1", *args]) == 0
    return out / "tiles-00000.h5"


def test_rgb_from_bands_3_2_1_of_a_six_band_scene(scene: Path, tmp_path: Path) -> None:
    shard = _geotiff(scene, tmp_path / "idx", "--sensor", "rgb", "--bands", "3,2,1")
    with h5py.File(shard) as f, rasterio.open(scene) as src:
        assert f["rgb"].shape == (4, 3, 48, 48)
        ids = [i.decode() for i in f["ids"][:]]
        red = src.read(3, window=Window(48, 0, 48, 48))  # band 3 = red, tile at row 0, col 48
        np.testing.assert_array_equal(f["rgb"][ids.index("scene_r0_c48"), 0], red)
        np.testing.assert_array_equal(f["rgb"][ids.index("scene_r0_c48")],
                                      src.read([3, 2, 1], window=Window(48, 0, 48, 48)))
        by_index = f["rgb"][:]
    by_name = _geotiff(scene, tmp_path / "names", "--sensor", "rgb", "--bands", "Red, GREEN,blue")
    with h5py.File(by_name) as f:
        np.testing.assert_array_equal(f["rgb"][:], by_index)


def test_without_bands_a_mismatch_names_file_sensor_and_bands(scene: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"scene.tif has 6 bands \(1 'blue', 2 'green', .*6 'swir2'\) but sensor "
                                         r"'rgb' has 3 \['red', 'green', 'blue'\]; select them with "
                                         r"--bands red,green,blue"):
        _geotiff(scene, tmp_path / "o", "--sensor", "rgb")
    with pytest.raises(ValueError, match=r"scene.tif: --bands 'thermal' matches no band .*1 'blue'"):
        _geotiff(scene, tmp_path / "o", "--sensor", "rgb", "--bands", "red,green,thermal")
    with pytest.raises(ValueError, match=r"scene.tif: --bands asks for band 7 but the file has 6 bands"):
        _geotiff(scene, tmp_path / "o", "--sensor", "rgb", "--bands", "7,2,1")
    with pytest.raises(ValueError, match=r"--bands selects 2 bands \[3, 2\] but sensor 'rgb' has 3"):
        _geotiff(scene, tmp_path / "o", "--sensor", "rgb", "--bands", "3,2")
    with pytest.raises(ValueError, match="band indexes start at 1"):
        parse_band_selection("0,1,2")
    assert not (tmp_path / "o").exists()


def test_resolve_bands_without_descriptions() -> None:
    assert resolve_bands((3, 2, 1), (None,) * 6, path="x.tif", sensor="rgb") == [3, 2, 1]
    assert resolve_bands(None, (None,) * 3, path="x.tif", sensor="rgb") == [1, 2, 3]
    with pytest.raises(ValueError, match=r"x.tif has 6 bands \(1, 2, 3, 4, 5, 6\) .*--bands 1,2,3"):
        resolve_bands(None, (None,) * 6, path="x.tif", sensor="rgb")


def test_gsd_from_the_transform_when_the_sensor_has_none(scene: Path, tmp_path: Path, capsys) -> None:
    register_sensor(SensorSpec(name="test_oli_nogsd", bands=("blue", "green", "red", "nir", "swir1", "swir2")))
    shard = _geotiff(scene, tmp_path / "a", "--sensor", "test_oli_nogsd")
    assert read_shard_info(shard).sensors["test_oli_nogsd"].gsd_m == PIXEL_M
    assert "gsd_m 30 (pixel size of the rasters' transform" in capsys.readouterr().out
    # rgb declares no GSD either (mixed sources): the scene's 30 m is recorded
    shard = _geotiff(scene, tmp_path / "b", "--sensor", "rgb", "--bands", "3,2,1")
    assert read_shard_info(shard).sensors["rgb"].gsd_m == PIXEL_M
    # --gsd-m wins; a sensor's own GSD wins over the transform
    shard = _geotiff(scene, tmp_path / "c", "--sensor", "rgb", "--bands", "3,2,1", "--gsd-m", "15")
    assert read_shard_info(shard).sensors["rgb"].gsd_m == 15.0
    register_sensor(SensorSpec(name="test_oli_60m", bands=("blue", "green", "red", "nir", "swir1", "swir2"),
                               gsd_m=60.0))
    shard = _geotiff(scene, tmp_path / "d", "--sensor", "test_oli_60m")
    assert read_shard_info(shard).sensors["test_oli_60m"].gsd_m == 60.0


def test_gsd_of_a_geographic_raster_and_of_mixed_resolutions(tmp_path: Path, capsys) -> None:
    write_six_band_scene(tmp_path / "geo" / "a.tif", size=48, crs="EPSG:4326", pixel=0.001)
    shard = _geotiff(tmp_path / "geo", tmp_path / "o1", "--sensor", "rgb", "--bands", "3,2,1")
    assert read_shard_info(shard).sensors["rgb"].gsd_m == pytest.approx(0.001 * 111_320)
    write_six_band_scene(tmp_path / "geo" / "b.tif", size=48, crs="EPSG:4326", pixel=0.002)
    shard = _geotiff(tmp_path / "geo", tmp_path / "o2", "--sensor", "rgb", "--bands", "3,2,1")
    assert read_shard_info(shard).sensors["rgb"].gsd_m is None
    assert "gsd_m unknown" in capsys.readouterr().out


def test_raster_pair_bands(scene: Path, tmp_path: Path) -> None:
    """rgb from bands 3,2,1 of the scene paired with its nir band as a one-band sensor."""
    register_sensor(SensorSpec(name="test_nir", bands=("nir",)))
    out = tmp_path / "pair"
    assert convert(["raster-pair", "--raster", f"rgb={scene}", "--raster", f"test_nir={scene}", "--bands",
                    "rgb=3,2,1", "--bands", "test_nir=nir", "--size", "48", "-o", str(out), "--workers", "1"]) == 0
    info = read_shard_info(out / "pair-00000.h5")
    assert info.num_samples == 4 and info.sensors["rgb"].gsd_m == PIXEL_M
    with h5py.File(out / "pair-00000.h5") as f, rasterio.open(scene) as src:
        last = f["ids"][3].decode()
        assert last.endswith("_r48_c48")
        window = Window(48, 48, 48, 48)
        np.testing.assert_array_equal(f["rgb"][3], src.read([3, 2, 1], window=window))
        np.testing.assert_array_equal(f["test_nir"][3], src.read([4], window=window))
    with pytest.raises(ValueError, match=r"--bands names sensor\(s\) \['dsm'\] without a --raster"):
        convert(["raster-pair", "--raster", f"rgb={scene}", "--raster", f"test_nir={scene}", "--bands",
                 "dsm=1", "-o", str(tmp_path / "x")])
    with pytest.raises(ValueError, match=r"scene.tif has 6 bands .* but sensor 'test_nir' has 1 \['nir'\]; "
                                         r"select them with --bands nir"):
        convert(["raster-pair", "--raster", f"rgb={scene}", "--raster", f"test_nir={scene}", "--bands",
                 "rgb=3,2,1", "-o", str(tmp_path / "x")])
