"""Training on DeepSpeed: one Trainer for every task, checkpoints, tracking, schedules, start-up checks.

Entry point for pretraining: :func:`pretrain` (used by ``launchers/pretrain.py``); fine-tuning's
is :func:`msgfm.finetune.train.finetune`. docs/architecture.md maps the modules.
"""
from msgfm.train.pretrain import pretrain

__all__ = ["pretrain"]
