"""Learning rates: each group's effective rate (linear scaling) and one schedule factor per iteration.

Linear scaling as GFM's code does it (``optimizer.lr_reference_batch``, 512 by default)::

    effective_lr[group] = base_lr[group] * global_batch / lr_reference_batch

with ``global_batch`` the reference group's (batch per GPU x world size; ``optimizer.lr_scale_by:
reference_group``, the default) or the group's own (``group``). The *reference group* is the group with the
largest base LR (the paper's RGB group, 1e-4 at batch 128).

An *iteration* is one outer training step (see :mod:`msgfm.train.trainer`). Each group's rate is
its effective rate times the factor, so the groups keep their ratios through warm-up and decay::

    lr[group](t) = effective_lr[group] * factor(t)

The factor is the reference group's schedule normalised by its base rate: warm-up starts at
``warmup_start_lr / base_lr[reference]`` (5e-7 / 1e-4 = 0.005 for the paper), grows linearly to 1
over ``warmup_epochs``, then follows ``kind``: ``multistep`` (x ``gamma`` at each milestone epoch),
``cosine`` (down to ``min_lr / base_lr[reference]`` at ``epochs``) or ``constant``. The warm-up
and minimum rates are therefore scaled exactly like the base rates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from msgfm.config import OptimizerConfig, ScheduleConfig
from msgfm.errors import UserError


def reference_group(base_lrs: dict[str, float]) -> str:
    """The group with the largest base LR (the first of equals): its rate is the schedule's reference."""
    if not base_lrs:
        raise UserError("no data group to take a learning rate from (config key 'data.groups' is empty)")
    return max(base_lrs, key=lambda g: base_lrs[g])


def global_batches(batch_sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Each group's global batch (gradient accumulation is always 1 here)."""
    return {g: b * world_size for g, b in batch_sizes.items()}


def effective_lrs(base_lrs: dict[str, float], batch_sizes: dict[str, int], world_size: int,
                  cfg: OptimizerConfig) -> dict[str, float]:
    """Each group's peak rate after linear scaling (see the module docstring); the base rates when
    ``optimizer.lr_reference_batch`` is null."""
    if cfg.lr_reference_batch is None:
        return dict(base_lrs)
    batches = global_batches(batch_sizes, world_size)
    ref = reference_group(base_lrs)
    return {g: lr * (batches[g] if cfg.lr_scale_by == "group" else batches[ref]) / cfg.lr_reference_batch
            for g, lr in base_lrs.items()}


def describe_rates(base_lrs: dict[str, float], batch_sizes: dict[str, int], world_size: int,
                   optimizer: OptimizerConfig, schedule: ScheduleConfig) -> list[str]:
    """One line per group: base rate, global batch, effective peak, warm-up start (and cosine floor)."""
    effective = effective_lrs(base_lrs, batch_sizes, world_size, optimizer)
    batches = global_batches(batch_sizes, world_size)
    ref = reference_group(base_lrs)
    rule = ("unscaled, optimizer.lr_reference_batch: null" if optimizer.lr_reference_batch is None else
            f"x {'its' if optimizer.lr_scale_by == 'group' else 'the reference group' + chr(39) + 's'} global "
            f"batch / {optimizer.lr_reference_batch}")
    lines = []
    for g, base in base_lrs.items():
        ratio = effective[g] / base_lrs[ref]
        line = (f"{g}: base {base:.4g}, global batch {batches[g]}, effective {effective[g]:.4g} ({rule}); "
                f"warm-up from {schedule.warmup_start_lr * ratio:.4g}")
        if schedule.kind == "cosine":
            line += f", floor {schedule.min_lr * ratio:.4g}"
        lines.append(line + (" [reference]" if g == ref else ""))
    return lines


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
