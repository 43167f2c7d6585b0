"""Fine-tuning end to end on real pixels: the BigEarthNet examples of bigearthnet-common (multilabel,
with MLflow, resume and --eval-only), the SpaceNet 6 PAN + MS pair (pan-sharpening) and the SpaceNet 4
building mask (segmentation) from ../shared/realdata. Tiny configs on CPU; the numbers these runs
print are the "tiny real-data" rows of docs/finetune.md."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_finetune import write_pretraining_checkpoint

from msgfm.config.finetune import load_finetune_config
from msgfm.data.convert import run as convert
from msgfm.data.convert import run as convert_pretraining_kind
from msgfm.data.fetch import FetchError, bigearthnet_examples
from msgfm.data.stats import load_stats, write_stats
from msgfm.finetune.build import encoder_config, new_model
from msgfm.finetune.data import TaskDataset
from msgfm.finetune.train import finetune
from msgfm.tasks.downstream import RestorationTask
from msgfm.tasks.metrics import RestorationMetrics, scalars

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def ben_shards(tmp_path_factory) -> Path:
    try:
        s1, s2 = bigearthnet_examples()
    except FetchError as err:
        pytest.skip(f"cannot download bigearthnet-common with pip: {err}")
    out = tmp_path_factory.mktemp("ben")
    assert convert_pretraining_kind(["bigearthnet", "--s1", str(s1), "--s2", str(s2), "-o", str(out),
                                     "--workers", "1"]) == 0
    write_stats(sorted(out.glob("*.h5")), progress=False)
    return out


def test_ben_finetune_mlflow_resume_and_eval_only(single_rank_dist, ben_shards, tmp_path, capsys):
    pretrained = write_pretraining_checkpoint(tmp_path / "pretrain")
    out = tmp_path / "run"
    args = dict(pretrained=str(pretrained), data_root=str(ben_shards), output_dir=str(out), task_name="ben")
    # 6 real patches, batch 4: 1 step per epoch; the validation split is the training split (a tiny overfit)
    assert finetune("ft_ben_tiny", ["schedule.epochs=6", "train.log_interval=1"], "ds_configs/cpu.json", **args) == 0
    printed = capsys.readouterr().out
    assert "sensor embeddings: {'sar': 'pretrained', 's2': 'pretrained'}" in printed
    records = _read_jsonl(out / "metrics.jsonl")
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    val = [r for r in records if "val/mAP_micro" in r]
    assert len(losses) == 6 and len(val) == 6
    assert sum(losses[-2:]) < sum(losses[:2])  # it learns
    assert all(0 < r["val/mAP_micro"] <= 1 and 0 < r["val/mAP_macro"] <= 1 for r in val)
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["mAP_micro"] == pytest.approx(max(r["val/mAP_micro"] for r in val))
    with capsys.disabled():
        print(f"\nTINY-REAL ben: mAP_micro={best['mAP_micro']:.4f} mAP_macro={best['mAP_macro']:.4f} "
              f"(classes without positives: {best['classes_without_positives']:.0f} of 19)")

    from mlflow import MlflowClient

    from msgfm.train.tracking import run_artifacts

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db")
    run_id = (out / "mlflow_run_id").read_text().strip()
    history = client.get_metric_history(run_id, "val/mAP_micro")
    assert len(history) == 6
    repository = run_artifacts(client, out, run_id)  # locations relative to the run folder
    artifacts = {a.path for a in repository.list_artifacts()}
    assert {"best", "tables", "config"} <= artifacts
    assert [a.path for a in repository.list_artifacts("best")] == ["best/metrics.json", "best/model.pt"]

    # auto-resume: two more epochs continue from the last checkpoint (epoch 6, step 6); more epochs change the
    # schedule, so the relaunch says so (--allow-config-change)
    assert finetune("ft_ben_tiny", ["schedule.epochs=8", "train.log_interval=1"], "ds_configs/cpu.json", **args,
                    allow_config_change=True) == 0
    assert "at step 6 (epoch 6)" in capsys.readouterr().out
    assert (out / "checkpoints" / "latest").read_text() == "step00000008"
    assert len(client.get_metric_history(run_id, "val/mAP_micro")) == 8  # the same MLflow run goes on

    # --eval-only on the run folder reproduces the best epoch's numbers
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert finetune("ft_ben_tiny", ["tracking.enabled=false"], "ds_configs/cpu.json", task_name="ben",
                    pretrained=None, data_root=str(ben_shards), output_dir=str(tmp_path / "eval"), eval_only=True,
                    checkpoint=str(out)) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval" / "metrics.json").read_text())["val"]
    assert evaluated["mAP_micro"] == pytest.approx(best["mAP_micro"], abs=1e-6)


def test_spacenet_pansharpening_real_pair(single_rank_dist, realdata, tmp_path, capsys):
    folder = realdata / "spacenet6_rotterdam"
    shards = tmp_path / "shards"
    assert convert(["spacenet", "--pair", str(folder / "pan1.tif"), str(folder / "ms1.tif"), "--ms-band-order",
                    "red,green,blue,nir1", "--size", "64", "-o", str(shards), "--workers", "1"]) == 0
    write_stats(sorted(shards.glob("*.h5")), progress=False)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"no patch embedding for sensor\(s\) \['pan', 'wv2_ms'\]"):
        assert finetune("ft_spacenet_tiny", ["tracking.enabled=false", "schedule.epochs=2"], "ds_configs/cpu.json",
                        task_name="spacenet", pretrained=str(write_pretraining_checkpoint(tmp_path / "pre")),
                        data_root=str(shards), output_dir=str(out)) == 0
    best = json.loads((out / "best" / "metrics.json").read_text())
    # the no-learning baseline of Wald's protocol: the degraded MS, upsampled bicubically
    cfg = load_finetune_config("ft_spacenet_tiny")
    stats = load_stats(shards / "stats.json")
    task = new_model(cfg, encoder_config(cfg, None), stats)
    assert isinstance(task, RestorationTask)
    dataset = TaskDataset(sorted(shards.glob("*.h5")), cfg.task, stats, train=False)
    baseline = RestorationMetrics(cfg.task.data_range, ergas_ratio=2)
    for i in range(len(dataset)):
        batch = {k: (v[None] if torch.is_tensor(v) else v) for k, v in dataset[i].items()}
        batch["images"] = {s: x[None] for s, x in dataset[i]["images"].items()}
        baseline.update(task.base_physical(batch), batch["target"])
    base = scalars(baseline.compute())
    assert 15 < base["PSNR"] < 60 and 0 < base["SSIM"] < 1 and base["ERGAS"] > 0
    assert set(best) >= {"PSNR", "SSIM", "SAM", "ERGAS"} and best["PSNR"] > 10
    assert (out / "outputs" / "epoch0001" / "val_predictions.png").stat().st_size > 1000
    print(f"\nTINY-REAL spacenet: model PSNR={best['PSNR']:.2f} SSIM={best['SSIM']:.4f} SAM={best['SAM']:.3f} "
          f"ERGAS={best['ERGAS']:.3f}; bicubic baseline PSNR={base['PSNR']:.2f} SSIM={base['SSIM']:.4f} "
          f"SAM={base['SAM']:.3f} ERGAS={base['ERGAS']:.3f}")


def test_spacenet_building_segmentation_real_mask(single_rank_dist, realdata, tmp_path):
    folder = realdata / "spacenet4_atlanta_buildings"
    shards = tmp_path / "shards"
    assert convert(["spacenet-buildings", str(folder / "sample_geotiff.tif"), str(folder / "sample_b_mask_inner.tif"),
                    "--size", "128", "-o", str(shards), "--workers", "1"]) == 0
    write_stats(sorted(shards.glob("*.h5")), progress=False)
    out = tmp_path / "run"
    assert finetune("ft_spacenet_buildings_tiny", ["tracking.enabled=false", "schedule.epochs=2",
                                                   "schedule.warmup_epochs=0", "train.max_steps=6",
                                                   "train.max_eval_batches=3", "task.eval_overlap=0"],
                    "ds_configs/cpu.json",
                    task_name="spacenet_buildings", pretrained=str(write_pretraining_checkpoint(tmp_path / "pre")),
                    data_root=str(shards), output_dir=str(out)) == 0
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert 0 <= best["mIoU"] <= 1 and 0 < best["OA"] <= 1
    table = (out / "outputs" / "epoch0001" / "val_per_class.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in table] == ["class", "background", "building"]
    print(f"\nTINY-REAL spacenet_buildings: mIoU={best['mIoU']:.4f} OA={best['OA']:.4f} "
          f"IoU(building)={float(table[2].split(',')[1]):.4f}")
