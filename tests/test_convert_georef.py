"""Georeferenced shards: the CRS and transform a converter writes for each tile equal those of the
source raster's window, and reading the source through them gives the tile's pixels back.

Real rasters from ../shared/realdata (Landsat RGB + DEM in EPSG:4326, RSVQA aerial RGB in EPSG:3857,
BigEarthNet v1 in UTM) and the Vaihingen fixture in the ISPRS layout.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
from fixtures.make_vaihingen import write_vaihingen
from rasterio.crs import CRS
from rasterio.windows import Window, from_bounds

from msgfm.data.convert import run as convert
from msgfm.data.georef import read_georef

pytestmark = pytest.mark.realdata


def _offsets(tile_id: str) -> tuple[int, int]:
    """(row, col) from an id ending in _r<row>_c<col>."""
    row, col = tile_id.rsplit("_", 2)[1:]
    return int(row[1:]), int(col[1:])


def _read_back(source: Path, georef, size: int) -> np.ndarray:
    """The source pixels under a stored georef: locate the tile by its bounds in the source's CRS."""
    with rasterio.open(source) as src:
        assert CRS.from_user_input(georef.crs) == src.crs
        left, top = georef.affine @ (0, 0)
        right, bottom = georef.affine @ (size, size)
        window = from_bounds(left, bottom, right, top, transform=src.transform).round_offsets().round_lengths()
        return src.read(window=window)


def test_geotiff_tiles_carry_their_window(realdata: Path, tmp_path: Path) -> None:
    source = realdata / "rsvqa_rgb" / "rsvqa_hr_usgs_aerial_753.tif"
    out = tmp_path / "out"
    convert(["geotiff", str(source), "--sensor", "rgb", "--size", "96", "--stride", "80", "-o", str(out),
             "--workers", "1"])
    with h5py.File(out / "tiles-00000.h5") as f, rasterio.open(source) as src:
        assert f["crs"].shape == (f["rgb"].shape[0],) and f.attrs["msgfm_format_version"] == 2
        for i, raw_id in enumerate(f["ids"][:]):
            row, col = _offsets(raw_id.decode())
            georef = read_georef(f, i)
            assert georef.crs == "EPSG:3857"
            assert georef.affine == src.window_transform(Window(col, row, 96, 96))
            np.testing.assert_array_equal(_read_back(source, georef, 96), f["rgb"][i])


def test_crs_without_epsg_code_is_stored_as_wkt(realdata: Path, tmp_path: Path) -> None:
    with rasterio.open(realdata / "rsvqa_rgb" / "rsvqa_lr_sentinel2_rgb_72.tif") as src:
        data, profile = src.read(), src.profile
    lambert = CRS.from_proj4("+proj=lcc +lat_1=40 +lat_2=50 +lat_0=45 +lon_0=7 +x_0=0 +y_0=0 +ellps=GRS80 +units=m")
    assert lambert.to_epsg() is None
    profile.update(crs=lambert)
    source = tmp_path / "lambert.tif"
    with rasterio.open(source, "w", **profile) as dst:
        dst.write(data)
    out = tmp_path / "out"
    convert(["geotiff", str(source), "--sensor", "rgb", "--size", "128", "-o", str(out), "--workers", "1"])
    with h5py.File(out / "tiles-00000.h5") as f:
        georef = read_georef(f, 3)
        assert georef.crs.startswith(("PROJCS", "PROJCRS")) and CRS.from_wkt(georef.crs) == lambert
        np.testing.assert_array_equal(_read_back(source, georef, 128), f["rgb"][3])


def test_raster_pair_tiles_are_on_the_fine_grid(realdata: Path, tmp_path: Path) -> None:
    folder = realdata / "landsat_rmnp_rgb_dem"
    rgb_path, dem_path = folder / "rmnp-rgb.tif", folder / "rmnp-dem.tif"
    out = tmp_path / "out"
    convert(["raster-pair", "--raster", f"rgb={rgb_path}", "--raster", f"dsm={dem_path}", "--size", "64",
             "--max-nodata", "1", "-o", str(out), "--workers", "1"])
    with h5py.File(out / "pair-00000.h5") as f:
        for i in (0, f["rgb"].shape[0] - 1):
            georef = read_georef(f, i)
            assert georef.crs == "EPSG:4326"
            # the RGB pixels (the finer grid, copied) lie exactly under the stored transform
            np.testing.assert_array_equal(_read_back(rgb_path, georef, 64), f["rgb"][i])
            with rasterio.open(rgb_path) as rgb:
                assert georef.affine.a == rgb.transform.a and georef.affine.e == rgb.transform.e


def test_bigearthnet_pairs_carry_the_s2_grid(realdata: Path, tmp_path: Path) -> None:
    root = realdata / "bigearthnet_mm_v1"
    out = tmp_path / "out"
    convert(["bigearthnet", "--s1", str(root / "BigEarthNet-S1-Example"), "--s2", str(root / "BigEarthNet-S2-Example"),
             "-o", str(out), "--workers", "1"])
    with h5py.File(out / "bigearthnet-00000.h5") as f:
        for i, raw_id in enumerate(f["ids"][:]):
            name = raw_id.decode()
            with rasterio.open(root / "BigEarthNet-S2-Example" / name / f"{name}_B02.tif") as b02:
                georef = read_georef(f, i)
                assert CRS.from_user_input(georef.crs) == b02.crs and georef.affine == b02.transform


def test_vaihingen_tiles_carry_their_window(tmp_path: Path) -> None:
    write_vaihingen(tmp_path / "v", height=70, width=90)
    out = tmp_path / "out"
    convert(["vaihingen", str(tmp_path / "v"), "-o", str(out), "--size", "32", "--areas", "1", "--workers", "1"])
    with h5py.File(out / "vaihingen-00000.h5") as f, \
            rasterio.open(tmp_path / "v" / "top" / "top_mosaic_09cm_area1.tif") as top:
        for i, raw_id in enumerate(f["ids"][:]):
            row, col = _offsets(raw_id.decode())
            georef = read_georef(f, i)
            assert georef.crs == "EPSG:32632" and georef.affine == top.window_transform(Window(col, row, 32, 32))
