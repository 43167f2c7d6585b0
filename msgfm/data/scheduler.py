"""The heterogeneous-batch scheduler: every training step yields one batch from every data group
due in that step, in the config's fixed order, with the same batch sizes, the same groups and the
same number of steps on every rank (the MoE all-to-all hangs otherwise).

Order of samples. Group ``g`` with ``n_g`` training samples, per-rank batch ``B_g`` and
``R`` ranks: every group epoch draws a seeded permutation of its samples, keeps the first
``R * (n_g // R)`` of them and gives rank ``r`` the ``r``-th block of ``n_g // R``
(disjoint across ranks), cut into ``nb_g = (n_g // R) // B_g`` full batches (the remainder is
dropped on every rank alike). One scheduler epoch is ``S = max_g nb_g`` steps.

What an epoch is (``data.epoch``):

* ``every_group_once`` (Appendix B.1: "every type of sensor is iterated through once"): group
  ``g``'s ``k``-th batch of epoch ``e`` runs in step ``e * S + floor((2k + 1) * S / (2 nb_g))``,
  so each group's batches are spread evenly over the epoch and every group's data is seen exactly
  once per epoch; a step holds the groups due in it (the largest group is due in every step).
* ``largest_group_once``: every group in every step; global step ``s`` takes batch ``s mod nb_g``
  of group epoch ``s // nb_g``, so a smaller group reshuffles and starts again when exhausted
  (``S / nb_g`` passes per epoch).

Which groups are due depends only on the ``nb_g``, equal on every rank: every rank runs the same
sequence of forwards. The whole order is a function of (seed, group position, group epoch):
resuming from ``state_dict()`` (the next global step) gives exactly the batches of an
uninterrupted run, augmentations included, because each sample carries its own augmentation seed.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from msgfm.config import RunConfig
from msgfm.errors import UserError

log = logging.getLogger(__name__)

# A raw batch as produced by the per-group DataLoaders (msgfm.data.device_transforms.collate_raw).
Batch = dict[str, Any]


def resolve_group_batches(cfg: RunConfig, group_sizes: Mapping[str, int]) -> dict[str, tuple[int, float]]:
    """Per-GPU batch size and learning rate of every group, in config order.

    Integer ``batch_size_per_gpu`` is used as given, with the group's ``lr``. ``"auto"`` groups
    share ``data.total_batch_size_per_gpu`` (minus the fixed groups' batches) in proportion to
    their sample counts in ``group_sizes`` (largest remainder, at least 1 each), so that every
    group has about as many batches per epoch; their LR is set once, by the linear rule from the
    reference group: ``data.reference_lr x batch / data.reference_batch_size``. These are base
    rates: ``optimizer.lr_reference_batch`` scales them later (msgfm.train.schedule).
    """
    data = cfg.data
    missing = [g.name for g in data.groups if g.name not in group_sizes]
    if missing:
        raise UserError(f"resolve_group_batches: no sample count for groups {missing}")
    fixed = {g.name: int(g.batch_size_per_gpu) for g in data.groups if g.batch_size_per_gpu != "auto"}
    auto = [g for g in data.groups if g.batch_size_per_gpu == "auto"]
    sizes: dict[str, int] = dict(fixed)
    if auto:
        total = data.total_batch_size_per_gpu
        assert total is not None, "DataConfig.__post_init__ requires it with auto batch sizes"
        budget = total - sum(fixed.values())
        if budget < len(auto):
            raise UserError(f"config key 'data.total_batch_size_per_gpu': {total} leaves {budget} samples for "
                            f"the {len(auto)} auto groups {[g.name for g in auto]} after the fixed groups "
                            f"{fixed}; each needs at least 1: raise it to >= {sum(fixed.values()) + len(auto)}")
        sizes.update(_split_proportionally(budget, {g.name: group_sizes[g.name] for g in auto}))
    out = {}
    for g in data.groups:
        batch = sizes[g.name]
        if g.batch_size_per_gpu == "auto":
            lr = data.reference_lr * batch / data.reference_batch_size
        else:
            assert g.lr is not None, "DataGroupConfig.__post_init__ requires lr with a fixed batch size"
            lr = g.lr
        out[g.name] = (batch, lr)
    return out


def _split_proportionally(total: int, weights: Mapping[str, int]) -> dict[str, int]:
    """Integers summing to ``total``, proportional to ``weights``, each at least 1."""
    weight_sum = sum(weights.values())
    if weight_sum <= 0:
        raise UserError(f"auto batch sizes need sample counts > 0, got {dict(weights)}")
    ideal = {k: total * w / weight_sum for k, w in weights.items()}
    sizes = {k: max(1, math.floor(v)) for k, v in ideal.items()}
    by_remainder = sorted(weights, key=lambda k: ideal[k] - sizes[k], reverse=True)
    i = 0
    while sum(sizes.values()) < total:
        sizes[by_remainder[i % len(by_remainder)]] += 1
        i += 1
    while sum(sizes.values()) > total:  # only after the at-least-1 bumps: take from the largest
        largest = max(sizes, key=lambda k: sizes[k])
        sizes[largest] -= 1
    return sizes


@dataclass(frozen=True)
class GroupOrder:
    """The sample order of one group on one rank: which (index, augmentation seed) pairs
    make batch ``step`` (see the module docstring)."""

    indices: np.ndarray  # the group's training sample indices (into its GroupDataset)
    batch_size: int
    rank: int
    world_size: int
    seed: int
    group_position: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {self.rank} outside world_size {self.world_size}")

    @property
    def per_rank(self) -> int:
        return len(self.indices) // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch_size

    def epoch_order(self, group_epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The sample indices and augmentation seeds of this rank for one group epoch."""
        rng = np.random.default_rng([self.seed, self.group_position, group_epoch])
        order = rng.permutation(len(self.indices))
        aug_seeds = rng.integers(0, 2**62, size=len(self.indices))
        block = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        return self.indices[order[block]], aug_seeds[block]


EpochMode = str  # "every_group_once" | "largest_group_once" (config key data.epoch)


def due_positions(batches: int, steps_per_epoch: int) -> np.ndarray:
    """The steps of an epoch (0-based) that take a group's ``batches`` batches: evenly spread, the
    ``k``-th at ``floor((2k + 1) * steps_per_epoch / (2 * batches))``, all distinct."""
    if not 1 <= batches <= steps_per_epoch:
        raise ValueError(f"{batches} batches do not fit an epoch of {steps_per_epoch} steps")
    k = np.arange(batches)
    return (2 * k + 1) * steps_per_epoch // (2 * batches)


def passes_per_epoch(batches_per_epoch: Mapping[str, int], epoch: EpochMode) -> dict[str, float]:
    """How often each group's training data is gone through in one scheduler epoch."""
    steps = max(batches_per_epoch.values())
    return {g: 1.0 if epoch == "every_group_once" else steps / nb for g, nb in batches_per_epoch.items()}


class StepRangeBatchSampler:
    """A DataLoader batch sampler over global steps ``[start, stop)`` of one group: a batch for each
    step the group is due in (every step, until :meth:`spread_over` spreads it over an epoch).

    The scheduler sets the range before each pass; sampling runs in the main process, so
    the worker processes only ever see lists of (index, augmentation seed)."""

    def __init__(self, order: GroupOrder) -> None:
        self.order = order
        self.start = 0
        self.stop = 0
        self.steps_per_epoch: int | None = None
        self.batch_at: dict[int, int] = {}  # position in the epoch -> batch index (spread mode)
        self._cache: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None

    def spread_over(self, steps_per_epoch: int) -> None:
        """One pass over the group per ``steps_per_epoch`` steps, its batches spread evenly (module docstring)."""
        self.steps_per_epoch = steps_per_epoch
        positions = due_positions(self.order.batches_per_epoch, steps_per_epoch)
        self.batch_at = {int(p): k for k, p in enumerate(positions)}

    def is_due(self, step: int) -> bool:
        return self.steps_per_epoch is None or step % self.steps_per_epoch in self.batch_at

    def __len__(self) -> int:
        return sum(self.is_due(step) for step in range(self.start, self.stop))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            if self.is_due(step):
                yield self._batch(step)

    def _batch(self, step: int) -> list[tuple[int, int]]:
        if self.steps_per_epoch is None:
            group_epoch, position = divmod(step, self.order.batches_per_epoch)
        else:
            group_epoch, in_epoch = divmod(step, self.steps_per_epoch)
            position = self.batch_at[in_epoch]
        if self._cache is None or self._cache[0] != group_epoch:
            self._cache = (group_epoch, self.order.epoch_order(group_epoch))
        indices, seeds = self._cache[1]
        sl = slice(position * self.order.batch_size, (position + 1) * self.order.batch_size)
        return [(int(i), int(s)) for i, s in zip(indices[sl], seeds[sl])]


class FixedBatchSampler:
    """Validation batches: this rank's disjoint block of ``indices`` in a fixed order, full
    batches only, the same count on every rank."""

    def __init__(self, indices: np.ndarray, batch_size: int, rank: int, world_size: int) -> None:
        per_rank = len(indices) // world_size
        self.batch_size = max(1, min(batch_size, per_rank))
        self.indices = mine = indices[rank * per_rank:(rank + 1) * per_rank]
        self.num_batches = per_rank // self.batch_size if per_rank else 0
        self.batches = [[(int(i), 0) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]
                        for b in range(self.num_batches)]

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)


def split_train_val(num_samples: int, val_fraction: float, seed: int, group_position: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint (train, val) index arrays over ``range(num_samples)``; val gets
    ``ceil(val_fraction x n)`` samples when ``val_fraction > 0`` (at most n - 1)."""
    if val_fraction <= 0 or num_samples < 2:
        return np.arange(num_samples), np.arange(0)
    num_val = min(num_samples - 1, math.ceil(val_fraction * num_samples))
    # A separate stream from the training order: group epoch 2**31 is never reached.
    perm = np.random.default_rng([seed, group_position, 2**31]).permutation(num_samples)
    return np.sort(perm[num_val:]), np.sort(perm[:num_val])


class CorruptSampleError(UserError, RuntimeError):
    """Too many unreadable samples: the run stops rather than train on a shrinking dataset."""


class CorruptTracker:
    """Counts samples read and corrupt samples skipped (they arrive with each batch from the
    workers) and stops the run past ``max_fraction``.

    The allowance is ``max_fraction x max(samples read, group size)``: the group size as a
    floor so that one bad sample early in a run is not judged against a handful of reads.
    """

    def __init__(self, max_fraction: float, group_sizes: Mapping[str, int]) -> None:
        self.max_fraction = max_fraction
        self.group_sizes = dict(group_sizes)
        self.read = {g: 0 for g in group_sizes}
        self.corrupt = {g: 0 for g in group_sizes}

    def update(self, group: str, batch: Batch) -> Batch:
        """Record a batch's read/corrupt counts, strip the side channel, check the limit."""
        records = batch.pop("corrupt", [])
        self.read[group] += len(batch["ids"]) + len(records)
        if records:
            self.corrupt[group] += len(records)
            for path, index, error in records:
                log.warning("group %s: skipped corrupt sample %d of %s (%s); replaced by another sample",
                            group, index, path, error)
            allowed = self.max_fraction * max(self.read[group], self.group_sizes[group])
            if self.corrupt[group] > allowed:
                raise CorruptSampleError(
                    f"group '{group}': {self.corrupt[group]} corrupt samples out of {self.read[group]} read, "
                    f"more than data.max_corrupt_fraction={self.max_fraction}; last one: sample {records[-1][1]} "
                    f"of {records[-1][0]} ({records[-1][2]}). Re-create the damaged shards (msgfm convert ...) "
                    f"or raise data.max_corrupt_fraction")
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"read": dict(self.read), "corrupt": dict(self.corrupt)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.read.update(state.get("read", {}))
        self.corrupt.update(state.get("corrupt", {}))


class HeterogeneousScheduler:
    """Iterating yields one scheduler epoch (or what is left of it): per step a list of
    ``(group_name, raw_batch)`` in config order (stored arrays, crop boxes, flips and
    ``"ids"``; ``msgfm.data.device_transforms.device_batch`` makes the model's batch of it).

    ``loaders`` are DataLoaders (any iterable works) whose batch sampler is the group's
    :class:`StepRangeBatchSampler`; the scheduler sets the step range before each pass.
    """

    def __init__(self, names: Sequence[str], loaders: Sequence[Any], samplers: Sequence[StepRangeBatchSampler],
                 tracker: CorruptTracker, seed: int, epoch: EpochMode = "every_group_once") -> None:
        assert len(names) == len(loaders) == len(samplers)
        empty = [n for n, s in zip(names, samplers) if s.order.batches_per_epoch < 1]
        if empty:
            details = ", ".join(f"'{n}' ({s.order.per_rank} training samples per rank < batch "
                                f"{s.order.batch_size})" for n, s in zip(names, samplers) if n in empty)
            raise UserError(f"data groups without a single full batch per rank: {details}; add samples, "
                            f"lower batch_size_per_gpu or use fewer ranks")
        self.names = list(names)
        self.loaders = list(loaders)
        self.samplers = list(samplers)
        self.tracker = tracker
        self.seed = seed
        self.epoch_mode = epoch
        if epoch == "every_group_once":
            for sampler in self.samplers:
                sampler.spread_over(self.steps_per_epoch)
        elif epoch != "largest_group_once":
            raise UserError(f"config key 'data.epoch': every_group_once or largest_group_once, got {epoch!r}")
        self.step = 0  # the next global step to yield

    @property
    def batches_per_epoch(self) -> dict[str, int]:
        return {n: s.order.batches_per_epoch for n, s in zip(self.names, self.samplers)}

    @property
    def steps_per_epoch(self) -> int:
        return max(self.batches_per_epoch.values())

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def epoch(self) -> int:
        """Completed scheduler epochs (the index of the epoch the next step belongs to)."""
        return self.step // self.steps_per_epoch

    @property
    def passes_per_epoch(self) -> dict[str, float]:
        """Passes over each group's training samples in one epoch (1 for every group by default)."""
        return passes_per_epoch(self.batches_per_epoch, self.epoch_mode)

    @property
    def group_epochs(self) -> dict[str, int]:
        """Completed passes over each group's training samples (for logging)."""
        if self.epoch_mode == "every_group_once":
            return {n: self.epoch for n in self.names}
        return {n: self.step // nb for n, nb in self.batches_per_epoch.items()}

    def due_groups(self, step: int) -> list[str]:
        """The groups whose batch runs in global ``step``, in config order (the same on every rank)."""
        return [n for n, sampler in zip(self.names, self.samplers) if sampler.is_due(step)]

    @property
    def corrupt_counts(self) -> dict[str, int]:
        return dict(self.tracker.corrupt)

    @property
    def samples_read(self) -> dict[str, int]:
        return dict(self.tracker.read)

    def __iter__(self) -> Iterator[list[tuple[str, Batch]]]:
        start = self.step
        stop = (self.epoch + 1) * self.steps_per_epoch
        for sampler in self.samplers:
            sampler.start, sampler.stop = start, stop
        iterators = [iter(loader) for loader in self.loaders]
        for step in range(start, stop):
            batches = [(name, self.tracker.update(name, next(it)))
                       for name, it, sampler in zip(self.names, iterators, self.samplers) if sampler.is_due(step)]
            self.step = step + 1  # counted before handing out: a checkpoint taken now resumes after it
            yield batches

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "batches_per_epoch": self.batches_per_epoch,
                "epoch_mode": self.epoch_mode, "corrupt": self.tracker.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at the recorded step; warns when seed or batch counts differ (the data or the
        config changed, so the order cannot match the interrupted run)."""
        if state.get("seed") != self.seed:
            warnings.warn(f"resuming data order recorded with seed {state.get('seed')} under seed {self.seed}: "
                          f"the batches will differ from the interrupted run", stacklevel=2)
        if dict(state.get("batches_per_epoch", {})) != self.batches_per_epoch:
            warnings.warn(f"batches per epoch changed since the checkpoint ({dict(state.get('batches_per_epoch', {}))}"
                          f" -> {self.batches_per_epoch}): the data or batch sizes differ, so the order "
                          f"differs from the interrupted run", stacklevel=2)
        recorded = state.get("epoch_mode", "largest_group_once")
        if recorded != self.epoch_mode:
            warnings.warn(f"resuming data order recorded with data.epoch={recorded} under data.epoch="
                          f"{self.epoch_mode}: the batches will differ from the interrupted run", stacklevel=2)
        self.step = int(state["step"])
        self.tracker.load_state_dict(state.get("corrupt", {}))
