"""From a run's data plan to the engine's data: datasets, loaders, the scheduler.

plan = plan_data(cfg, data_root)                 # msgfm/data/plan.py: validated once
data = build_pretrain_data(cfg, plan, rank, world_size, seed)
for epoch in range(data.train.epoch, cfg.schedule.epochs):
for step_batches in data.train:              # one (group, raw batch) per group, config order
for group, raw_batch in step_batches:
batch = device_batch(raw_batch, device, dtype)   # normalized, cropped, flipped there
checkpoint["data"] = data.train.state_dict(); checkpoint["stats"] = data.stats
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from msgfm.config import DataGroupConfig, RunConfig
from msgfm.data.dataset import GroupDataset
from msgfm.data.device_transforms import collate_raw
from msgfm.data.plan import DataPlan, GroupSummary
from msgfm.data.scheduler import CorruptTracker, FixedBatchSampler, HeterogeneousScheduler, StepRangeBatchSampler
from msgfm.data.transforms import SampleTransform
from msgfm.errors import UserError

log = logging.getLogger(__name__)


class ValLoader:
    """A group's validation batches (a DataLoader underneath) with the corrupt-sample side
    channel counted and removed, like the training batches."""

    def __init__(self, name: str, loader: DataLoader, tracker: CorruptTracker) -> None:
        self.name, self.loader, self.tracker = name, loader, tracker

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield self.tracker.update(self.name, batch)


@dataclass(kw_only=True)
class PretrainData:
    """What the engine gets: the scheduler, validation loaders and the facts to record."""

    train: HeterogeneousScheduler
    val: dict[str, ValLoader]
    stats: dict[str, Any]  # group -> Stats.to_dict(): travels with checkpoints and MLflow
    group_sizes: dict[str, int]  # samples per group (train + val, all ranks)
    batch_sizes: dict[str, int]  # per GPU
    lrs: dict[str, float]
    summaries: dict[str, GroupSummary] = field(default_factory=dict)


def _loader(dataset: GroupDataset, sampler: Any, group: DataGroupConfig, pin_memory: bool,
            prefetch_factor: int, persistent: bool) -> DataLoader:
    workers = group.num_workers
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_raw,
                      pin_memory=pin_memory, persistent_workers=persistent and workers > 0,
                      prefetch_factor=prefetch_factor if workers > 0 else None)


def train_transform(cfg: RunConfig) -> SampleTransform:
    """The training augmentation of ``data.augment`` at the model's image size."""
    aug = cfg.data.augment
    return SampleTransform(img_size=cfg.model.img_size, train=True, crop_scale=(aug.crop_scale[0], aug.crop_scale[1]),
                           crop_ratio=(aug.crop_ratio[0], aug.crop_ratio[1]), hflip=aug.hflip, vflip=aug.vflip)


def build_pretrain_data(cfg: RunConfig, plan: DataPlan, rank: int, world_size: int, seed: int) -> PretrainData:
    """One dataset and DataLoader per group (train and val) and the scheduler over them, from the run's
    data plan (msgfm/data/plan.py). Every rank calls it with the same config, plan and seed."""
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} outside world_size {world_size}")
    summaries = plan.summaries
    for s in summaries.values():
        log.info(s.describe())
    pin_memory = cfg.data.pin_memory and torch.cuda.is_available()
    if cfg.data.pin_memory and not pin_memory:
        warnings.warn("data.pin_memory is ignored: no CUDA device (set it to false for CPU runs)", stacklevel=2)
    train_tf = train_transform(cfg)
    val_tf = SampleTransform(img_size=cfg.model.img_size, train=False)
    tracker = CorruptTracker(cfg.data.max_corrupt_fraction, plan.group_sizes)
    orders = plan.group_orders(cfg, rank, world_size, seed)
    splits = plan.split(cfg, seed)
    names, loaders, samplers, val = [], [], [], {}
    for group in cfg.data.groups:
        summary, order = summaries[group.name], orders[group.name]
        _, val_idx = splits[group.name]
        pool = order.indices[rank * order.per_rank:(rank + 1) * order.per_rank]
        train_ds = GroupDataset(summary.shards, group.sensors, summary.statistics, train_tf, name=group.name,
                                replacement_pool=pool)
        sampler = StepRangeBatchSampler(order)
        names.append(group.name)
        samplers.append(sampler)
        loaders.append(_loader(train_ds, sampler, group, pin_memory, cfg.data.prefetch_factor, persistent=True))
        val_sampler = FixedBatchSampler(val_idx, order.batch_size, rank, world_size)
        if cfg.data.val_fraction > 0 and len(val_sampler) == 0:
            warnings.warn(f"group '{group.name}': {len(val_idx)} validation samples for {world_size} ranks give "
                          f"no validation batch; raise data.val_fraction", stacklevel=2)
        val_ds = GroupDataset(summary.shards, group.sensors, summary.statistics, val_tf, name=group.name,
                              replacement_pool=val_sampler.indices if len(val_sampler.indices) else None)
        # Validation runs now and then: its workers start per pass instead of idling in between.
        val[group.name] = ValLoader(group.name, _loader(val_ds, val_sampler, group, pin_memory,
                                                        cfg.data.prefetch_factor, persistent=False), tracker)
    scheduler = HeterogeneousScheduler(names, loaders, samplers, tracker, seed, epoch=cfg.data.epoch)
    return PretrainData(train=scheduler, val=val,
                        stats={name: s.statistics.to_dict() for name, s in summaries.items()},
                        group_sizes=plan.group_sizes, batch_sizes=dict(plan.batch_sizes), lrs=dict(plan.lrs),
                        summaries=summaries)
