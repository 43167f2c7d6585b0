"""What the trainer observes: metrics kept on the device between logging steps, expert load, figures.

Per step only tensor additions happen (no ``.item()``, so no device sync);
:meth:`IntervalMetrics.flush` moves everything to the host in one transfer at a logging step
and returns interval averages. :class:`StepObserver` is the trainer's one call per batch: it
records the task's metrics, the MoE expert load on logging steps and figure material on
figure steps, and at a logging step prints a progress line and sends the interval to tracking.
"""
from __future__ import annotations

import functools
import resource
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from msgfm.tasks.base import Task, TaskOutput
from msgfm.train.figures import save_reconstruction_figure
from msgfm.train.runtime import hms
from msgfm.train.tracking import Tracker


class IntervalMetrics:
    """Sums of device scalars and host counters since the last flush."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self.samples: dict[str, int] = defaultdict(int)
        self.group_time: dict[str, float] = defaultdict(float)
        self.data_wait = 0.0
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, key: str, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
            if value.ndim:
                value = value.reshape(())
        prev = self.sums.get(key)
        self.sums[key] = value if prev is None else prev + value
        self.counts[key] += 1

    def flush(self) -> dict[str, float]:
        """Interval averages (one device-to-host copy for all tensors), then reset."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        keys = list(self.sums)
        tensors = [v for v in self.sums.values() if isinstance(v, torch.Tensor)]
        host = iter(torch.stack([t.cpu() if t.device.type != "cpu" else t for t in tensors]).tolist()
                    if tensors else [])
        out: dict[str, float] = {}
        for key in keys:
            value = self.sums[key]
            total = next(host) if isinstance(value, torch.Tensor) else float(value)
            out[key] = total / self.counts[key]
        for group, n in self.samples.items():
            out[f"throughput/{group}_samples_per_s"] = n / max(self.group_time[group], 1e-9)
        out["throughput/samples_per_s"] = sum(self.samples.values()) / elapsed
        out["time/data_wait_fraction"] = self.data_wait / elapsed
        out["time/step_s"] = elapsed / max(self.steps, 1)
        out.update(device_memory())
        self.reset()
        return out


def device_memory() -> dict[str, float]:
    """Allocated and peak device memory in GiB (CUDA), or this process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return {"memory/allocated_gib": torch.cuda.memory_allocated() / 2**30,
                "memory/peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class StepObserver:
    """Everything the trainer records besides the step itself (see the module docstring)."""

    def __init__(self, task: Task, tracker: Tracker, output_dir: Path, rank: int, *, log_interval: int,
                 tracking_interval: int, figure_interval: int | None, groups: list[str]) -> None:
        self.task, self.tracker, self.output_dir, self.rank = task, tracker, output_dir, rank
        self.log_interval, self.tracking_interval, self.figure_interval = log_interval, tracking_interval, \
            figure_interval
        self.groups = groups
        # One accumulator per logging interval (one when they are equal): each reports the mean over its own
        # interval, whichever flushes first.
        self.intervals = {interval: IntervalMetrics() for interval in {log_interval, tracking_interval}}
        self.figure_cases: dict[str, list[dict[str, Any]]] = {}
        self.last_print = (time.perf_counter(), 0)

    # ------------------------------------------------------------------ what every accumulator counts

    def add(self, key: str, value: torch.Tensor | float) -> None:
        for metrics in self.intervals.values():
            metrics.add(key, value)

    def count_data_wait(self, seconds: float) -> None:
        for metrics in self.intervals.values():
            metrics.data_wait += seconds

    def count_group(self, group: str, samples: int, seconds: float) -> None:
        """Samples of ``group`` processed in ``seconds`` (its forward, backward and step)."""
        for metrics in self.intervals.values():
            metrics.samples[group] += samples
            metrics.group_time[group] += seconds

    def count_step(self) -> None:
        for metrics in self.intervals.values():
            metrics.steps += 1

    # ------------------------------------------------------------------ per step

    def is_log_step(self, step: int) -> bool:
        return step % self.tracking_interval == 0 or step % self.log_interval == 0

    def wants_outputs(self, step: int) -> bool:
        """Whether the forward of (1-based) ``step`` should keep its outputs for a figure (rank 0 only)."""
        return self.rank == 0 and self.tracker.active and self.figure_interval is not None and \
            step % self.figure_interval == 0

    def record(self, group: str, step: int, out: TaskOutput, inputs: dict[str, Any]) -> None:
        """One forward of ``group`` in (1-based) ``step``: its metrics, expert load, figure material."""
        for key, value in out["metrics"].items():
            self.add(f"train/{group}/{key}", value)
        if self.is_log_step(step):
            self._record_expert_load(group)
        if "predictions" in out or "output" in out:
            cases = self.task.figure_cases(out, inputs)
            if cases:
                self.figure_cases[group] = cases

    def record_update(self, name: str, lr: float | None, grad_norm: float | None) -> None:
        """The LR in effect at an optimizer step (None: the step was skipped) and the gradient norm it saw."""
        if lr is not None:
            self.add(f"lr/{name}", lr)
        if grad_norm is not None:
            self.add(f"grad_norm/{name}", grad_norm)

    def _record_expert_load(self, group: str) -> None:
        for layer, load in self.task.backbone.expert_load().items():
            for e, share in enumerate(load["share"].tolist()):
                self.add(f"moe/{group}/{layer}/expert{e}_share", float(share))
            self.add(f"moe/{group}/{layer}/dropped_fraction", float(load["dropped_fraction"]))

    # ------------------------------------------------------------------ at a logging step

    def log(self, step: int, total_steps: int, epoch: float, extra: dict[str, float]) -> None:
        """At a logging step: flush each interval that ends here, add ``extra`` (loss scale, ...), send the
        tracking interval's means to tracking and print the console interval's."""
        for interval, metrics in self.intervals.items():
            if step % interval:
                continue
            values = metrics.flush()
            group_losses = [v for k, v in values.items() if k.startswith("train/") and k.endswith("/loss")]
            values["train/loss"] = sum(group_losses)
            values.update(extra)
            values["epoch"] = epoch
            if interval == self.tracking_interval:
                self.tracker.log_metrics(values, step)
            if interval == self.log_interval and self.rank == 0:
                self._print(step, total_steps, values)

    def _print(self, step: int, total_steps: int, values: dict[str, float]) -> None:
        now = time.perf_counter()
        last_time, last_step = self.last_print
        self.last_print = (now, step)
        per_step = (now - last_time) / max(step - last_step, 1)
        eta = per_step * (total_steps - step)
        losses = {g: values.get(f"train/{g}/loss") for g in self.groups}
        groups = " ".join(f"{g}={'-' if v is None else f'{v:.4f}'}" for g, v in losses.items())  # -: not due
        print(f"step {step}/{total_steps} epoch {values['epoch']:.2f} loss {values['train/loss']:.4f} "
              f"({groups}) {values['throughput/samples_per_s']:.1f} samples/s "
              f"data-wait {100 * values['time/data_wait_fraction']:.0f}% ETA {hms(eta)}", flush=True)

    def log_figures(self, step: int) -> None:
        """Render the figure material kept this step on the tracking thread."""
        fig_dir = self.output_dir / "figures"
        for group, cases in self.figure_cases.items():
            path = fig_dir / f"recon_{group}_step{step:08d}.png"
            self.tracker.log_artifact(functools.partial(save_reconstruction_figure, cases, group, path, step),
                                      "figures")
        self.figure_cases = {}
