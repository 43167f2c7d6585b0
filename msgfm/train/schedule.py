"""Learning-rate schedule: one factor per iteration, shared by every data group.

An *iteration* is one outer training step (one batch of every group, see
:mod:`msgfm.train.loop`). Each group's learning rate is its base LR times the
factor, so the groups keep the ratios of the paper (1e-4 : 0.25e-4 : 1e-5)
through warm-up and decay::

    lr[group](t) = base_lr[group] * factor(t)

The factor is the schedule of the *largest* base LR, normalised by it: warm-up
starts at ``warmup_start_lr / max(base_lr)`` (5e-7 / 1e-4 = 0.005 for the
paper), grows linearly to 1 over ``warmup_epochs``, then follows ``kind``:
``multistep`` (x ``gamma`` at each milestone epoch), ``cosine`` (down to
``min_lr / max(base_lr)`` at ``epochs``) or ``constant``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from msgfm.config import ScheduleConfig
from msgfm.errors import UserError


@dataclass(frozen=True)
class LRSchedule:
    """The per-iteration LR factor for a given epoch length."""

    cfg: ScheduleConfig
    steps_per_epoch: int
    # The largest group base LR: warmup_start_lr and min_lr are absolute LRs of that group.
    reference_lr: float

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            raise UserError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch} "
                            f"(is a data group empty?)")
        if self.reference_lr <= 0:
            raise UserError(f"reference_lr must be > 0, got {self.reference_lr}")

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return round(self.cfg.warmup_epochs * self.steps_per_epoch)

    def factor(self, step: int) -> float:
        """LR multiplier for iteration ``step`` (0-based), relative to each group's base LR."""
        cfg = self.cfg
        start = min(cfg.warmup_start_lr / self.reference_lr, 1.0)
        if step < self.warmup_steps:
            return start + (1.0 - start) * step / self.warmup_steps
        if cfg.kind == "constant":
            return 1.0
        if cfg.kind == "multistep":
            passed = sum(step >= round(m * self.steps_per_epoch) for m in cfg.milestones)
            return cfg.gamma**passed
        # cosine from 1 at the end of warm-up to min_lr at the last iteration
        floor = min(cfg.min_lr / self.reference_lr, 1.0)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def group_lrs(self, step: int, base_lrs: dict[str, float]) -> dict[str, float]:
        """The LR of every group at iteration ``step``."""
        f = self.factor(step)
        return {group: lr * f for group, lr in base_lrs.items()}
