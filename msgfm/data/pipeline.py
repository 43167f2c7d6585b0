"""From a run config to the engine's data: start-up checks, datasets, loaders, scheduler.

    data = build_pretrain_data(cfg, data_root, rank, world_size, seed)
    for epoch in range(data.train.epoch, cfg.schedule.epochs):
        for step_batches in data.train:              # one (group, raw batch) per group, config order
            for group, raw_batch in step_batches:
                batch = device_batch(raw_batch, device, dtype)   # normalized, cropped, flipped there
    checkpoint["data"] = data.train.state_dict(); checkpoint["stats"] = data.stats

:func:`validate_data` runs first and reads metadata only (plus the first and last sample of
each sensor, which catches truncated files); it reports every problem it finds at once,
each with its group, file and sensor, and what to run.
"""
from __future__ import annotations

import glob
import logging
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from msgfm.config import DataGroupConfig, RunConfig
from msgfm.data.dataset import GroupDataset
from msgfm.data.device_transforms import collate_raw
from msgfm.data.format import ShardError, ShardInfo, read_shard_info
from msgfm.data.scheduler import (CorruptTracker, FixedBatchSampler, GroupOrder, HeterogeneousScheduler,
                                  StepRangeBatchSampler, resolve_group_batches, split_train_val)
from msgfm.data.stats import MissingStatsError, Stats, default_stats_path, load_stats
from msgfm.data.transforms import SampleTransform
from msgfm.sensors import get_sensor

log = logging.getLogger(__name__)


class DataValidationError(ValueError):
    """The configured data cannot be used; the message lists every problem found."""


@dataclass(kw_only=True)
class GroupSummary:
    """What start-up validation found for one group."""

    name: str
    sensors: list[str]
    globs: list[str]
    shards: list[ShardInfo]
    num_samples: int
    stats: Stats | None
    stats_path: Path | None

    def describe(self) -> str:
        return (f"group '{self.name}' ({'+'.join(self.sensors)}): {self.num_samples} samples in "
                f"{len(self.shards)} shards, stats {self.stats_path}")


def shard_globs(group: DataGroupConfig, data_root: Path) -> list[str]:
    """The group's shard globs, relative ones joined to ``data_root``."""
    return [g if Path(g).is_absolute() else str(Path(data_root) / g) for g in group.shards]


def stats_path_for(shard_paths: list[Path], stats_file: str) -> Path:
    """Where a group's statistics live: ``stats_file`` in the shards' common folder, unless absolute."""
    return Path(stats_file) if Path(stats_file).is_absolute() else default_stats_path(shard_paths, stats_file)


def _check_group(cfg: RunConfig, group: DataGroupConfig, data_root: Path, problems: list[str]) -> GroupSummary:
    where = f"group '{group.name}'"
    globs = shard_globs(group, data_root)
    paths: dict[Path, None] = {}
    if not group.shards:
        problems.append(f"{where}: no shard globs configured (data.groups[{group.name}].shards)")
    for pattern in globs:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            problems.append(f"{where}: shard glob '{pattern}' (data root {data_root}) matches no file; create "
                            f"shards with `msgfm convert ...` (the sample data: `msgfm prepare-sample DIR`) or "
                            f"fix data.root / data.groups[{group.name}].shards")
        paths.update(dict.fromkeys(Path(m) for m in matches))
    infos = []
    for path in paths:
        try:
            info = read_shard_info(path, check_data=True)
        except ShardError as err:
            problems.append(f"{where}: {err}")
            continue
        missing = [s for s in group.sensors if s not in info.sensors]
        if missing:
            problems.append(f"{where}: {path}: sensor dataset(s) {missing} missing; the shard holds "
                            f"{list(info.sensors)} (group '{info.group}')")
            continue
        infos.append(info)
    total = sum(i.num_samples for i in infos)
    summary = GroupSummary(name=group.name, sensors=list(group.sensors), globs=globs, shards=infos,
                           num_samples=total, stats=None, stats_path=None)
    if paths and not infos:
        problems.append(f"{where}: no usable shard among the {len(paths)} matched (see above)")
    if not infos:
        return summary
    summary.stats_path = stats_path_for([i.path for i in infos], cfg.data.stats_file)
    hint = " ".join(shlex.quote(g) for g in globs)
    try:
        stats = load_stats(summary.stats_path, hint=hint)
        for sensor in group.sensors:
            bands = stats.sensor(sensor).bands
            if bands != get_sensor(sensor).bands:
                raise ValueError(f"{stats.path}: statistics of sensor '{sensor}' are for bands {list(bands)}, "
                                 f"the sensor has {list(get_sensor(sensor).bands)}; run `msgfm stats {hint}` again")
    except (MissingStatsError, ValueError) as err:
        problems.append(f"{where}: {err}")
        return summary
    summary.stats = stats
    changes = stats.source_changes([i.path for i in infos])
    if changes:
        warnings.warn(f"{where}: the statistics {stats.path} were computed from other files than the shards in "
                      f"use ({'; '.join(changes[:5])}{' ...' if len(changes) > 5 else ''}); run `msgfm stats "
                      f"{hint}` again if the data changed", stacklevel=3)
    return summary


def validate_data(cfg: RunConfig, data_root: str | Path) -> dict[str, GroupSummary]:
    """Check every configured group's shards and statistics; raise one
    :class:`DataValidationError` listing all problems, else return a summary per group."""
    data_root = Path(data_root)
    if not cfg.data.groups:
        raise DataValidationError("config key 'data.groups' is empty: declare at least one data group")
    problems: list[str] = []
    summaries = {g.name: _check_group(cfg, g, data_root, problems) for g in cfg.data.groups}
    if problems:
        raise DataValidationError(f"{len(problems)} data problem(s):\n  - " + "\n  - ".join(problems))
    return summaries


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


def build_pretrain_data(cfg: RunConfig, data_root: str | Path, rank: int, world_size: int,
                        seed: int) -> PretrainData:
    """Validate the data, then build one dataset and DataLoader per group (train and val) and
    the scheduler over them. Every rank calls it with the same config and seed."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    summaries = validate_data(cfg, data_root)
    for s in summaries.values():
        log.info(s.describe())
    group_sizes = {name: s.num_samples for name, s in summaries.items()}
    resolved = resolve_group_batches(cfg, group_sizes)
    pin_memory = cfg.data.pin_memory and torch.cuda.is_available()
    if cfg.data.pin_memory and not pin_memory:
        warnings.warn("data.pin_memory is ignored: no CUDA device (set it to false for CPU runs)", stacklevel=2)
    aug = cfg.data.augment
    train_tf = SampleTransform(img_size=cfg.model.img_size, train=True, crop_scale=tuple(aug.crop_scale),
                               crop_ratio=tuple(aug.crop_ratio), hflip=aug.hflip, vflip=aug.vflip)
    val_tf = SampleTransform(img_size=cfg.model.img_size, train=False)
    tracker = CorruptTracker(cfg.data.max_corrupt_fraction, group_sizes)
    names, loaders, samplers, val = [], [], [], {}
    for position, group in enumerate(cfg.data.groups):
        summary = summaries[group.name]
        batch_size, _ = resolved[group.name]
        train_idx, val_idx = split_train_val(summary.num_samples, cfg.data.val_fraction, seed, position)
        order = GroupOrder(indices=train_idx, batch_size=batch_size, rank=rank, world_size=world_size,
                           seed=seed, group_position=position)
        pool = order.indices[rank * order.per_rank:(rank + 1) * order.per_rank]
        train_ds = GroupDataset(summary.shards, group.sensors, summary.stats, train_tf, name=group.name,
                                replacement_pool=pool)
        sampler = StepRangeBatchSampler(order)
        names.append(group.name)
        samplers.append(sampler)
        loaders.append(_loader(train_ds, sampler, group, pin_memory, cfg.data.prefetch_factor, persistent=True))
        val_sampler = FixedBatchSampler(val_idx, batch_size, rank, world_size)
        if cfg.data.val_fraction > 0 and len(val_sampler) == 0:
            warnings.warn(f"group '{group.name}': {len(val_idx)} validation samples for {world_size} ranks give "
                          f"no validation batch; raise data.val_fraction", stacklevel=2)
        val_ds = GroupDataset(summary.shards, group.sensors, summary.stats, val_tf, name=group.name,
                              replacement_pool=val_sampler.indices if len(val_sampler.indices) else None)
        # Validation runs now and then: its workers start per pass instead of idling in between.
        val[group.name] = ValLoader(group.name, _loader(val_ds, val_sampler, group, pin_memory,
                                                        cfg.data.prefetch_factor, persistent=False), tracker)
    scheduler = HeterogeneousScheduler(names, loaders, samplers, tracker, seed)
    return PretrainData(train=scheduler, val=val,
                        stats={name: s.stats.to_dict() for name, s in summaries.items()},
                        group_sizes=group_sizes, batch_sizes={n: b for n, (b, _) in resolved.items()},
                        lrs={n: lr for n, (_, lr) in resolved.items()}, summaries=summaries)
