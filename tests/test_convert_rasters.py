"""raster-pair and geotiff converters on real rasters from ../shared/realdata (Landsat RGB + DEM,
RSVQA RGB, Sentinel-1 VV), plus modified copies for the refusals and the nodata rule."""
from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
from affine import Affine

from msgfm.data.convert import run as convert
from msgfm.data.format import read_shard_info
from msgfm.sensors import SensorSpec, register_sensor

pytestmark = pytest.mark.realdata


@pytest.fixture
def landsat(realdata: Path) -> tuple[Path, Path]:
    folder = realdata / "landsat_rmnp_rgb_dem"
    return folder / "rmnp-rgb.tif", folder / "rmnp-dem.tif"


def _copy(src_path: Path, dst_path: Path, edit=None, **profile_changes) -> Path:
    with rasterio.open(src_path) as src:
        data, profile = src.read(), src.profile
    if edit is not None:
        edit(data)
    profile.update(profile_changes)
    with rasterio.open(dst_path, "w", **profile) as dst:
        dst.write(data)
    return dst_path


def test_raster_pair_tiles_on_the_finer_grid(landsat, tmp_path: Path) -> None:
    rgb_path, dem_path = landsat
    out = tmp_path / "out"
    convert(["raster-pair", "--raster", f"rgb={rgb_path}", "--raster", f"dsm={dem_path}", "--size", "64",
             "--stride", "32", "--resampling", "nearest", "--max-nodata", "1", "-o", str(out), "--workers", "2"])
    with rasterio.open(rgb_path) as rgb, rasterio.open(dem_path) as dem:
        rgb_all, dem_all = rgb.read(), dem.read(1)
        # independent expectation: first whole RGB pixel inside the DEM's bounds
        col0 = math.ceil((dem.bounds.left - rgb.bounds.left) / rgb.res[0] - 1e-6)
        row0 = math.ceil((rgb.bounds.top - dem.bounds.top) / rgb.res[1] - 1e-6)
        rows_total = math.floor((rgb.bounds.top - dem.bounds.bottom) / rgb.res[1] + 1e-6) - row0
        cols_total = math.floor((dem.bounds.right - rgb.bounds.left) / rgb.res[0] + 1e-6) - col0
        expected_tiles = ((rows_total - 64) // 32 + 1) * ((cols_total - 64) // 32 + 1)
        info = read_shard_info(out / "pair-00000.h5")
        assert info.group == "mdas" and info.num_samples == expected_tiles
        assert info.sensors["rgb"].dtype == np.uint8 and info.sensors["dsm"].dtype == np.uint16
        assert info.sensors["rgb"].nodata == 255 and info.sensors["dsm"].nodata == 65535
        assert info.sensors["dsm"].gsd_m == pytest.approx(0.0015 * 111_320, rel=1e-3)  # 0.0015 deg of latitude
        with h5py.File(out / "pair-00000.h5") as f:
            for i in (0, expected_tiles // 2, expected_tiles - 1):
                tile_id = f["ids"][i].decode()
                r, c = (int(part[1:]) for part in tile_id.rsplit("_", 2)[1:])
                top, left = row0 + r, col0 + c
                np.testing.assert_array_equal(f["rgb"][i], rgb_all[:, top:top + 64, left:left + 64])
                # nearest: each RGB pixel centre takes the DEM pixel it falls in
                jj, ii = np.meshgrid(np.arange(64), np.arange(64))
                xs = rgb.bounds.left + (left + jj + 0.5) * rgb.res[0]
                ys = rgb.bounds.top - (top + ii + 0.5) * rgb.res[1]
                dem_rows, dem_cols = rasterio.transform.rowcol(dem.transform, xs.ravel(), ys.ravel())
                expected = dem_all[np.asarray(dem_rows), np.asarray(dem_cols)].reshape(64, 64)
                assert (f["dsm"][i, 0] == expected).mean() > 0.99, tile_id


def test_raster_pair_resize_keeps_each_tiles_footprint_at_coarser_pixels(landsat, tmp_path: Path) -> None:
    rgb_path, dem_path = landsat
    common = ["raster-pair", "--raster", f"rgb={rgb_path}", "--raster", f"dsm={dem_path}", "--size", "64",
              "--stride", "64", "--resampling", "average", "--max-nodata", "0", "--workers", "1"]
    convert([*common, "-o", str(tmp_path / "native")])
    convert([*common, "--resize", "32", "-o", str(tmp_path / "resized")])  # as --size 768 --resize 384, halved
    native, resized = read_shard_info(tmp_path / "native" / "pair-00000.h5"), \
        read_shard_info(tmp_path / "resized" / "pair-00000.h5")
    # nodata is judged on the stored pixels: averaging fills a pixel from the valid part of its block, so
    # resized tiles pass --max-nodata 0 at least as often as native ones
    assert resized.num_samples >= native.num_samples > 0
    assert resized.sensors["rgb"].shape[1:] == (3, 32, 32) and resized.sensors["dsm"].shape[1:] == (1, 32, 32)
    assert resized.sensors["rgb"].gsd_m == pytest.approx(2 * native.sensors["rgb"].gsd_m)
    with h5py.File(tmp_path / "native" / "pair-00000.h5") as a, h5py.File(tmp_path / "resized" / "pair-00000.h5") as b:
        ids_b = [i.decode() for i in b["ids"]]
        for i, tile_id in enumerate(i.decode() for i in a["ids"]):
            j = ids_b.index(tile_id)
            np.testing.assert_allclose(b["transform"][j, [0, 4]], 2 * a["transform"][i, [0, 4]])  # pixel size x 2
            np.testing.assert_allclose(b["transform"][j, [2, 5]], a["transform"][i, [2, 5]])  # same corner
            # each stored pixel is the mean of the 2 x 2 source pixels it covers (the tile was copied natively)
            blocks = a["rgb"][i].astype(np.float64).reshape(3, 32, 2, 32, 2).mean(axis=(2, 4))
            assert np.abs(b["rgb"][j] - blocks).max() <= 1.0  # GDAL rounds to uint8
            dsm_blocks = a["dsm"][i, 0].astype(np.float64).reshape(32, 2, 32, 2).mean(axis=(1, 3))
            assert np.abs(b["dsm"][j, 0] - dsm_blocks).mean() < 0.02 * np.ptp(dsm_blocks) + 1
    with pytest.raises(ValueError, match="--resize must be"):
        convert([*common, "--resize", "0", "-o", str(tmp_path / "bad")])


def test_raster_pair_skips_nodata_tiles(landsat, tmp_path: Path) -> None:
    rgb_path, dem_path = landsat

    def blank_north_west(data: np.ndarray) -> None:
        data[:, : data.shape[1] // 2, : data.shape[2] // 2] = 65535

    holed = _copy(dem_path, tmp_path / "dem_holes.tif", edit=blank_north_west)
    out = tmp_path / "out"
    convert(["raster-pair", "--raster", f"rgb={rgb_path}", "--raster", f"dsm={holed}", "--size", "64",
             "--max-nodata", "0.2", "-o", str(out), "--workers", "1"])
    report = json.loads((out / "pair.skipped.json").read_text())
    assert report["skipped"] and all("nodata fraction" in e["reason"] for e in report["skipped"])
    assert report["samples_written"] + len(report["skipped"]) == 16  # 4 x 4 tiles of 64 in 262 x 277
    with h5py.File(out / "pair-00000.h5") as f:
        for i in range(f["dsm"].shape[0]):
            invalid = (f["dsm"][i, 0] == 65535) | (f["rgb"][i] == 255).any(axis=0)
            assert invalid.mean() <= 0.2


def test_raster_pair_refuses_other_crs_and_disjoint_rasters(landsat, tmp_path: Path) -> None:
    rgb_path, dem_path = landsat
    utm = _copy(dem_path, tmp_path / "dem_utm.tif", crs="EPSG:32613")
    with pytest.raises(ValueError, match=r"different CRS: rgb EPSG:4326, dsm EPSG:32613; reproject"):
        convert(["raster-pair", "--raster", f"rgb={rgb_path}", "--raster", f"dsm={utm}", "-o", str(tmp_path / "o")])
    with rasterio.open(dem_path) as dem:
        far = _copy(dem_path, tmp_path / "dem_far.tif", transform=Affine.translation(20, 0) @ dem.transform)
    with pytest.raises(ValueError, match="do not overlap"):
        convert(["raster-pair", "--raster", f"rgb={rgb_path}", "--raster", f"dsm={far}", "-o", str(tmp_path / "o")])
    with pytest.raises(ValueError, match=r"rmnp-rgb.tif has 3 bands \(1, 2, 3\) but sensor 'dsm' has 1 "
                                         r"\['elevation'\]; select them with --bands 1 "):
        convert(["raster-pair", "--raster", f"dsm={rgb_path}", "--raster", f"rgb={dem_path}", "-o",
                 str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_geotiff_tiles_rgb(realdata: Path, tmp_path: Path) -> None:
    folder = realdata / "rsvqa_rgb"
    out = tmp_path / "out"
    convert(["geotiff", str(folder), "--sensor", "rgb", "--size", "128", "-o", str(out), "--workers", "2"])
    info = read_shard_info(out / "tiles-00000.h5")
    assert info.group == "rgb" and info.num_samples == 16 + 4  # 512x512 and 256x256 files
    with h5py.File(out / "tiles-00000.h5") as f, rasterio.open(folder / "rsvqa_hr_usgs_aerial_753.tif") as src:
        ids = [s.decode() for s in f["ids"][:]]
        i = ids.index("rsvqa_hr_usgs_aerial_753_r128_c384")
        np.testing.assert_array_equal(f["rgb"][i], src.read()[:, 128:256, 384:512])


def test_geotiff_band_count_checked_before_converting(realdata: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"/S1A__IW___A_20150309T173017_VV.*tif has 1 bands \(1\) but sensor 'sar' has "
                                         r"2 \['VV', 'VH'\]; pick the sensor the file holds"):
        convert(["geotiff", str(realdata / "s1_vv_db_pyrosar"), "--sensor", "sar", "-o", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_geotiff_nodata_tiles_skipped(realdata: Path, tmp_path: Path) -> None:
    register_sensor(SensorSpec(name="test_vv", bands=("VV",), gsd_m=20.0))
    source = next((realdata / "s1_vv_db_pyrosar").glob("*.tif"))

    def blank_left(data: np.ndarray) -> None:
        data[:, :, :100] = -99

    folder = tmp_path / "in"
    folder.mkdir()
    _copy(source, folder / "vv.tif", edit=blank_left)
    (folder / "broken.tif").write_bytes(b"II*\x00 not really a tiff")
    out = tmp_path / "out"
    convert(["geotiff", str(folder), "--sensor", "test_vv", "--size", "64", "--max-nodata", "0.1",
             "-o", str(out), "--workers", "1"])
    info = read_shard_info(out / "tiles-00000.h5")
    assert info.sensors["test_vv"].nodata == -99.0 and info.sensors["test_vv"].dtype == np.float32
    # 217 x 268 -> 3 x 4 tiles; columns 0-63 and 64-127 hold >= 36 nodata columns of 64
    assert info.num_samples == 3 * 2
    reasons = [e["reason"] for e in json.loads((out / "tiles.skipped.json").read_text())["skipped"]]
    assert sum("nodata fraction" in r for r in reasons) == 6 and sum("unreadable" in r for r in reasons) == 1
