"""LR schedule values: warm-up from warmup_start_lr, multistep / cosine / constant, per-group ratios."""
from __future__ import annotations

import math

import pytest

from msgfm.config import OptimizerConfig, ScheduleConfig, load_config
from msgfm.train.schedule import LRSchedule, describe_rates, effective_lrs, reference_group


def paper(**kw) -> LRSchedule:
    cfg = ScheduleConfig(epochs=800, warmup_epochs=10, warmup_start_lr=5e-7, kind="multistep", milestones=[700],
                         gamma=0.1, **kw)
    return LRSchedule(cfg, steps_per_epoch=100, reference_lr=1e-4)


def test_paper_warmup_and_multistep():
    s = paper()
    lrs = {"rgb": 1e-4, "sen12ms": 0.25e-4, "mdas": 1e-5}
    assert s.group_lrs(0, lrs)["rgb"] == pytest.approx(5e-7)  # warm-up starts at 5e-7
    assert s.factor(500) == pytest.approx(0.005 + 0.995 * 0.5)  # half-way through 1000 warm-up iterations
    assert s.factor(1000) == 1.0  # warm-up done after 10 epochs
    assert s.factor(69_999) == 1.0
    assert s.factor(70_000) == pytest.approx(0.1)  # x0.1 at epoch 700
    assert s.group_lrs(70_000, lrs)["mdas"] == pytest.approx(1e-6)
    # every group follows the same factor: ratios stay those of the paper
    for step in (0, 123, 5000, 75_000):
        g = s.group_lrs(step, lrs)
        assert g["sen12ms"] / g["rgb"] == pytest.approx(0.25)
    assert s.total_steps == 80_000


def test_cosine_and_constant():
    cfg = ScheduleConfig(epochs=10, warmup_epochs=2, warmup_start_lr=1e-6, kind="cosine", min_lr=1e-5, milestones=[])
    s = LRSchedule(cfg, steps_per_epoch=10, reference_lr=1e-3)
    assert s.factor(20) == pytest.approx(1.0)
    assert s.factor(60) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.factor(100) == pytest.approx(0.01)  # ends at min_lr / reference_lr
    const = LRSchedule(ScheduleConfig(epochs=5, warmup_epochs=0, kind="constant", milestones=[]), 7, 1e-4)
    assert const.factor(0) == const.factor(34) == 1.0


def test_bad_epoch_length():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        LRSchedule(ScheduleConfig(), steps_per_epoch=0, reference_lr=1e-4)


PAPER_BASE = {"rgb": 1e-4, "sen12ms": 0.25e-4, "mdas": 1e-5}
PAPER_BATCH = {"rgb": 128, "sen12ms": 32, "mdas": 12}


def test_effective_rates_scale_every_group_by_the_reference_groups_global_batch():
    cfg = load_config("msgfm_swinb_192")
    assert cfg.optimizer.lr_reference_batch == 512 and cfg.optimizer.lr_scale_by == "reference_group"
    assert reference_group(PAPER_BASE) == "rgb"
    lrs = effective_lrs(PAPER_BASE, PAPER_BATCH, 8, cfg.optimizer)
    # GFM's rule with the rgb group's global batch (128 x 8 GPUs) / 512 = 2 for every group: Table 10's ratios stay
    assert lrs == pytest.approx({"rgb": 2e-4, "sen12ms": 0.5e-4, "mdas": 2e-5}, rel=1e-12)
    by_own = effective_lrs(PAPER_BASE, PAPER_BATCH, 8, OptimizerConfig(lr_scale_by="group"))
    assert by_own == pytest.approx({"rgb": 2e-4, "sen12ms": 0.25e-4 * 256 / 512, "mdas": 1e-5 * 96 / 512}, rel=1e-12)
    assert effective_lrs(PAPER_BASE, PAPER_BATCH, 8, OptimizerConfig(lr_reference_batch=None)) == PAPER_BASE
    assert effective_lrs(PAPER_BASE, PAPER_BATCH, 1, cfg.optimizer) == pytest.approx(
        {g: lr * 128 / 512 for g, lr in PAPER_BASE.items()}, rel=1e-12)


def test_warmup_and_minimum_rates_scale_like_the_base_rates():
    opt = OptimizerConfig(lr_scale_by="group")
    sched = ScheduleConfig(epochs=100, warmup_epochs=10, warmup_start_lr=1e-6, kind="cosine", min_lr=1e-5,
                           milestones=[])
    lrs = effective_lrs({"rgb": 2e-4, "sar": 5e-5}, {"rgb": 128, "sar": 32}, 8, opt)
    s = LRSchedule(sched, steps_per_epoch=10, reference_lr=2e-4)
    # GFM at 8 x 128: WARMUP_LR 1e-6 -> 2e-6 and MIN_LR 1e-5 -> 2e-5 for the reference group
    assert lrs["rgb"] * s.factor(0) == pytest.approx(2e-6) and lrs["rgb"] * s.factor(1000) == pytest.approx(2e-5)
    assert lrs["sar"] * s.factor(0) == pytest.approx(1e-6 * (5e-5 / 2e-4) * 256 / 512)
    lines = describe_rates({"rgb": 2e-4, "sar": 5e-5}, {"rgb": 128, "sar": 32}, 8, opt, sched)
    assert lines[0] == ("rgb: base 0.0002, global batch 1024, effective 0.0004 (x its global batch / 512); "
                        "warm-up from 2e-06, floor 2e-05 [reference]")
    assert lines[1].startswith("sar: base 5e-05, global batch 256, effective 2.5e-05")
