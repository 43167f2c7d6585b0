"""Checkpoints in one process (1-rank gloo group): round trip, atomic publishing, NaN stop."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_support import write_tiny_run

from msgfm.config import load_config
from msgfm.data.plan import plan_data
from msgfm.train import checkpoint as ckpt
from msgfm.train.ds_config import load_ds_config
from msgfm.train.pretrain import build_trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("ckpt"), samples_per_group=12)


def make_trainer(tiny: Path, out: Path, *overrides: str, tracking: bool = False):
    cfg = load_config(tiny / "tiny.yaml", ["model.moe.expert_parallel_size=1", "train.checkpoint_interval=2",
                                           *overrides])
    return build_trainer(cfg, load_ds_config(tiny / "ds_tiny.json"), plan_data(cfg, tiny / "data"), out,
                         tracking=tracking)


def optimizer_tensors(engine) -> list[torch.Tensor]:
    state = engine.optimizer.optimizer.state_dict()["state"]
    return [t for s in state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.numel() > 1]


@pytest.mark.slow
def test_round_trip_restores_params_optimizer_and_data(tiny, single_rank_dist, tmp_path):
    a = make_trainer(tiny, tmp_path, "train.max_steps=3", "train.mode=per_group", "data.epoch=largest_group_once")
    a.fit()
    root = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step00000002", "step00000003"]
    b = make_trainer(tiny, tmp_path, "train.max_steps=3", "train.mode=per_group", "data.epoch=largest_group_once")
    before = {n: p.detach().clone() for n, p in b.engine.module.named_parameters()}
    b.resume(ckpt.find_latest(root))
    params_a = dict(a.engine.module.named_parameters())
    changed = 0
    for name, p in b.engine.module.named_parameters():
        assert torch.equal(p, params_a[name]), name
        changed += not torch.equal(p, before[name])
    assert changed > 0  # the load really replaced the fresh initial weights
    opt_a, opt_b = optimizer_tensors(a.engine), optimizer_tensors(b.engine)
    assert opt_a and len(opt_a) == len(opt_b) and all(torch.equal(x, y) for x, y in zip(opt_a, opt_b))
    assert b.step == 3 and b.data.step == a.data.step == 3
    assert b.engine.global_steps == a.engine.global_steps == 9  # one optimizer step per group per step


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny, single_rank_dist, tmp_path):
    t = make_trainer(tiny, tmp_path, "train.max_steps=2")
    t.fit()
    t = make_trainer(tiny, tmp_path, "train.max_steps=8", "train.max_nonfinite_steps=2")
    t.resume(ckpt.find_latest(tmp_path / "checkpoints"))
    with torch.no_grad():
        t.engine.module.backbone.mask_token.fill_(float("nan"))
    with pytest.raises(RuntimeError, match=r"NaN/Inf for the last 2 steps.*step00000002"):
        t.fit()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000002"


def test_find_latest_ignores_partial_saves(tmp_path):
    root = tmp_path
    for step in (4, 8):
        (root / ckpt.tag_for(step)).mkdir()
        (root / ckpt.tag_for(step) / ckpt.COMPLETE).write_text("{}")
    (root / ".tmp-step00000012").mkdir()  # killed during save: never published
    (root / "step00000016").mkdir()  # renamed by hand / marker missing: not complete
    (root / ckpt.LATEST).write_text("step00000004")  # killed before 'latest' was updated
    assert ckpt.find_latest(root).name == "step00000008"
    (root / ckpt.LATEST).write_text("step00000099")  # points nowhere
    assert ckpt.find_latest(root).name == "step00000008"
    assert [p.name for p in ckpt.remove_partial(root)] == [".tmp-step00000012"]
    assert not (root / ".tmp-step00000012").exists()
    assert ckpt.find_latest(tmp_path / "nothing") is None


def test_load_model_state_dict_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no msgfm/DeepSpeed checkpoint"):
        ckpt.load_model_state_dict(tmp_path)
