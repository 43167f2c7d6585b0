"""The data plan of a pretraining run: what every group holds and how it is batched, worked out once.

:func:`plan_data` validates the shards and statistics of every group (metadata plus the first and
last sample of each sensor; one error lists every problem) and resolves each group's per-GPU
batch size and base LR. The launcher, the dry run and the data pipeline all read this one plan,
so start-up touches each shard's metadata once. Its :meth:`DataPlan.group_orders` are the
per-rank sample orders the training scheduler draws its batches from.
"""
from __future__ import annotations

import glob
import logging
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msgfm.config import DataGroupConfig, RunConfig
from msgfm.data.format import ShardError, ShardInfo, read_shard_info
from msgfm.data.scheduler import GroupOrder, passes_per_epoch, resolve_group_batches, split_train_val
from msgfm.data.stats import MissingStatsError, Stats, default_stats_path, load_stats
from msgfm.errors import MissingFileError, UserError
from msgfm.sensors import get_sensor

log = logging.getLogger(__name__)


class DataValidationError(UserError):
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

    @property
    def statistics(self) -> Stats:
        """The group's band statistics (every summary validate_data returns has them)."""
        if self.stats is None:
            raise RuntimeError(f"group '{self.name}' has no statistics: it did not pass validate_data")
        return self.stats

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
                raise UserError(f"{stats.path}: statistics of sensor '{sensor}' are for bands {list(bands)}, "
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


@dataclass(kw_only=True)
class DataPlan:
    """Every group's validated shards (``summaries``), per-GPU batch size and base LR, in config order."""

    root: Path
    summaries: dict[str, GroupSummary]
    batch_sizes: dict[str, int]
    lrs: dict[str, float]

    @property
    def group_sizes(self) -> dict[str, int]:
        """Samples per group (training and validation, all ranks)."""
        return {name: s.num_samples for name, s in self.summaries.items()}

    def split(self, cfg: RunConfig, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(training indices, validation indices) of every group."""
        return {name: split_train_val(summary.num_samples, cfg.data.val_fraction, seed, position)
                for position, (name, summary) in enumerate(self.summaries.items())}

    def group_orders(self, cfg: RunConfig, rank: int, world_size: int, seed: int) -> dict[str, GroupOrder]:
        """Each group's training-sample order on ``rank`` of ``world_size``."""
        return {name: GroupOrder(indices=train_idx, batch_size=self.batch_sizes[name], rank=rank,
                                 world_size=world_size, seed=seed, group_position=position)
                for position, (name, (train_idx, _)) in enumerate(self.split(cfg, seed).items())}


    def batches_per_epoch(self, cfg: RunConfig, world_size: int) -> dict[str, int]:
        """Each group's batches per rank in one pass over its training samples (the same on every rank)."""
        return {name: order.batches_per_epoch
                for name, order in self.group_orders(cfg, 0, world_size, cfg.train.seed).items()}

    def passes_per_epoch(self, cfg: RunConfig, world_size: int) -> dict[str, float]:
        """Passes over each group's training samples in one epoch (``data.epoch``)."""
        return passes_per_epoch(self.batches_per_epoch(cfg, world_size), cfg.data.epoch)


def configured_batches(cfg: RunConfig) -> dict[str, tuple[int, float]] | None:
    """(batch per GPU, base LR) of every group when the config fixes them; None when any is ``auto``
    (those need the sample counts, i.e. the data)."""
    if any(g.batch_size_per_gpu == "auto" for g in cfg.data.groups):
        return None
    return resolve_group_batches(cfg, {g.name: 0 for g in cfg.data.groups})


def plan_data(cfg: RunConfig, data_root: str | Path) -> DataPlan:
    """Validate the data of every group under ``data_root`` and resolve batch sizes and LRs (see above)."""
    root = Path(data_root)
    if not root.is_dir():
        raise MissingFileError(f"data root {root} does not exist (from --data-root or data.root). Build the sample "
                               f"data with `msgfm prepare-sample {root}`, or convert your own with `msgfm convert`")
    summaries = validate_data(cfg, root)
    resolved = resolve_group_batches(cfg, {name: s.num_samples for name, s in summaries.items()})
    if not resolved:
        raise UserError("config key 'data.groups' is empty: declare at least one data group")
    return DataPlan(root=root, summaries=summaries, batch_sizes={n: b for n, (b, _) in resolved.items()},
                    lrs={n: lr for n, (_, lr) in resolved.items()})
