"""Activation checkpointing must not change the math: same seed, same losses (STYLE.md numerics rule)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train_support import write_tiny_config, write_tiny_data, write_tiny_ds_config

from msgfm.config import load_config
from msgfm.data.plan import plan_data
from msgfm.train.ds_config import load_ds_config
from msgfm.train.pretrain import build_trainer


def run_losses(folder: Path, out: Path, *overrides: str) -> list[float]:
    cfg = load_config(folder / "tiny.yaml", ["model.moe.expert_parallel_size=1", "train.max_steps=2",
                                             "train.checkpoint_interval=100", *overrides])
    trainer = build_trainer(cfg, load_ds_config(folder / "ds_tiny.json"), plan_data(cfg, folder / "data"), out)
    trainer.fit()
    trainer.tracker.close()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_same_losses_with_and_without(tmp_path, single_rank_dist):
    write_tiny_data(tmp_path, samples_per_group=12)
    write_tiny_config(tmp_path, tmp_path / "data")
    write_tiny_ds_config(tmp_path)
    plain = run_losses(tmp_path, tmp_path / "plain")
    checkpointed = run_losses(tmp_path, tmp_path / "ckpt", "model.grad_checkpointing=[false,true,true,false]")
    assert len(plain) == 2 and plain == pytest.approx(checkpointed, rel=1e-6, abs=0)
