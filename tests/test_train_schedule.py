"""LR schedule values: warm-up from warmup_start_lr, multistep / cosine / constant, per-group ratios."""
from __future__ import annotations

import math

import pytest

from msgfm.config import ScheduleConfig
from msgfm.train.schedule import LRSchedule


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
