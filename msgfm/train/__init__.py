"""DeepSpeed pretraining: start-up checks, optimizer groups, LR schedule, loop, checkpoints, tracking.

Entry point: :func:`pretrain` (used by ``launchers/pretrain.py``). For fine-tuning,
:func:`msgfm.train.checkpoint.load_model_state_dict` reads a whole model from a checkpoint.
"""
from msgfm.train.run import pretrain

__all__ = ["pretrain"]
