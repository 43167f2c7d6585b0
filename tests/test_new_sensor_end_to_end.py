"""A new sensor without code, the way a user goes: a 6-band GeoTIFF and a sensors YAML file ->
`msgfm convert geotiff --sensors` -> `msgfm stats --sensors` -> one pretraining step of a run
config that declares the sensor under `sensors:` (launchers/pretrain.py, one CPU process).

Every step is a fresh process, so nothing registered by an earlier step (or by the test) helps
a later one: the sensors file and the run config are the only places the sensor is declared.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures.six_band_scene import SENSORS_YAML, write_six_band_scene
from test_train_support import REPO, TINY, write_tiny_ds_config

SENSOR = "test_e2e_oli"


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, f"{args[:3]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_six_band_geotiff_to_one_training_step(tmp_path: Path) -> None:
    write_six_band_scene(tmp_path / "scene.tif", size=128)
    sensors_file = tmp_path / "sensors.yaml"
    sensors_file.write_text(SENSORS_YAML.format(name=SENSOR))
    shards = tmp_path / "data" / "landsat"
    _run("-m", "msgfm.cli", "convert", "geotiff", str(tmp_path / "scene.tif"), "--sensors", str(sensors_file),
         "--sensor", SENSOR, "--size", "32", "-o", str(shards), "--workers", "1")
    stats = _run("-m", "msgfm.cli", "stats", str(shards / "*.h5"), "--sensors", str(sensors_file), "--quiet")
    assert "16 samples" in stats.stdout and f"{SENSOR}      swir2" in stats.stdout

    config = json.loads(json.dumps(TINY))
    config["sensors"] = yaml.safe_load(sensors_file.read_text())  # the run config declares the sensor
    config["model"]["sensors"] = [SENSOR]
    config["data"]["root"] = str(tmp_path / "data")
    config["data"]["groups"] = [{"name": "landsat", "sensors": [SENSOR], "shards": ["landsat/*.h5"],
                                 "batch_size_per_gpu": 4, "lr": 1.0e-3, "num_workers": 0}]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    write_tiny_ds_config(tmp_path)
    out = tmp_path / "out"
    _run("launchers/pretrain.py", "--deepspeed_config", str(tmp_path / "ds_tiny.json"), "--config",
         str(tmp_path / "run.yaml"), "--output-dir", str(out), "train.max_steps=1", "train.checkpoint_interval=1",
         "model.moe.expert_parallel_size=1")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(row for row in rows if row.get("step") == 1 and f"train/landsat/recon/{SENSOR}" in row)
    assert math.isfinite(step[f"train/landsat/recon/{SENSOR}"]) and step[f"train/landsat/recon/{SENSOR}"] > 0
    assert (out / "checkpoints" / "step00000001").is_dir()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["sensors"][SENSOR]["bands"] == ["blue", "green", "red", "nir", "swir1", "swir2"]
