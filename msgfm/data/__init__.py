"""Data: the HDF5 shard format, converters, statistics, readers and the batch scheduler.

A run's data is planned once (:func:`plan_data`, msgfm.data.plan) and turned into the engine's
loaders by :func:`build_pretrain_data` (msgfm.data.pipeline). Importing
this package stays light: torch, h5py and the readers load on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from msgfm.data.pipeline import PretrainData, build_pretrain_data
    from msgfm.data.plan import DataPlan, plan_data, validate_data
    from msgfm.data.scheduler import resolve_group_batches

__all__ = ["DataPlan", "PretrainData", "build_pretrain_data", "plan_data", "resolve_group_batches", "validate_data"]

_LAZY = {"PretrainData": "msgfm.data.pipeline", "build_pretrain_data": "msgfm.data.pipeline",
         "DataPlan": "msgfm.data.plan", "plan_data": "msgfm.data.plan", "validate_data": "msgfm.data.plan",
         "resolve_group_batches": "msgfm.data.scheduler"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'msgfm.data' has no attribute '{name}'")
