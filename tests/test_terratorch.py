"""msGFM in TerraTorch by name: the real terratorch package fine-tunes one step from the example YAML
(docs/terratorch/msgfm_classification.yaml) on tiny GeoTIFF scenes, through its own CLI.

Skipped only when terratorch is not installed and CI is not set (.ci/run sets CI=true)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from msgfm.backbone import load_backbone
from msgfm.export import export

REPO = Path(__file__).resolve().parents[1]
YAML = REPO / "docs" / "terratorch" / "msgfm_classification.yaml"
BANDS = ["B02", "B03", "B04", "B08"]

if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
    pytest.importorskip("terratorch")


@pytest.fixture(scope="module")
def exported(tiny_pretrained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tt") / "export"
    export(tiny_pretrained_run, out, sensors=["s2"])
    return out


def test_registry_builds_the_backbone_with_bands_selected_by_name(exported):
    from terratorch.registry import BACKBONE_REGISTRY

    import msgfm.backbone.terratorch  # noqa: F401  (registers the source "msgfm")

    assert "msgfm_swinb_192" in BACKBONE_REGISTRY and "msgfm_tiny" in BACKBONE_REGISTRY
    backbone = BACKBONE_REGISTRY.build("msgfm_tiny", model_bands=["B08", "s2:B04"], pretrained=True,
                                       ckpt_data=str(exported), out_indices=[1, 3])
    assert backbone.out_channels == [64, 256]
    x = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(8))
    features = backbone.eval()(x)
    assert [f.shape for f in features] == [(2, 64, 4, 4), (2, 256, 1, 1)]
    # the same as the full s2 backbone fed the two bands at their places and zeros elsewhere
    full = load_backbone(exported, sensors="s2")
    x12 = torch.zeros(2, 12, 32, 32)
    x12[:, [7, 3]] = x
    with torch.no_grad():
        expected = full.forward_intermediates(x12, indices=[1, 3], intermediates_only=True)
    assert all((f - e).abs().max() < 1e-5 for f, e in zip(features, expected))
    with pytest.raises(ValueError, match="band 'B10' is not among"):
        BACKBONE_REGISTRY.build("msgfm_tiny", model_bands=["B10"], pretrained=True, ckpt_data=str(exported))


def write_scenes(root: Path) -> None:
    """Two classes of 32x32 four-band GeoTIFF tiles (bright and dark), in TerraTorch's class-folder layout."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for label, level in (("bright", 2.0), ("dark", -2.0)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                data = (rng.standard_normal((4, 32, 32)) + level).astype("float32")
                with rasterio.open(folder / f"tile{i}.tif", "w", driver="GTiff", width=32, height=32, count=4,
                                   dtype="float32", crs="EPSG:32633", transform=from_origin(500000, 5000000, 10, 10)
                                   ) as dst:
                    dst.write(data)


@pytest.mark.slow
def test_terratorch_fine_tunes_one_step_from_the_example_yaml(exported, tmp_path):
    write_scenes(tmp_path / "scenes")
    before = load_backbone(exported, sensors="s2").patch_embed.proj.weight[:, [1, 2, 3, 7]].clone()
    args = ["fit", "--config", str(YAML),
            "--custom_modules_path", str(REPO / "docs" / "terratorch" / "msgfm_terratorch"),
            "--model.init_args.model_args.backbone", "msgfm_tiny",
            "--model.init_args.model_args.backbone_ckpt_data", str(exported),
            "--data.init_args.train_data_root", str(tmp_path / "scenes" / "train"),
            "--data.init_args.val_data_root", str(tmp_path / "scenes" / "val"),
            "--data.init_args.test_data_root", str(tmp_path / "scenes" / "test"),
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
            "--trainer.enable_checkpointing", "true", "--trainer.default_root_dir", str(tmp_path / "tt"),
            # a checkpoint after the one step (the default one waits for a validation loss)
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"), "--trainer.callbacks.every_n_train_steps", "1"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "terratorch", *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    saved = sorted((tmp_path / "ckpt").rglob("*.ckpt"))
    assert saved, f"TerraTorch wrote no checkpoint after its step: {result.stderr[-2000:]}"
    state = torch.load(saved[-1], map_location="cpu", weights_only=False)["state_dict"]
    weight = next(v for k, v in state.items() if k.endswith("patch_embed.proj.weight"))
    assert weight.shape == before.shape  # the 4 bands picked by name from the export's 12
    assert not torch.equal(weight, before)  # one optimizer step moved the pretrained weights
