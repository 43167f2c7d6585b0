"""Downstream data: a map-style Dataset over task shards, its statistics and loaders.

A sample is ``{"images": {sensor: float32 [C,H,W] normalized}, "target": ..., "id": str}``
with the target by task kind: multilabel float [K]; segmentation int64 [H,W]
(``ignore_index`` where unlabelled); restoration float32 [C_t,H,W] in *physical* units
(reflectance for SEN12MS-CR, digital numbers for SpaceNet), clipped to ``task.clip_range``.
Invalid input pixels (nodata, NaN) are 0 after normalization, as in pretraining.

HDF5 files are opened lazily per process (never across a fork). Training samples get
the same random flips for every sensor and the target, and an optional random crop.

Labels are checked twice, so that a wrong one is reported by shard and sample id instead of
crashing inside the loss or a metric: when the data is opened (the dtype, and the values of the
first and last sample; every multilabel vector, which is small) and on every batch, with one
min/max (:class:`LabelCheck`, called where the batches are drawn, in the main process).

Legend: C channels, H x W pixels, K classes.
"""
from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from msgfm.config import FinetuneConfig, TaskConfig
from msgfm.data.dataset import ShardHandles, normalizer_for
from msgfm.data.format import LABELS_GROUP, ShardInfo, read_shard_info
from msgfm.data.stats import Stats, default_stats_path, expand_shard_args, load_stats
from msgfm.errors import UserError
from msgfm.sensors import get_sensor


class TaskDataset(Dataset):
    """Samples of one split: the task's input sensors, normalized, and the task's target."""

    def __init__(self, shards: Sequence[str | Path], task: TaskConfig, stats: Stats, *, train: bool,
                 hflip: bool = False, vflip: bool = False, crop: int = 0, resize: int = 0,
                 ids: Sequence[str] | None = None) -> None:
        infos = [read_shard_info(p, check_data=False) for p in shards]
        if not infos:
            raise UserError("no shards for this split")
        self.task, self.train = task, train
        self.hflip, self.vflip, self.crop, self.resize = hflip and train, vflip and train, crop if train else 0, resize
        self.target_sensor_input = task.kind == "restoration" and not task.target_label
        for info in infos:
            _check_shard(info, task)
        self.paths = [info.path for info in infos]
        self.label_check = LabelCheck.for_task(task)
        self.normalizers = [{s: normalizer_for(info, s, stats) for s in task.sensors} for info in infos]
        if self.target_sensor_input:  # the reference is a stored sensor (pan-sharpening): its physical units
            self.target_units = [(info.sensors[task.target_sensor].scale, info.sensors[task.target_sensor].offset)
                                 for info in infos]
        index = [(shard, local) for shard, info in enumerate(infos) for local in range(info.num_samples)]
        self._starts = np.cumsum([0] + [info.num_samples for info in infos])
        self.all_ids = [sid for info in infos for sid in _read_ids(info)]
        if self.label_check is not None:
            for shard, info in enumerate(infos):
                self.label_check.check_shard(info, self.all_ids[self._starts[shard]:self._starts[shard + 1]])
        if ids is not None:
            position = {sid: i for i, sid in enumerate(self.all_ids)}
            missing = [sid for sid in ids if sid not in position]
            if missing:
                raise UserError(f"{len(missing)} requested ids are not in the shards, e.g. {missing[:3]}")
            index = [index[position[sid]] for sid in ids]
        self.index = index
        self._handles = ShardHandles(self.paths)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Sample ``key``: an index, or (index, augmentation seed) from the training sampler."""
        item, seed = key if isinstance(key, tuple) else (key, None)
        shard, local = self.index[item]
        f = self._handles.get(shard)
        task = self.task
        images = {s: self.normalizers[shard][s](f[s][local])[0] for s in task.sensors}
        if task.kind == "multilabel":
            target = torch.from_numpy(f[LABELS_GROUP][task.label_name][local].astype(np.float32))
        elif task.kind == "segmentation":
            target = torch.from_numpy(f[LABELS_GROUP][task.label_name][local].astype(np.int64))
        elif self.target_sensor_input:
            scale, offset = self.target_units[shard]
            target = torch.from_numpy(f[task.target_sensor][local].astype(np.float32) * scale + offset)
        else:
            target = torch.from_numpy(f[LABELS_GROUP][task.target_label][local].astype(np.float32) * task.target_scale)
        if task.kind == "restoration":
            target = target.clamp(*task.clip_range)
        sample_id = self.all_ids[int(self._starts[shard]) + local]
        # each training sample carries its own seed: the same flips and crops with any number of workers,
        # and after a resume mid-epoch
        images, target = self._augment(images, target, random.Random(seed) if seed is not None else random)
        return {"images": images, "target": target, "id": sample_id}

    def check_batch(self, batch: dict[str, Any]) -> None:
        """The per-batch label check (one min/max); the error names the sample's shard and id."""
        if self.label_check is not None:
            self.label_check.check_batch(batch["target"], batch["ids"], self.shard_of)

    def shard_of(self, sample_id: str) -> Path | None:
        """The shard holding ``sample_id`` (for error messages; a linear search)."""
        for shard, path in enumerate(self.paths):
            if sample_id in self.all_ids[self._starts[shard]:self._starts[shard + 1]]:
                return path
        return None

    def _augment(self, images: dict[str, torch.Tensor], target: torch.Tensor, rng: Any,
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        dense = self.task.kind != "multilabel"
        if self.crop:
            H, W = next(iter(images.values())).shape[-2:]
            if self.crop > min(H, W):
                raise UserError(f"data.train_crop {self.crop} exceeds the {H}x{W} samples")
            top, left = rng.randint(0, H - self.crop), rng.randint(0, W - self.crop)
            images = {s: x[..., top:top + self.crop, left:left + self.crop] for s, x in images.items()}
            target = target[..., top:top + self.crop, left:left + self.crop] if dense else target
        for enabled, dim in ((self.hflip, -1), (self.vflip, -2)):
            if enabled and rng.random() < 0.5:
                images = {s: x.flip(dim) for s, x in images.items()}
                target = target.flip(dim) if dense else target
        if self.resize and not dense:
            images = {s: F.interpolate(x[None], size=(self.resize, self.resize), mode="bilinear",
                                       align_corners=False)[0] for s, x in images.items()}
        return {s: x.contiguous() for s, x in images.items()}, target.contiguous()


def _read_ids(info: ShardInfo) -> list[str]:
    if not info.has_ids:
        return [f"{info.path.name}:{i}" for i in range(info.num_samples)]
    with h5py.File(info.path, "r") as f:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in f["ids"][:]]


def _check_shard(info: ShardInfo, task: TaskConfig) -> None:
    missing = [s for s in task.sensors if s not in info.sensors]
    if missing:
        raise UserError(f"{info.path}: task.sensors {missing} are not in this shard (it holds "
                        f"{list(info.sensors)}); convert with the task's sensors or change task.sensors")
    label = {"multilabel": task.label_name, "segmentation": task.label_name}.get(task.kind, task.target_label)
    if label and label not in info.labels:
        raise UserError(f"{info.path}: no labels/{label} (it has {sorted(info.labels)}); the task "
                        f"'{task.name}' needs it")
    if task.kind == "multilabel" and info.labels[label].shape[1:] != (task.num_classes,):
        raise UserError(f"{info.path}: labels/{label} has {info.labels[label].shape[1:]} classes, task.num_classes "
                        f"is {task.num_classes}")
    if task.kind == "restoration" and not task.target_label and task.target_sensor not in info.sensors:
        raise UserError(f"{info.path}: target sensor '{task.target_sensor}' is not in this shard")
    if task.kind == "restoration" and task.target_label:
        channels = get_sensor(task.target_sensor).num_channels
        if info.labels[label].shape[1:2] != (channels,):
            raise UserError(f"{info.path}: labels/{label} has shape {info.labels[label].shape[1:]}, the target "
                            f"sensor '{task.target_sensor}' has {channels} bands")


class LabelCheck:
    """What a task's labels may hold: segmentation class indices ``0..num_classes-1`` or
    ``ignore_index``; multilabel 0/1 vectors. Integer labels only (a float class index or 0/1
    vector would be cast silently)."""

    def __init__(self, task: TaskConfig) -> None:
        self.kind, self.label = task.kind, task.label_name
        self.num_classes, self.ignore_index = task.num_classes, task.ignore_index

    @classmethod
    def for_task(cls, task: TaskConfig) -> LabelCheck | None:
        return cls(task) if task.kind in ("multilabel", "segmentation") else None

    def allowed(self) -> str:
        if self.kind == "multilabel":
            return "multilabel labels are 0/1 per class"
        return (f"task.num_classes is {self.num_classes}: classes 0..{self.num_classes - 1}, and "
                f"task.ignore_index {self.ignore_index} for unlabelled pixels")

    def check_shard(self, info: ShardInfo, ids: Sequence[str]) -> None:
        """The label dtype, and the values of the first and last sample (of every sample for multilabel)."""
        label = info.labels[self.label]
        if label.dtype.kind not in "uib":
            raise UserError(f"{info.path}: labels/{self.label} is {label.dtype}; {self.kind} labels must be "
                            f"integers (uint8, as `msgfm convert` writes them); convert the labels again")
        with h5py.File(info.path, "r") as f:
            ds = f[LABELS_GROUP][self.label]
            if self.kind == "multilabel":  # one read of the whole (N, K) array, not a selection of N points
                indices: Sequence[int] = range(info.num_samples)
                values = torch.from_numpy(ds[()].astype(np.int64))
            else:
                indices = sorted({0, info.num_samples - 1})
                values = torch.from_numpy(ds[indices].astype(np.int64))
        bad = self._first_bad(values)
        if bad is not None:
            row, value = bad
            self._fail(info.path, ids[indices[row]], value)

    def check_batch(self, target: torch.Tensor, ids: Sequence[str], shard_of: Any = None) -> None:
        """One min/max over the batch; only a batch that fails is searched for the sample."""
        if not target.numel():
            return
        if self.kind == "segmentation":
            valid = target.masked_fill(target == self.ignore_index, 0)
            low, high = torch.aminmax(valid)
            if low >= 0 and high < self.num_classes:
                return
            bad = self._first_bad(target)
        else:
            low, high = torch.aminmax(target)
            if low >= 0 and high <= 1 and bool(((target == 0) | (target == 1)).all()):
                return
            bad = self._first_bad(target)
        if bad is None:  # unreachable: the min/max said something is out of range
            return
        row, value = bad
        self._fail(shard_of(ids[row]) if shard_of is not None else None, ids[row], value)

    def _first_bad(self, values_B: torch.Tensor) -> tuple[int, float] | None:
        """(row, value) of the first sample holding a value its task does not allow, else None."""
        if self.kind == "segmentation":
            wrong = ((values_B < 0) | (values_B >= self.num_classes)) & (values_B != self.ignore_index)
        else:
            wrong = (values_B != 0) & (values_B != 1)
        rows = wrong.reshape(len(values_B), -1).any(dim=1).nonzero()
        if not len(rows):
            return None
        row = int(rows[0])
        value = values_B[row][wrong[row]].reshape(-1)[0].item()
        return row, value

    def _fail(self, shard: Path | None, sample_id: str, value: float) -> None:
        shown = int(value) if float(value).is_integer() else value
        what = "class" if self.kind == "segmentation" else "value"
        raise UserError(f"{shard if shard is not None else 'a shard'}: labels/{self.label} of sample "
                        f"'{sample_id}' holds {what} {shown}, but {self.allowed()}; fix the labels (convert "
                        f"again) or the task config")


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"images": {s: torch.stack([x["images"][s] for x in samples]) for s in samples[0]["images"]},
            "target": torch.stack([x["target"] for x in samples]), "ids": [x["id"] for x in samples]}


def split_paths(cfg: FinetuneConfig, root: Path, split: str) -> list[Path]:
    patterns = getattr(cfg.data, split)
    return expand_shard_args([p if Path(p).is_absolute() else str(root / p) for p in patterns]) if patterns else []


def task_stats(cfg: FinetuneConfig, root: Path) -> Stats:
    """The band statistics the task normalizes with (computed on the training shards)."""
    train = split_paths(cfg, root, "train")
    path = Path(cfg.data.stats_file) if cfg.data.stats_file else None
    if path is not None and not path.is_absolute():
        path = root / path
    if path is None:
        path = default_stats_path(train) if train else root / "stats.json"
    return load_stats(path, hint=str(root / cfg.data.train[0]) if cfg.data.train else None)


def make_loader(dataset: TaskDataset, batch_size: int, *, train: bool, rank: int, world: int, seed: int, epoch: int,
                num_workers: int, pin_memory: bool, start_batch: int = 0) -> DataLoader:
    """Each rank reads a disjoint slice; training shuffles per epoch with a seed, gives every sample an
    augmentation seed and drops the last partial batch (equal step counts on every rank), from batch
    ``start_batch`` of the epoch on; evaluation keeps every sample exactly once."""
    if train:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(dataset), generator=generator).tolist()
        aug_seeds = torch.randint(0, 2**62, (len(dataset),), generator=generator).tolist()
        per_rank = len(order) // world
        mine = range(rank * per_rank, (rank + 1) * per_rank)
        keys = [(order[i], aug_seeds[i]) for i in mine]
        full = len(keys) // batch_size
        batches = [keys[b * batch_size:(b + 1) * batch_size] for b in range(start_batch, full)]
        return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
                          collate_fn=collate, persistent_workers=False)
    indices = list(range(rank, len(dataset), world))
    subset = torch.utils.data.Subset(dataset, indices)
    return DataLoader(subset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers,
                      pin_memory=pin_memory, collate_fn=collate, persistent_workers=False)


class CheckedBatches:
    """An evaluation loader whose batches pass the dataset's label check (in this process)."""

    def __init__(self, loader: DataLoader, dataset: TaskDataset) -> None:
        self.loader, self.dataset = loader, dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.dataset.check_batch(batch)
            yield batch


class EpochBatches:
    """Fine-tuning's training batches as the trainer reads them: one ``(group, batch)`` per step, a new
    seeded order every epoch; the position (a step count) travels with checkpoints, so a resumed run
    continues mid-epoch with the same batches."""

    def __init__(self, dataset: TaskDataset, group: str, batch_size: int, *, rank: int, world: int, seed: int,
                 num_workers: int, pin_memory: bool) -> None:
        self.dataset, self.group, self.batch_size = dataset, group, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.steps_per_epoch = len(dataset) // (batch_size * world)
        if self.steps_per_epoch < 1:
            raise UserError(f"{len(dataset)} training samples make no full batch of {batch_size} x {world} "
                            f"ranks; lower data.batch_size_per_gpu")
        self.step = 0  # the next step to yield

    def __iter__(self) -> Iterator[list[tuple[str, dict[str, Any]]]]:
        epoch, position = divmod(self.step, self.steps_per_epoch)
        loader = make_loader(self.dataset, self.batch_size, train=True, rank=self.rank, world=self.world,
                             seed=self.seed, epoch=epoch, num_workers=self.num_workers, pin_memory=self.pin_memory,
                             start_batch=position)
        for batch in loader:
            self.dataset.check_batch(batch)
            self.step += 1  # counted before handing out: a checkpoint taken now resumes after it
            yield [(self.group, batch)]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            warnings.warn(f"steps per epoch changed since the checkpoint ({state['steps_per_epoch']} -> "
                          f"{self.steps_per_epoch}): the data or batch size differ, so the order differs from the "
                          f"interrupted run", stacklevel=2)
        self.step = int(state["step"])
