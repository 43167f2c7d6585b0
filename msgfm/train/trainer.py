"""One Trainer for every task: pretraining (several data groups per step) and fine-tuning (one).

A training step takes one batch of every group due in that step (msgfm.data.scheduler), in a fixed
order. ``train.mode: single_update`` (the paper's reading; docs/training.md)::

    for group, batch in step_batches:
        inputs = task.prepare(batch, group, device, dtype)
        out = engine(inputs, group)        # forward: loss and metrics
        total = total + out["loss"]
    engine.backward(total)
    self._optimizer_step(groups)           # shared at the reference rate, each sensor at its group's rate

``train.mode: per_group``: after each group's forward, ``engine.backward(out["loss"])`` and an
optimizer step at that group's rate that touches only the shared parameters and that group's
sensors (msgfm.train.optim.UpdateGate). In both modes a sensor outside the step's groups keeps its
parameters and optimizer state bit for bit. Rates are set before ``engine.step()`` and recorded as
the optimizer saw them inside the step.

Metrics stay on the device until a logging step; the observer records them, the expert load
and figure material. At every epoch end the evaluator runs (validation for pretraining, the
task metrics and best weights for fine-tuning) and a checkpoint is published; one more at the
end and every ``checkpoint_interval`` steps.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from msgfm.errors import UserError
from msgfm.tasks.base import Task
from msgfm.train import checkpoint as ckpt
from msgfm.train.metrics import StepObserver
from msgfm.train.optim import SHARED, UpdateGate, set_rates
from msgfm.train.runtime import engine_dtype
from msgfm.train.schedule import LRSchedule
from msgfm.train.tracking import Tracker

GroupBatches = list[tuple[str, dict[str, Any]]]


class NonFiniteLossError(UserError, RuntimeError):
    """The loss stayed NaN/Inf for train.max_nonfinite_steps consecutive steps."""


class TrainBatches(Protocol):
    """The training data as the trainer reads it: iterating yields what is left of the current epoch,
    per step one ``(group, batch)`` per group; its position travels with checkpoints."""

    @property
    def steps_per_epoch(self) -> int: ...

    def __iter__(self) -> Iterator[GroupBatches]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class Evaluator(Protocol):
    """Runs at epoch ends (and at the end of training); its state travels with checkpoints."""

    def __call__(self, trainer: Trainer, epoch: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass(kw_only=True)
class TrainerSettings:
    """The loop's knobs, from ``train.*`` and ``tracking.*`` of a run config."""

    total_steps: int
    mode: Literal["single_update", "per_group"] = "per_group"
    log_interval: int = 10
    tracking_interval: int = 10
    figure_interval: int | None = None
    checkpoint_interval: int | None = None  # steps; checkpoints are also published at every epoch end
    eval_interval_epochs: int = 1
    # evaluate after the last step also when it ends an epoch early (fine-tuning scores its final weights)
    evaluate_at_end: bool = False
    keep_last: int = 3
    max_nonfinite_steps: int = 20


class Trainer:
    """Runs the steps, evaluation, checkpoints and logging of one run (any task)."""

    def __init__(self, engine: Any, data: TrainBatches, *, base_lrs: dict[str, float], schedule: LRSchedule,
                 settings: TrainerSettings, tracker: Tracker, output_dir: Path, rank: int, world_size: int,
                 client_extra: dict[str, Any], evaluator: Evaluator | None = None,
                 group_sensors: Mapping[str, Sequence[str]] | None = None, reference_group: str | None = None
                 ) -> None:
        """``base_lrs``: each group's peak rate (after linear scaling), which the schedule factor multiplies.
        ``group_sensors``: the sensors of each group (None: the whole model is shared, as in fine-tuning);
        ``reference_group``: whose rate the shared parameters take in single-update mode (default: the
        group with the largest rate)."""
        self.engine, self.data, self.base_lrs, self.schedule = engine, data, base_lrs, schedule
        self.group_sensors = {g: tuple(s) for g, s in (group_sensors or {}).items()}
        self.reference_group = reference_group or max(base_lrs, key=lambda g: base_lrs[g])
        # a sensor in several groups (RGB: unpaired and with the DSM) takes the largest of their rates
        self.sensor_lrs: dict[str, float] = {}
        for g, sensors in self.group_sensors.items():
            for sensor in sensors:
                self.sensor_lrs[sensor] = max(self.sensor_lrs.get(sensor, 0.0), base_lrs[g])
        self.gate = UpdateGate(engine.optimizer)
        self.settings, self.tracker, self.output_dir = settings, tracker, output_dir
        self.rank, self.world_size = rank, world_size
        self.client_extra, self.evaluator = client_extra, evaluator
        self.task: Task = engine.module
        self.ckpt_root = output_dir / "checkpoints"
        self.device = engine.device
        self.dtype = engine_dtype(engine)
        self.total_steps = settings.total_steps
        self.step = 0
        self.last_saved_step = -1
        self.consecutive_nonfinite = torch.zeros((), device=self.device)
        self.observer = StepObserver(self.task, tracker, output_dir, rank, log_interval=settings.log_interval,
                                     tracking_interval=settings.tracking_interval,
                                     figure_interval=settings.figure_interval, groups=list(base_lrs))

    # ------------------------------------------------------------------ main loop

    def fit(self) -> None:
        """Train until ``total_steps``: evaluation and a checkpoint at every epoch end and at the end."""
        steps_per_epoch = self.data.steps_per_epoch
        while self.step < self.total_steps:
            for step_batches in self._batches():
                self.train_step(step_batches)
                self.step += 1
                self.after_step()
                if self.step >= self.total_steps:
                    break
            last = self.step >= self.total_steps
            epoch_end = self.step % steps_per_epoch == 0
            if epoch_end or last:
                epoch = -(-self.step // steps_per_epoch)  # a last, partial epoch counts
                due = epoch % self.settings.eval_interval_epochs == 0 or last
                if self.evaluator is not None and due and (epoch_end or self.settings.evaluate_at_end):
                    self.evaluator(self, epoch)
                self.save()

    def _batches(self) -> Iterator[GroupBatches]:
        """The rest of this epoch's steps, the waiting for each counted as data wait."""
        batches = iter(self.data)
        while True:
            waited = time.perf_counter()
            # A DataLoader draws its base seed from the global RNGs when its iterator starts (each
            # epoch, and after a resume mid-epoch): keep that out of the training streams, so a
            # resumed run draws the same masks as an uninterrupted one.
            rng = ckpt.host_rng_state()
            try:
                step_batches = next(batches)
            except StopIteration:
                return
            finally:
                ckpt.set_host_rng_state(rng)
            self.observer.count_data_wait(time.perf_counter() - waited)
            yield step_batches

    def train_step(self, step_batches: GroupBatches) -> None:
        """One step: every due group's batch, in order (metrics stay on the device)."""
        step = self.step + 1
        keep_outputs = self.observer.wants_outputs(step)
        total_loss: torch.Tensor | None = None
        step_finite = torch.ones((), dtype=torch.bool, device=self.device)
        for group, batch in step_batches:
            started = time.perf_counter()
            inputs = self.task.prepare(batch, group, self.device, self.dtype)
            out = self.engine(inputs, group, keep_outputs)
            step_finite &= torch.isfinite(out["loss"].detach())
            self.observer.record(group, step, out, inputs)
            if self.settings.mode == "per_group":
                self.engine.backward(out["loss"])
                self._optimizer_step([group])
            else:
                total_loss = out["loss"] if total_loss is None else total_loss + out["loss"]
            self.observer.count_group(group, next(iter(inputs["images"].values())).shape[0],
                                      time.perf_counter() - started)
        if total_loss is not None:
            started = time.perf_counter()
            self.engine.backward(total_loss)
            self._optimizer_step([group for group, _ in step_batches])
            spent = (time.perf_counter() - started) / len(step_batches)
            for group, _ in step_batches:
                self.observer.count_group(group, 0, spent)
        self.consecutive_nonfinite = torch.where(step_finite, torch.zeros_like(self.consecutive_nonfinite),
                                                 self.consecutive_nonfinite + 1)
        self.observer.count_step()

    def update_rates(self, groups: Sequence[str]) -> tuple[float, dict[str, float]]:
        """(shared rate, {sensor: rate}) of an optimizer step over ``groups`` at this step's schedule factor.

        One group (per-group mode, or fine-tuning): everything it touches at its rate. Several (single
        update): the shared parameters at the reference group's rate, each sensor at its own rate."""
        factor = self.schedule.factor(self.step)
        sensors = [s for g in groups for s in self.group_sensors.get(g, ())]
        if len(groups) == 1 and self.settings.mode == "per_group":
            lr = self.base_lrs[groups[0]] * factor
            return lr, {s: lr for s in sensors}
        return self.base_lrs[self.reference_group] * factor, {s: self.sensor_lrs[s] * factor for s in sensors}

    def _optimizer_step(self, groups: Sequence[str]) -> None:
        """Set the rates of this update (each parameter group scaled by its ``lr_scale``), open the gate to
        the shared parameters and the sensors of ``groups`` only, step; record the rates seen at the call."""
        shared_lr, sensor_lrs = self.update_rates(groups)
        set_rates(self.engine.optimizer, shared_lr, sensor_lrs)
        self.gate.active_sensors = set(sensor_lrs) if self.group_sensors else None
        self.engine.step()
        seen = self.gate.drain()
        grad_norm = self.engine.get_global_grad_norm()
        if self.settings.mode == "per_group":
            self.observer.record_update(groups[0], seen.get(SHARED), grad_norm)
            return
        self.observer.record_update(SHARED, seen.get(SHARED), grad_norm)
        for sensor in sensor_lrs:
            self.observer.record_update(f"sensor/{sensor}", seen.get(sensor), None)

    def after_step(self) -> None:
        """Logging, figures and the interval checkpoint after ``self.step`` completed steps."""
        if self.observer.is_log_step(self.step):
            self.check_finite()
            self.observer.log(self.step, self.total_steps, self.step / self.data.steps_per_epoch,
                              self._optimizer_state())
        if self.observer.figure_cases:
            self.observer.log_figures(self.step)
        interval = self.settings.checkpoint_interval
        if interval and self.step % interval == 0 and self.step < self.total_steps:
            self.save()

    def _optimizer_state(self) -> dict[str, float]:
        values = {}
        optimizer = self.engine.optimizer
        scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
        if isinstance(scale, (int, float)):
            values["loss_scale"] = float(scale)
        values["overflow_skipped_steps"] = float(self.engine.skipped_steps)
        return values

    # ------------------------------------------------------------------ checkpoints

    def check_finite(self) -> None:
        bad = int(self.consecutive_nonfinite.item())
        if bad >= self.settings.max_nonfinite_steps:
            latest = ckpt.find_latest(self.ckpt_root)
            raise NonFiniteLossError(
                f"the loss was NaN/Inf for the last {bad} steps (train.max_nonfinite_steps="
                f"{self.settings.max_nonfinite_steps}); stopping. The last good checkpoint is "
                f"{latest or 'none (no checkpoint was written)'}; lower the learning rates or check the data")

    def save(self) -> None:
        """Publish a checkpoint of this step (collective), unless the loss is not finite."""
        if self.last_saved_step == self.step:
            return
        if int(self.consecutive_nonfinite.item()) > 0:
            self.check_finite()
            if self.rank == 0:
                print(f"step {self.step}: loss not finite, checkpoint skipped (keeping the last good one)", flush=True)
            return
        steps_per_epoch = self.data.steps_per_epoch
        client = {"msgfm": {"step": self.step, "epoch": self.step / steps_per_epoch,
                            "steps_per_epoch": steps_per_epoch, **self.client_extra,
                            "evaluator": self.evaluator.state_dict() if self.evaluator is not None else {}}}
        rank_state = {"rng": ckpt.rng_state(), "data": self.data.state_dict(), "step": self.step}
        path = ckpt.save(self.engine, self.ckpt_root, self.step, client, rank_state, self.settings.keep_last,
                         config=self.client_extra.get("config"))
        self.last_saved_step = self.step
        if self.rank == 0:
            print(f"step {self.step}: checkpoint {path}", flush=True)

    def resume(self, path: Path) -> None:
        """Continue exactly where the checkpoint at ``path`` left off (model, optimizer, data, RNGs)."""
        client, rank_state = ckpt.load(self.engine, path)
        self.step = int(rank_state["step"])
        self.last_saved_step = self.step
        self.data.load_state_dict(rank_state["data"])
        if self.evaluator is not None:
            self.evaluator.load_state_dict(client.get("msgfm", {}).get("evaluator", {}))
        ckpt.set_rng_state(rank_state["rng"])  # last: nothing may draw between here and the next step
        self.observer.last_print = (time.perf_counter(), self.step)
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step} (epoch {self.step / self.data.steps_per_epoch:g})",
                  flush=True)
