"""How the groups update the model (1-rank gloo group, DeepSpeed ZeRO as the configs use it).

single_update: one optimizer step per iteration, the shared parameters at the reference group's rate,
each sensor at its group's rate. per_group: one step per group that leaves every other sensor's
parameters and optimizer state bit for bit as they were. In both, the rate is read inside the optimizer
call, so a rate set after engine.step() is caught.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train_support import write_tiny_ds_config, write_tiny_run

from msgfm.config import load_config
from msgfm.data.plan import plan_data
from msgfm.train.ds_config import load_ds_config
from msgfm.train.optim import parameter_owner
from msgfm.train.pretrain import build_trainer

pytestmark = pytest.mark.slow  # each test builds a DeepSpeed engine and trains a few tiny steps (~10-20 s)

SENSORS_OF = {"rgb": {"rgb"}, "sen12ms": {"sar", "s2"}, "mdas": {"dsm", "rgb"}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = write_tiny_run(tmp_path_factory.mktemp("modes"), samples_per_group=12)
    write_tiny_ds_config(folder)
    return folder


def make_trainer(tiny: Path, out: Path, *overrides: str, zero_stage: int = 2, tracking: bool = False):
    cfg = load_config(tiny / "tiny.yaml", ["model.moe.expert_parallel_size=1", "train.checkpoint_interval=100",
                                           *overrides])
    ds = load_ds_config(tiny / "ds_tiny.json")
    ds["zero_optimization"]["stage"] = zero_stage
    return build_trainer(cfg, ds, plan_data(cfg, tiny / "data"), out, tracking=tracking)


def logged_rows(trainer, out: Path) -> dict[int, dict[str, float]]:
    trainer.tracker.close()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def snapshot(trainer) -> dict[str, dict[str, torch.Tensor]]:
    """Per owner (sensor name or "shared"): its model parameters and the optimizer's tensors of its groups
    (ZeRO's flat fp32 partition, Adam's moments and step count)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in trainer.engine.module.named_parameters():
        out.setdefault(parameter_owner(name) or "shared", {})[name] = p.detach().clone()
    inner = trainer.gate.optimizer
    for i, group in enumerate(inner.param_groups):
        owner = group.get("sensor") or "shared"
        for j, flat in enumerate(group["params"]):
            out[owner][f"opt/{i}/{j}/param"] = flat.detach().clone()
            for key, value in inner.state[flat].items():
                out[owner][f"opt/{i}/{j}/{key}"] = torch.as_tensor(value).clone()
    return out


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    assert before.keys() == after.keys()
    return [k for k in before if not torch.equal(before[k], after[k])]


def one_step_of_every_group(trainer) -> list[tuple[str, dict]]:
    """The batches of a step that holds every group (the scheduler's epoch layout aside)."""
    batches: dict[str, dict] = {}
    for step_batches in trainer.data:
        batches.update(dict(step_batches))
        if len(batches) == 3:
            return list(batches.items())
    raise AssertionError("an epoch without every group")


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_per_group_step_leaves_other_sensors_bit_identical(tiny, single_rank_dist, tmp_path, zero_stage):
    t = make_trainer(tiny, tmp_path, "train.mode=per_group", zero_stage=zero_stage)
    batches = one_step_of_every_group(t)
    t.train_step(batches)  # every sensor stepped once: every optimizer state exists
    t.step += 1
    for group, batch in batches:
        before = snapshot(t)
        t.train_step([(group, batch)])
        after = snapshot(t)
        for owner in before:
            moved = changed(before[owner], after[owner])
            if owner == "shared" or owner in SENSORS_OF[group]:
                assert moved, f"{group}'s step did not move {owner}"
                assert any(k.endswith("exp_avg") for k in moved), owner
            else:  # no Adam momentum, no weight decay, not even the step count
                assert not moved, f"{group}'s step changed {owner}: {moved[:4]}"
    assert t.engine.global_steps == 3 + 3  # one optimizer step per group


def test_single_update_takes_one_step_per_iteration_at_per_sensor_rates(tiny, single_rank_dist, tmp_path):
    t = make_trainer(tiny, tmp_path, "train.mode=single_update", "train.max_steps=4", tracking=True)
    assert t.settings.mode == "single_update" and t.data.steps_per_epoch == 4
    t.fit()
    rows = logged_rows(t, tmp_path)
    assert t.engine.global_steps == 4  # one optimizer step per iteration, whatever groups it held
    base = t.base_lrs  # peak rates: 3e-3, 1.5e-3, 1e-3 (the tiny config does not scale them)
    for step, row in rows.items():
        factor = t.schedule.factor(step - 1)  # warm-up: a different rate every step
        assert row["lr/shared"] == pytest.approx(base["rgb"] * factor, rel=1e-12)
        assert row["lr/sensor/sar"] == row["lr/sensor/s2"] == pytest.approx(base["sen12ms"] * factor, rel=1e-12)
        assert row["lr/sensor/dsm"] == pytest.approx(base["mdas"] * factor, rel=1e-12)
        if "lr/sensor/rgb" in row:  # RGB, in two groups, takes the larger rate
            assert row["lr/sensor/rgb"] == pytest.approx(base["rgb"] * factor, rel=1e-12)
    assert sum("lr/sensor/rgb" in r for r in rows.values()) == 4  # rgb or mdas in every step
    assert not any(k.startswith("lr/rgb") for r in rows.values() for k in r)


def test_single_update_leaves_sensors_of_absent_groups_bit_identical(tiny, single_rank_dist, tmp_path):
    t = make_trainer(tiny, tmp_path, "train.mode=single_update")
    batches = one_step_of_every_group(t)
    t.train_step(batches)
    t.step += 1
    before = snapshot(t)
    t.train_step([(g, b) for g, b in batches if g == "sen12ms"])
    after = snapshot(t)
    assert changed(before["shared"], after["shared"]) and changed(before["sar"], after["sar"])
    for owner in ("rgb", "dsm"):
        assert not changed(before[owner], after[owner]), owner
    assert t.engine.global_steps == 2


@pytest.mark.parametrize("mode", ["per_group", "single_update"])
def test_rates_are_recorded_as_the_optimizer_saw_them(tiny, single_rank_dist, tmp_path, mode):
    """The recorded rate is read inside the optimizer call: setting it after engine.step() (the step would
    then run at the previous rate) makes these differ from the schedule."""
    t = make_trainer(tiny, tmp_path, f"train.mode={mode}", "train.max_steps=3", "data.epoch=largest_group_once",
                     tracking=True)
    calls = []
    t.gate.optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(t.step))
    t.fit()
    rows = logged_rows(t, tmp_path)
    key = "lr/rgb" if mode == "per_group" else "lr/shared"
    assert [rows[s][key] for s in (1, 2, 3)] == [pytest.approx(t.base_lrs["rgb"] * t.schedule.factor(s), rel=1e-12)
                                                for s in (0, 1, 2)]
    assert len(set(rows[s][key] for s in (1, 2, 3))) == 3
    assert calls  # the hooks ran inside DeepSpeed's step
