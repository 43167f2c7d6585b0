"""Objectives around the backbone: the module DeepSpeed wraps is a :class:`Task`.

- :mod:`~msgfm.tasks.simmim`     pretraining: SimMIM masking, cross-sensor targets, decoders, loss
- :mod:`~msgfm.tasks.downstream` fine-tuning: multilabel, segmentation, restoration (loss, metric, inference)
- :mod:`~msgfm.tasks.heads`      the heads: SimMIM decoder, linear, UPerNet, restoration decoder
- :mod:`~msgfm.tasks.metrics`    downstream metrics over whole evaluation sets
- :mod:`~msgfm.tasks.masking`    SimMIM mask generator
- :mod:`~msgfm.tasks.params`     parameter counts of a run config
"""
from msgfm.tasks.base import Task, TaskOutput
from msgfm.tasks.params import count_parameters
from msgfm.tasks.simmim import CrossSensorSimMIM, build_pretrain_task

__all__ = ["CrossSensorSimMIM", "Task", "TaskOutput", "build_pretrain_task", "count_parameters"]
