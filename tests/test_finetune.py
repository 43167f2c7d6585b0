"""Fine-tuning: task plumbing (sliding windows, Wald degradation, units), the dataset, every shipped
ft_* config, and end-to-end runs on fixtures in the real Vaihingen and SEN12MS-CR layouts."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from fixtures.make_sen12mscr import write_sen12mscr
from fixtures.make_spacenet2 import write_spacenet2
from fixtures.make_vaihingen import write_vaihingen

from msgfm.config import list_configs, load_config
from msgfm.config.finetune import load_finetune_config
from msgfm.data.convert import run as convert
from msgfm.data.stats import load_stats, write_stats
from msgfm.finetune.build import encoder_config, new_model
from msgfm.finetune.data import TaskDataset
from msgfm.finetune.options import scaled_rates
from msgfm.finetune.train import finetune
from msgfm.tasks import build_pretrain_task
from msgfm.tasks.downstream import RestorationTask, degrade, sliding_window, window_starts

FT_CONFIGS = [n for n in list_configs() if n.startswith("ft_")]
REPO_ROOT = Path(__file__).resolve().parents[1]


def write_pretraining_checkpoint(folder: Path) -> Path:
    """A pretraining run folder holding one checkpoint in the DeepSpeed layout msgfm.train writes
    (mp_rank_00_model_states.pt with 'module' and the resolved config), of the tiny demo_cpu model."""
    ckpt = folder / "checkpoints" / "step00000001"
    ckpt.mkdir(parents=True)
    run_cfg = load_config("demo_cpu", ["model.moe.expert_parallel_size=1"])
    torch.manual_seed(0)
    torch.save({"module": build_pretrain_task(run_cfg).state_dict(), "msgfm": {"config": run_cfg.to_dict()}},
               ckpt / "mp_rank_00_model_states.pt")
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 1, "world_size": 1, "tag": ckpt.name}))
    (folder / "checkpoints" / "latest").write_text(ckpt.name)
    return folder


@pytest.mark.parametrize("name", FT_CONFIGS)
def test_shipped_configs_load(name):
    cfg = load_finetune_config(name)
    assert cfg.task.kind in ("multilabel", "segmentation", "restoration")
    assert cfg.data.train, f"{name}: no training shards configured"


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="transfer.layer_decay"):
        load_finetune_config("ft_ben_tiny", ["transfer.layer_decay=1.5"])
    with pytest.raises(ValueError, match="task.sensors"):
        load_finetune_config("ft_ben_tiny", ["task.sensors=[landsat]"])
    with pytest.raises(ValueError, match="unknown config key 'task.clases'"):
        load_finetune_config("ft_ben_tiny", ["task.clases=3"])


def test_window_starts_cover_and_sliding_window_is_exact_for_pixelwise_models():
    assert window_starts(128, 64, 0.5) == [0, 32, 64]
    assert window_starts(100, 64, 0.5) == [0, 32, 36]
    with pytest.raises(ValueError, match="smaller than the inference window"):
        window_starts(32, 64, 0.5)
    conv = torch.nn.Conv2d(3, 5, 1)
    images = {"rgb": torch.randn(2, 3, 100, 90)}
    with torch.no_grad():
        logits = sliding_window(lambda x: conv(x["rgb"]), images, 64, 0.5)
        torch.testing.assert_close(logits, conv(images["rgb"]))


def test_degrade_is_block_average_then_bicubic():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # the fine detail is gone: an image with the same 2x2 block means degrades to the same image
    same_means = x + torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(2, 2)
    torch.testing.assert_close(degrade(same_means, 2), degrade(x, 2))
    assert not torch.equal(degrade(x, 2), x) and degrade(x, 2).shape == x.shape
    torch.testing.assert_close(degrade(torch.full((1, 2, 8, 8), 3.0), 4), torch.full((1, 2, 8, 8), 3.0))
    with pytest.raises(ValueError, match="resolution_ratio=3"):
        degrade(x, 3)


@pytest.fixture(scope="module")
def vaihingen_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vaihingen")
    write_vaihingen(root / "raw", height=100, width=120)
    convert(["vaihingen", str(root / "raw"), "-o", str(root / "shards"), "--size", "128", "--workers", "1"])
    write_stats(sorted((root / "shards").glob("*.h5")), progress=False)
    return root / "shards"


def test_dataset_flips_images_and_masks_together(vaihingen_shards):
    cfg = load_finetune_config("ft_vaihingen_tiny")
    stats = load_stats(vaihingen_shards / "stats.json")
    shards = sorted(vaihingen_shards.glob("*.h5"))
    plain = TaskDataset(shards, cfg.task, stats, train=False)
    flipped = TaskDataset(shards, cfg.task, stats, train=True, hflip=True)
    sample = plain[0]
    assert sample["images"]["rgb"].shape == (3, 128, 128) and sample["target"].dtype == torch.int64
    assert set(sample["target"].unique().tolist()) <= set(range(6)) | {255}
    seen = set()
    for _ in range(20):
        other = flipped[0]
        is_flip = torch.equal(other["images"]["rgb"], sample["images"]["rgb"].flip(-1))
        assert is_flip or torch.equal(other["images"]["rgb"], sample["images"]["rgb"])
        assert torch.equal(other["target"], sample["target"].flip(-1) if is_flip else sample["target"])
        assert torch.equal(other["images"]["dsm"], sample["images"]["dsm"].flip(-1) if is_flip else
                           sample["images"]["dsm"])
        seen.add(is_flip)
    assert seen == {True, False}
    cropped = TaskDataset(shards, cfg.task, stats, train=True, crop=64, ids=[plain.all_ids[1]])
    assert len(cropped) == 1 and cropped[0]["target"].shape == (64, 64)


def test_restoration_units_round_trip(tmp_path):
    write_sen12mscr(tmp_path / "raw", size=64)
    convert(["sen12mscr", str(tmp_path / "raw"), "-o", str(tmp_path / "s"), "--workers", "1"])
    stats = load_stats(write_stats(sorted((tmp_path / "s").glob("*.h5")), progress=False))
    cfg = load_finetune_config("ft_sen12mscr_tiny")
    task = new_model(cfg, encoder_config(cfg, None), stats)
    assert isinstance(task, RestorationTask)
    dataset = TaskDataset(sorted((tmp_path / "s").glob("*.h5")), cfg.task, stats, train=False)
    sample = dataset[0]
    assert sample["target"].shape == (12, 64, 64) and 0 <= sample["target"].min() and sample["target"].max() <= 1
    torch.testing.assert_close(task.physical(task.normalize(sample["target"][None])), sample["target"][None])
    # the cloudy input is brighter than the cloud-free target somewhere (the fixture's cloud)
    base = task.base_physical({"images": {k: v[None] for k, v in sample["images"].items()}})
    assert (base - sample["target"]).max() > 0.3


def _run(config: str, root: Path, out: Path, *overrides: str, pretrained: Path | None = None, **kwargs) -> int:
    return finetune(config, ["tracking.enabled=false", *overrides], "ds_configs/cpu.json",
                    pretrained=str(pretrained) if pretrained else None, data_root=str(root), output_dir=str(out),
                    **kwargs)


@pytest.mark.slow
def test_vaihingen_end_to_end_random_init(single_rank_dist, vaihingen_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run("ft_vaihingen_tiny", vaihingen_shards, out, "transfer.init=random", "schedule.epochs=2",
                task_name="vaihingen") == 0
    printed = capsys.readouterr().out
    assert "val: mIoU=" in printed and "OA=" in printed
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert 0 <= best["mIoU"] <= 1 and 0 <= best["OA"] <= 1
    assert (out / "outputs" / "epoch0001" / "val_predictions.png").stat().st_size > 1000
    table = (out / "outputs" / "epoch0001" / "val_per_class.csv").read_text().splitlines()
    assert table[0] == "class,IoU,F1" and table[2].startswith("building,")
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"  # 2 areas x 1 tile / batch 2, 2 epochs
    # --eval-only on the fine-tuned run, through the launcher's main(), gives the best epoch's numbers again
    assert launcher().main(["--deepspeed_config", "ds_configs/cpu.json", "--task", "vaihingen", "--config",
                            "ft_vaihingen_tiny", "--data-root", str(vaihingen_shards), "--output-dir",
                            str(tmp_path / "eval"), "--eval-only", "--checkpoint", str(out),
                            "tracking.enabled=false"]) == 0
    again = json.loads((tmp_path / "eval" / "eval" / "metrics.json").read_text())["val"]
    assert again["mIoU"] == pytest.approx(best["mIoU"], abs=1e-6)


@pytest.mark.slow
def test_sen12mscr_end_to_end_from_pretrained(single_rank_dist, tmp_path, capsys):
    write_sen12mscr(tmp_path / "raw", size=64)
    convert(["sen12mscr", str(tmp_path / "raw"), "-o", str(tmp_path / "shards"), "--workers", "1"])
    write_stats(sorted((tmp_path / "shards").glob("*.h5")), progress=False)
    pretrained = write_pretraining_checkpoint(tmp_path / "pretrain")
    out = tmp_path / "run"
    # the task config file asks for a wider encoder (its model section is for init random): the checkpoint's
    # architecture (embed 32) is what gets built
    wider = tmp_path / "ft_wider.yaml"
    wider.write_text("_base_: ft_sen12mscr_tiny\nmodel:\n  embed_dim: 48\n  num_heads: [2, 4, 8, 16]\n")
    assert _run(str(wider), tmp_path / "shards", out, "train.max_steps=2", pretrained=pretrained,
                task_name="sen12mscr") == 0
    printed = capsys.readouterr().out
    assert "sensor embeddings: {'sar': 'pretrained', 's2': 'pretrained'}" in printed
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert set(best) >= {"MAE", "SAM", "SSIM", "PSNR"} and 0 < best["MAE"] < 1 and best["SAM"] > 0
    assert (out / "outputs" / "epoch0001" / "val_predictions.png").is_file()
    assert "transfer: " in (out / "transfer.txt").read_text()
    assert load_finetune_config(out / "config.yaml").model.embed_dim == 32  # the run records what it built
    # --eval-only rebuilds that encoder from the run's config.yaml, whatever the task config says
    assert _run(str(wider), tmp_path / "shards", tmp_path / "eval", eval_only=True,
                checkpoint=str(out / "best" / "model.pt")) == 0
    again = json.loads((tmp_path / "eval" / "eval" / "metrics.json").read_text())["val"]
    assert again["MAE"] == pytest.approx(best["MAE"], rel=1e-5)


def test_ft_ben_defaults_are_gfms_bigearthnet_setup():
    cfg = load_finetune_config("ft_ben")  # GFM: configs/BEN.yaml over config.py's defaults
    assert (cfg.model.img_size, cfg.model.window_size, cfg.model.drop_path_rate) == (128, 4, 0.1)
    s = cfg.schedule
    assert (s.epochs, s.warmup_epochs, s.kind, s.warmup_start_lr, s.min_lr) == (100, 20, "cosine", 1e-7, 1e-5)
    assert (cfg.train.lr, cfg.train.lr_reference_batch, cfg.transfer.layer_decay) == (1e-4, 512, 0.9)
    assert (cfg.optimizer.weight_decay, cfg.data.batch_size_per_gpu, cfg.data.eval_batch_size_per_gpu) == \
        (0.05, 128, 128)


@pytest.mark.parametrize("world, reference, factor", [(8, 512, 2.0), (1, 512, 0.25), (8, None, 1.0)])
def test_linear_lr_scaling_multiplies_every_rate_by_global_batch_over_reference(world, reference, factor):
    cfg = load_finetune_config("ft_ben", [f"train.lr_reference_batch={'null' if reference is None else reference}"])
    rates = scaled_rates(cfg, world)
    assert rates.global_batch == 128 * world and rates.factor == pytest.approx(factor)
    assert rates.lr == pytest.approx(1e-4 * factor)
    assert (rates.schedule.warmup_start_lr, rates.schedule.min_lr) == (pytest.approx(1e-7 * factor),
                                                                      pytest.approx(1e-5 * factor))
    assert rates.schedule.epochs == cfg.schedule.epochs and cfg.schedule.min_lr == 1e-5  # the config is unchanged
    with pytest.raises(ValueError, match="train.lr_reference_batch"):
        load_finetune_config("ft_ben", ["train.lr_reference_batch=0"])


def test_finetuning_trains_at_the_scaled_rates(single_rank_dist, vaihingen_shards, tmp_path, monkeypatch, capsys):
    seen = {}

    class Built(Exception):
        pass

    def trainer_spy(engine, data, *, base_lrs, schedule, **_):
        seen.update(base_lrs=base_lrs, schedule=schedule, optimizer=[g["lr"] for g in engine.optimizer.param_groups])
        raise Built  # everything the run trains with is built: stop before the steps

    monkeypatch.setattr("msgfm.finetune.train.Trainer", trainer_spy)
    with pytest.raises(Built):  # batch 2 x 1 rank / 8: every rate x 0.25
        _run("ft_vaihingen_tiny", vaihingen_shards, tmp_path / "run", "transfer.init=random",
             "train.lr_reference_batch=8", task_name="vaihingen")
    lr = seen["base_lrs"]["vaihingen"]
    assert lr == pytest.approx(1e-3 * 0.25)
    schedule = seen["schedule"]
    assert lr * schedule.factor(0) == pytest.approx(1e-5 * 0.25)  # warm-up start, scaled alike
    assert lr * schedule.factor(schedule.total_steps) == pytest.approx(1e-5 * 0.25)  # cosine floor
    assert max(seen["optimizer"]) == pytest.approx(lr)
    assert "LR: base 0.001 x global batch 2 / 8 = 0.00025; warm-up from 2.5e-06" in capsys.readouterr().out


def test_ft_spacenet_is_the_papers_8_band_worldview3_setup():
    task = load_finetune_config("ft_spacenet").task
    assert (task.sensors, task.target_sensor, task.resolution_ratio) == (["pan", "wv3_ms"], "wv3_ms", 4)
    assert load_finetune_config("ft_spacenet_tiny").task.sensors == ["pan", "wv2_ms"]  # its real data has 4 bands


@pytest.mark.slow
def test_spacenet2_8_band_pansharpening_end_to_end(single_rank_dist, tmp_path, capsys):
    write_spacenet2(tmp_path / "SpaceNet2")
    convert(["spacenet", str(tmp_path / "SpaceNet2"), "--size", "64", "-o", str(tmp_path / "shards"),
             "--workers", "1"])
    write_stats(sorted((tmp_path / "shards").glob("*.h5")), progress=False)
    out = tmp_path / "run"
    assert _run("ft_spacenet_tiny", tmp_path / "shards", out, "task.sensors=[pan, wv3_ms]",
                "task.target_sensor=wv3_ms", "task.resolution_ratio=4", "transfer.init=random", "train.max_steps=2",
                "train.max_eval_batches=1", "train.num_figures=0",
                task_name="spacenet") == 0
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["PSNR"] > 20 and 0 < best["SSIM"] <= 1 and best["SAM"] > 0  # 11-bit numbers, 8 bands scored


def launcher():
    """launchers/finetune.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("finetune_launcher", REPO_ROOT / "launchers" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launcher_reports_user_errors_in_one_line(tmp_path, capsys):
    rc = launcher().main(["--deepspeed_config", "ds_configs/cpu.json", "--task", "ben", "--config",
                          "ft_vaihingen_tiny", "--data-root", str(tmp_path)])
    assert rc == 2
    assert capsys.readouterr().err.strip() == ("finetune: error: --task ben but config 'ft_vaihingen_tiny' is for "
                                               "task 'vaihingen'; pass a config of that task (ft_ben*) or override "
                                               "task.name")


def test_layer_decay_reaches_the_deepspeed_optimizer(single_rank_dist):
    import deepspeed

    from msgfm.finetune.options import param_groups
    from msgfm.train.ds_config import load_ds_config
    from msgfm.train.optim import set_lr

    cfg = load_finetune_config("ft_ben_tiny", ["model.moe.enabled=false", "transfer.layer_decay=0.5"])
    model = new_model(cfg, encoder_config(cfg, None))
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5, depths=cfg.model.depths,
                          no_weight_decay=model.no_weight_decay())
    ds_config = {**load_ds_config("ds_configs/cpu.json"), "train_micro_batch_size_per_gpu": 2}
    ds_config.pop("train_batch_size", None)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1.0),
                                           config=ds_config, dist_init_required=False)
    set_lr(engine.optimizer, 1e-3)
    lrs = {g["layer_id"]: g["lr"] for g in engine.optimizer.param_groups}
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-3 * 0.5**9)
    assert sorted(lrs) == list(range(10))


def test_wrong_task_and_missing_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--task ben but config 'ft_vaihingen_tiny' is for task 'vaihingen'"):
        _run("ft_vaihingen_tiny", tmp_path, tmp_path / "o", task_name="ben")
    with pytest.raises(ValueError, match="--eval-only needs --checkpoint"):
        _run("ft_vaihingen_tiny", tmp_path, tmp_path / "o", eval_only=True)
    with pytest.raises(FileNotFoundError, match="data root"):
        _run("ft_vaihingen_tiny", tmp_path / "nothing", tmp_path / "o")


def test_dataset_errors_name_the_shard(vaihingen_shards):
    stats = load_stats(vaihingen_shards / "stats.json")
    shards = sorted(vaihingen_shards.glob("*.h5"))
    cfg = load_finetune_config("ft_vaihingen_tiny", ["task.sensors=[rgb, sar]"])
    with pytest.raises(ValueError, match=r"vaihingen-00000.h5: task.sensors \['sar'\] are not in this shard"):
        TaskDataset(shards, cfg.task, stats, train=False)
    cfg = load_finetune_config("ft_vaihingen_tiny", ["task.label=buildings"])
    with pytest.raises(ValueError, match="no labels/buildings"):
        TaskDataset(shards, cfg.task, stats, train=False)
