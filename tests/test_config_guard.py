"""A relaunch into a run folder is compared with the checkpoint's config (msgfm/train/config_guard.py):
architecture changes are refused, other changes need --allow-config-change and are then recorded."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_finetune import _run, vaihingen_shards  # noqa: F401 (a fixture)
from test_train_support import REPO, child_env, write_tiny_run

from msgfm.config import load_config, load_finetune_config
from msgfm.errors import UserError
from msgfm.train.config_guard import (
    ALLOW_FLAG,
    CHANGES_FILE,
    Change,
    check_resume,
    checkpoint_config,
    classify,
    diff_configs,
    guard_resume,
)
from msgfm.train.tracking import run_artifacts


def _diff(*overrides: str, base: tuple[str, ...] = ()) -> dict[str, Change]:
    old = load_config("demo_cpu", base).to_dict()
    new = load_config("demo_cpu", [*base, *overrides]).to_dict()
    return {c.key: c for c in diff_configs(old, new)}


def test_identical_configs_differ_in_nothing_even_after_a_json_round_trip():
    cfg = load_config("demo_cpu").to_dict()
    assert diff_configs(json.loads(json.dumps(cfg)), cfg) == []  # moe.blocks' int keys come back as strings
    assert diff_configs(yaml.safe_load(yaml.safe_dump(cfg)), cfg) == []
    assert diff_configs(cfg, load_config("demo_cpu", ["optimizer.eps=1.0e-8"]).to_dict()) == []  # same value


def test_each_change_is_named_and_classified():
    changes = _diff("data.groups.rgb.lr=0.003", "data.groups.sen12ms.batch_size_per_gpu=1", "model.embed_dim=64",
                    "model.num_heads=[2, 4, 8, 16]", "train.max_steps=99", "masking.mask_ratio=0.5")
    assert set(changes) == {"data.groups.rgb.lr", "data.groups.sen12ms.batch_size_per_gpu", "model.embed_dim",
                            "model.num_heads", "train.max_steps", "masking.mask_ratio"}
    lr = changes["data.groups.rgb.lr"]
    assert (lr.kind, lr.data_order, lr.new) == ("training", False, 0.003)
    assert changes["data.groups.sen12ms.batch_size_per_gpu"].data_order  # the batches drawn from now on differ
    assert changes["model.embed_dim"].kind == changes["model.num_heads"].kind == "architecture"
    assert changes["train.max_steps"].kind == "run" and changes["masking.mask_ratio"].kind == "training"
    assert str(changes["model.embed_dim"]) == "model.embed_dim: 32 -> 64"


def test_groups_compare_by_name_and_the_sensors_they_bring_are_architecture():
    one_group = 'data.groups=[{name: rgb, sensors: [rgb], shards: ["rgb/*.h5"], lr: 1.0e-4}]'
    dropped = _diff(one_group, base=("model.sensors=[]",))  # the model's sensors: those of the groups
    assert dropped["data.groups.sen12ms"].new == "(absent)" and dropped["data.groups.sen12ms"].data_order
    assert dropped["model.sensors"].kind == "architecture"  # sar, s2 and dsm would lose their embeddings
    assert "data.groups.rgb.lr" in dropped  # the rgb group itself is compared key by key
    assert "model.sensors" not in _diff(one_group)  # listed in model.sensors: every embedding is still built
    assert classify("sensors.landsat.bands") == classify("model.moe.blocks.2") == "architecture"
    assert classify("tracking.log_interval") == classify("kernels.attention") == classify("data.root") == "run"
    assert classify("data.groups.rgb.num_workers") == "run" and classify("train.seed") == "training"


def test_fine_tuning_heads_and_inputs_are_architecture():
    old = load_finetune_config("ft_ben_tiny").to_dict()
    new = load_finetune_config("ft_ben_tiny", ["task.num_classes=5", "transfer.method=separate",
                                               "train.lr=0.5"]).to_dict()
    kinds = {c.key: c.kind for c in diff_configs(old, new)}
    assert kinds == {"task.num_classes": "architecture", "transfer.method": "architecture", "train.lr": "training"}


def test_refusals_name_the_keys_and_the_flag(tmp_path):
    changes = list(_diff("data.groups.rgb.lr=0.003", "train.max_steps=99").values())
    with pytest.raises(UserError, match=rf"data\.groups\.rgb\.lr: 0\.002 -> 0\.003; relaunch with {ALLOW_FLAG}"):
        check_resume(changes, tmp_path / "step00000004", allow_change=False)
    check_resume(changes, tmp_path, allow_change=True)
    check_resume([c for c in changes if c.kind == "run"], tmp_path, allow_change=False)  # no flag needed
    architecture = list(_diff("model.embed_dim=64").values())
    with pytest.raises(UserError, match="the model differs .* model.embed_dim: 32 -> 64; a changed architecture"):
        check_resume(architecture, tmp_path, allow_change=True)  # no flag makes the weights fit


def test_the_checkpoint_config_is_read_from_config_json_or_from_an_older_checkpoint(tmp_path, capsys):
    from test_finetune import write_pretraining_checkpoint

    run = write_pretraining_checkpoint(tmp_path / "old")  # no config.json: the model-states client state
    older = run / "checkpoints" / "step00000001"
    recorded = checkpoint_config(older)
    assert recorded is not None and recorded["name"] == "demo_cpu"
    assert diff_configs(recorded, load_config("demo_cpu", ["model.moe.expert_parallel_size=1"]).to_dict()) == []
    with pytest.raises(UserError, match="model.moe.expert_parallel_size: 1 -> 2"):
        guard_resume(older, load_config("demo_cpu").to_dict(), allow_change=True, rank=0)
    newer = tmp_path / "step00000002"
    newer.mkdir()
    (newer / "config.json").write_text(json.dumps(load_config("demo_cpu").to_dict()))
    accepted = guard_resume(newer, load_config("demo_cpu", ["schedule.epochs=9"]).to_dict(), True, rank=0)
    assert [(c.key, c.kind) for c in accepted] == [("schedule.epochs", "training")]
    assert "config changed since step00000002: schedule.epochs: 40 -> 9 [accepted (--allow-config-change)]" in \
        capsys.readouterr().out


# --------------------------------------------------------------------------------------------- real processes


def _launch(tiny: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launchers/pretrain.py", *args, "--deepspeed_config", str(tiny / "ds_tiny.json"),
           "--config", str(tiny / "tiny.yaml"), "--output-dir", str(out), "model.moe.expert_parallel_size=1",
           "data.epoch=largest_group_once"]  # every group in every step, as the LRs the test compares assume
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=child_env(OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_relaunch_with_a_changed_config_is_refused_then_resumed_and_recorded_with_the_flag(tmp_path):
    from mlflow import MlflowClient

    tiny = write_tiny_run(tmp_path, samples_per_group=12)
    out = tmp_path / "run"
    first = _launch(tiny, out, "train.max_steps=2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # the rgb LR x10 (3e-3 -> 3e-2), the override placed before the options: refused, nothing trained
    refused = _launch(tiny, out, "data.groups.rgb.lr=0.03", "train.max_steps=3")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("pretrain: error: the config differs from the checkpoint") and "step00000002" in line
    assert "data.groups.rgb.lr: 0.003 -> 0.03" in line and ALLOW_FLAG in line and "max_steps" not in line
    # an architecture change: refused whatever the flag, in one line, before any model is built
    other_model = _launch(tiny, out, ALLOW_FLAG, "model.embed_dim=48")
    assert other_model.returncode == 2 and "Traceback" not in other_model.stderr
    assert "model.embed_dim: 32 -> 48" in other_model.stderr.strip().splitlines()[-1]
    assert not (out / CHANGES_FILE).exists()
    # with the flag: resumes, prints, records in the run folder and MLflow
    allowed = _launch(tiny, out, "data.groups.rgb.lr=0.03", "train.max_steps=3", ALLOW_FLAG)
    assert allowed.returncode == 0, allowed.stdout[-3000:] + allowed.stderr[-3000:]
    assert "config changed since step00000002: data.groups.rgb.lr: 0.003 -> 0.03 [accepted" in allowed.stdout
    assert f"resumed from {out / 'checkpoints' / 'step00000002'} at step 2" in allowed.stdout
    [row] = [json.loads(x) for x in (out / CHANGES_FILE).read_text().splitlines()]
    assert row["step"] == 2 and row["checkpoint"] == "step00000002"
    assert {(c["key"], c["old"], c["new"], c["kind"]) for c in row["changes"]} == {
        ("data.groups.rgb.lr", 0.003, 0.03, "training"), ("train.max_steps", 2, 3, "run")}
    assert load_config(out / "config.yaml").data.group("rgb").lr == 0.03  # the run folder holds the new config
    assert json.loads((out / "checkpoints" / "step00000003" / "config.json").read_text())["data"]["groups"][0][
        "lr"] == 0.03  # and so does the checkpoint written after the change
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    key = "lr/sensor/rgb"  # single-update mode logs each parameter group's rate: the rgb embedding and decoder
    lr3 = [r[key] for r in metrics if r["step"] == 3 and key in r]
    lr2 = [r[key] for r in metrics if r["step"] == 2 and key in r]
    assert lr3 and lr2 and lr3[0] > 5 * lr2[0]  # the new LR is the one trained with
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    run = client.get_run((out / "mlflow_run_id").read_text().strip())
    assert run.data.params["changed.step2.data.groups.rgb.lr"] == "0.03"
    assert run.data.params["config.data.groups"].count("0.003") == 1  # the original params stay as they were
    assert "data.groups.rgb.lr: 0.003 -> 0.03" in run.data.tags["config_change.step00000002"]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "config/changes")] == [(2, 2.0)]
    assert {"config/config_changes.jsonl", "config/config.yaml"} <= {  # the run folder's own artifact store
        a.path for a in run_artifacts(client, out, run.info.run_id).list_artifacts("config")}


@pytest.mark.slow
def test_fine_tuning_resumes_are_guarded_the_same_way(single_rank_dist, vaihingen_shards, tmp_path):  # noqa: F811
    out = tmp_path / "ft"
    base = ("transfer.init=random", "schedule.epochs=2")
    assert _run("ft_vaihingen_tiny", vaihingen_shards, out, *base, "train.max_steps=1", task_name="vaihingen") == 0
    old_lr = load_finetune_config("ft_vaihingen_tiny").train.lr
    with pytest.raises(UserError, match=rf"train\.lr: {old_lr} -> 0\.5; relaunch with {ALLOW_FLAG}"):
        _run("ft_vaihingen_tiny", vaihingen_shards, out, *base, "train.lr=0.5", "train.max_steps=2")
    with pytest.raises(UserError, match=r"the model differs .*transfer\.head_channels: \d+ -> 8"):
        _run("ft_vaihingen_tiny", vaihingen_shards, out, *base, "transfer.head_channels=8", "train.max_steps=2",
             allow_config_change=True)
    assert not (out / CHANGES_FILE).exists() and (out / "checkpoints" / "latest").read_text() == "step00000001"
    assert _run("ft_vaihingen_tiny", vaihingen_shards, out, *base, "train.lr=0.5", "train.max_steps=2",
                allow_config_change=True) == 0
    [row] = [json.loads(x) for x in (out / CHANGES_FILE).read_text().splitlines()]
    assert row["step"] == 1 and {c["key"]: c["new"] for c in row["changes"]} == {"train.lr": 0.5, "train.max_steps": 2}
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"
    assert load_finetune_config(out / "config.yaml").train.lr == 0.5
