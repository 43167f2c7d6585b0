"""The DeepSpeed engine around a task, and the run length: shared by pretraining and fine-tuning."""
from __future__ import annotations

from typing import Any

import deepspeed
import torch

from msgfm.tasks.base import Task
from msgfm.train.runtime import seed_everything
from msgfm.train.schedule import LRSchedule


def build_engine(task: Task, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any], seed: int,
                 rank: int) -> Any:
    """``deepspeed.initialize`` over the task (process group already up); then every rank reseeds with its
    own seed, so masks, target choices, drop path and MoE token selection differ between ranks."""
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    seed_everything(seed + 1000 * rank)
    return engine


def total_steps(schedule: LRSchedule, max_steps: int | None) -> int:
    """The schedule's steps, or fewer when ``train.max_steps`` says so."""
    return schedule.total_steps if max_steps is None else min(max_steps, schedule.total_steps)
