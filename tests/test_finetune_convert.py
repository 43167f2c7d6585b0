"""Downstream converters: Vaihingen and SEN12MS-CR on fixtures in the real layouts, SpaceNet on real data."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
from fixtures.make_sen12mscr import write_sen12mscr
from fixtures.make_spacenet2 import write_spacenet2
from fixtures.make_vaihingen import AREA_WITHOUT_DSM, write_vaihingen

from msgfm.data.convert import run as convert
from msgfm.data.convert.spacenet import block_mean
from msgfm.data.convert.vaihingen import colours_to_classes
from msgfm.data.format import read_shard_info
from msgfm.sensors import get_sensor


def _read(path: Path) -> dict:
    with h5py.File(path) as f:
        out = {k: f[k][:] for k in f if isinstance(f[k], h5py.Dataset)}
        out.update({f"labels/{k}": v[:] for k, v in f.get("labels", {}).items()})
    out["ids"] = [i.decode() for i in out["ids"]]
    return out


def test_vaihingen_tiles_cover_every_pixel_once(tmp_path):
    expected = write_vaihingen(tmp_path / "vaihingen", height=70, width=90)
    out = tmp_path / "out"
    assert convert(["vaihingen", str(tmp_path / "vaihingen"), "-o", str(out), "--size", "32", "--workers", "1"]) == 0
    info = read_shard_info(out / "vaihingen-00000.h5")
    assert set(info.sensors) == {"rgb", "dsm"} and info.labels["segmentation"].attrs["ignore_index"] == 255
    data = _read(out / "vaihingen-00000.h5")
    for area, classes in expected.items():
        # reassemble the padded area (96 x 96: 3 x 3 tiles of 32) from its tiles
        labels = np.full((96, 96), 255, np.uint8)
        irrg = np.zeros((3, 96, 96), np.uint8)
        for i, sample_id in enumerate(data["ids"]):
            if sample_id.startswith(f"area{area}_"):
                r, c = (int(part[1:]) for part in sample_id.split("_")[1:])
                labels[r:r + 32, c:c + 32] = data["labels/segmentation"][i]
                irrg[:, r:r + 32, c:c + 32] = data["rgb"][i]
        np.testing.assert_array_equal(labels[:70, :90], classes)
        assert (labels[70:] == 255).all() and (labels[:, 90:] == 255).all()
        with rasterio.open(tmp_path / "vaihingen" / "top" / f"top_mosaic_09cm_area{area}.tif") as top:
            np.testing.assert_array_equal(irrg[:, :70, :90], top.read())
    assert len(data["ids"]) == 2 * 9
    report = json.loads((out / "vaihingen.skipped.json").read_text())
    assert report["skipped"][0]["item"] == f"area{AREA_WITHOUT_DSM}" and "DSM" in report["skipped"][0]["reason"]


def test_vaihingen_eroded_references_ignore_boundaries(tmp_path):
    expected = write_vaihingen(tmp_path / "v", height=40, width=40)
    out = tmp_path / "out"
    convert(["vaihingen", str(tmp_path / "v"), "-o", str(out), "--size", "40", "--labels", "eroded",
             "--areas", "1", "--workers", "1"])
    data = _read(out / "vaihingen-00000.h5")
    labels = data["labels/segmentation"][0]
    boundary = labels == 255
    assert boundary.any() and not boundary.all()
    np.testing.assert_array_equal(labels[~boundary], expected[1][~boundary])


def test_vaihingen_unknown_colour_is_an_error():
    rgb = np.zeros((3, 2, 2), np.uint8)
    rgb[:, 0, 0] = (255, 255, 255)
    rgb[:, 1, 1] = (12, 34, 56)
    with pytest.raises(ValueError, match=r"ref.tif: colour \(12, 34, 56\) at pixel \(1, 1\)"):
        colours_to_classes(rgb, "ref.tif")


def test_sen12mscr_triplets(tmp_path):
    triplets = write_sen12mscr(tmp_path / "cr", size=32)
    out = tmp_path / "out"
    assert convert(["sen12mscr", str(tmp_path / "cr"), "-o", str(out), "--workers", "1"]) == 0
    info = read_shard_info(out / "sen12mscr-00000.h5")
    assert info.num_samples == 3 and info.labels["s2_cloud_free"].shape == (3, 12, 32, 32)
    assert info.labels["s2_cloud_free"].attrs["bands"] == list(get_sensor("s2").bands)
    keep = [i for i, b in enumerate(get_sensor("s2_l1c").bands) if b != "B10"]
    data = _read(out / "sen12mscr-00000.h5")
    assert data["ids"] == ["ROIs1158_spring_1_p30", "ROIs1158_spring_1_p31", "ROIs1158_spring_1_p32"]
    for i, (s1, clear, cloudy) in enumerate(triplets):
        with rasterio.open(s1) as a, rasterio.open(clear) as b, rasterio.open(cloudy) as c:
            np.testing.assert_array_equal(data["sar"][i], a.read())
            np.testing.assert_array_equal(data["labels/s2_cloud_free"][i], b.read()[keep])
            np.testing.assert_array_equal(data["s2"][i], c.read()[keep])
    report = json.loads((out / "sen12mscr.skipped.json").read_text())
    assert len(report["skipped"]) == 1 and "p40" in report["skipped"][0]["item"]
    assert "s2_cloudy_1_p40" in report["skipped"][0]["reason"]


@pytest.mark.realdata
def test_spacenet_real_pan_ms_pair(realdata, tmp_path):
    pan, ms = realdata / "spacenet6_rotterdam" / "pan1.tif", realdata / "spacenet6_rotterdam" / "ms1.tif"
    out = tmp_path / "out"
    assert convert(["spacenet", "--pair", str(pan), str(ms), "--ms-band-order", "red,green,blue,nir1",
                    "--size", "100", "-o", str(out), "--workers", "1"]) == 0
    info = read_shard_info(out / "spacenet-00000.h5")
    assert info.num_samples == 9 and info.sensors["wv2_ms"].shape == (9, 4, 100, 100)
    data = _read(out / "spacenet-00000.h5")
    with rasterio.open(pan) as p, rasterio.open(ms) as m:
        pan_HW, ms_CHW = p.read(1), m.read()
    index = data["ids"].index("ms1_r100_c200")
    np.testing.assert_allclose(data["pan"][index, 0], block_mean(pan_HW, 2)[100:200, 200:300])
    assert data["pan"][index, 0, 0, 0] == pytest.approx(pan_HW[200:202, 400:402].mean())
    # stored in the registry's band order blue, green, red, nir1
    np.testing.assert_array_equal(data["wv2_ms"][index], ms_CHW[[2, 1, 0, 3], 100:200, 200:300].astype(np.float32))


def test_spacenet2_layout_gives_8_band_worldview3_over_the_ms_pixels_the_pan_covers(tmp_path):
    written = write_spacenet2(tmp_path / "SpaceNet2")
    out = tmp_path / "out"
    assert convert(["spacenet", str(tmp_path / "SpaceNet2"), "--size", "64", "-o", str(out), "--workers", "1"]) == 0
    info = read_shard_info(out / "spacenet-00000.h5")
    # 650 PAN px / 4 -> 162 whole MS pixels of the 163: 2 x 2 tiles of 64 per image, 2 Vegas images
    assert set(info.sensors) == {"pan", "wv3_ms"} and info.sensors["wv3_ms"].shape == (8, 8, 64, 64)
    assert info.sensors["wv3_ms"].bands == ("coastal", "blue", "green", "yellow", "red", "rededge", "nir1", "nir2")
    assert info.sensors["pan"].gsd_m == info.sensors["wv3_ms"].gsd_m == pytest.approx(4 * 2.7e-6 * 111_320, rel=0.01)
    data = _read(out / "spacenet-00000.h5")
    for stem, (pan_HW, mul_CHW) in written.items():
        index = data["ids"].index(f"{stem}_r64_c0")
        np.testing.assert_array_equal(data["wv3_ms"][index], mul_CHW[:, 64:128, 0:64])  # file order = registry order
        expected_pan = pan_HW[256:512, 0:256].astype(np.float64).reshape(64, 4, 64, 4).mean(axis=(1, 3))
        np.testing.assert_allclose(data["pan"][index, 0], expected_pan, rtol=1e-6)
    report = json.loads((out / "spacenet.skipped.json").read_text())
    reasons = {Path(s["item"]).name if isinstance(s["item"], str) else str(s["item"]): s["reason"]
               for s in report["skipped"]}
    assert any("no PAN partner" in r for r in reasons.values())
    assert any("not on a PAN pixel corner" in r for r in reasons.values())  # Paris: shifted by half a PAN pixel
    assert len(reasons) == 2


def test_spacenet2_into_the_4_band_sensor_and_bad_choices(tmp_path):
    written = write_spacenet2(tmp_path / "SpaceNet2")
    aoi = tmp_path / "SpaceNet2" / "AOI_2_Vegas_Train"  # one AOI folder works as the root too
    out = tmp_path / "out"
    assert convert(["spacenet", str(aoi), "--ms-sensor", "wv2_ms", "--ms-band-order",
                    "coastal,blue,green,yellow,red,rededge,nir1,nir2", "--size", "81", "-o", str(out),
                    "--workers", "1"]) == 0
    data = _read(out / "spacenet-00000.h5")
    index = data["ids"].index("MUL_AOI_2_Vegas_img2_r81_c0")
    # blue, green, red, nir1 of the 8 bands
    np.testing.assert_array_equal(data["wv2_ms"][index], written["MUL_AOI_2_Vegas_img2"][1][[1, 2, 4, 6], 81:162, 0:81])
    with pytest.raises(ValueError, match="lacks band.*of wv3_ms"):
        convert(["spacenet", str(aoi), "--ms-band-order", "blue,green,red,nir1", "-o", str(tmp_path / "x")])


@pytest.mark.realdata
def test_spacenet_4_band_data_stays_wv2_ms_and_8_bands_are_refused(realdata, tmp_path):
    pan, ms = realdata / "spacenet6_rotterdam" / "pan1.tif", realdata / "spacenet6_rotterdam" / "ms1.tif"
    with pytest.raises(ValueError, match="has 4 bands; wv3_ms .* needs 8"):
        convert(["spacenet", "--pair", str(pan), str(ms), "--ms-sensor", "wv3_ms", "-o", str(tmp_path / "o")])


@pytest.mark.realdata
def test_spacenet_rejects_pairs_that_do_not_match(realdata, tmp_path):
    pan = realdata / "spacenet6_rotterdam" / "pan1.tif"
    other = realdata / "spacenet4_atlanta_buildings" / "sample_geotiff.tif"
    with pytest.raises(ValueError, match="sample_geotiff.tif: PAN and MS are in different CRSs"):
        convert(["spacenet", "--pair", str(pan), str(other), "-o", str(tmp_path / "o"), "--workers", "1"])
    with pytest.raises(ValueError, match="lacks band"):
        convert(["spacenet", "--pair", str(pan), str(pan), "--ms-band-order", "red,green", "-o", str(tmp_path)])


@pytest.mark.realdata
def test_spacenet_buildings_real_mask(realdata, tmp_path):
    folder = realdata / "spacenet4_atlanta_buildings"
    out = tmp_path / "out"
    assert convert(["spacenet-buildings", str(folder / "sample_geotiff.tif"), str(folder / "sample_b_mask_inner.tif"),
                    "--size", "300", "-o", str(out), "--workers", "1"]) == 0
    data = _read(out / "spacenet_buildings-00000.h5")
    assert data["pan"].shape == (9, 1, 300, 300)
    with rasterio.open(folder / "sample_b_mask_inner.tif") as m:
        mask = m.read(1)
    index = data["ids"].index("sample_geotiff_r300_c600")
    np.testing.assert_array_equal(data["labels/segmentation"][index], (mask[300:600, 600:900] > 0).astype(np.uint8))
    assert 0 < data["labels/segmentation"].mean() < 0.5
