"""The training loop, readable top to bottom: one outer step = one batch of every group.

Per step and per group (``train.mode: per_group``, DESIGN.md decision 4)::

    out = engine(images, group)        # forward: the model masks and reconstructs
    engine.backward(out["loss"])
    set_lr(group's base LR x schedule factor)
    engine.step()

``train.mode: joint`` sums the group losses and takes one step at the first
group's LR. Metrics stay on the device until a logging step (see metrics.py).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from msgfm.config import RunConfig
from msgfm.data.device_transforms import device_batch
from msgfm.train import checkpoint as ckpt
from msgfm.train.figures import figure_cases, save_reconstruction_figure
from msgfm.train.metrics import LOSS_KEYS, IntervalMetrics, loss_terms, self_cross_terms
from msgfm.train.optim import set_lr
from msgfm.train.schedule import LRSchedule
from msgfm.train.tracking import Tracker

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/Inf for train.max_nonfinite_steps consecutive steps."""


class Trainer:
    """Runs the steps, validation, checkpoints and logging of one pretraining run."""

    def __init__(self, cfg: RunConfig, engine: Any, data: Any, schedule: LRSchedule, base_lrs: dict[str, float],
                 tracker: Tracker, output_dir: Path, rank: int, world_size: int, client_extra: dict[str, Any]) -> None:
        self.cfg, self.engine, self.data, self.schedule = cfg, engine, data, schedule
        self.base_lrs, self.tracker, self.output_dir = base_lrs, tracker, output_dir
        self.rank, self.world_size = rank, world_size
        self.client_extra = client_extra
        self.ckpt_root = output_dir / "checkpoints"
        self.device = engine.device
        self.dtype = torch.half if engine.fp16_enabled() else (torch.bfloat16 if engine.bfloat16_enabled() else None)
        self.step = 0
        self.last_saved_step = -1
        self.metrics = IntervalMetrics()
        self.consecutive_nonfinite = torch.zeros((), device=self.device)
        self.figure_outputs: dict[str, dict[str, Any]] = {}
        self.total_steps = schedule.total_steps if cfg.train.max_steps is None else \
            min(cfg.train.max_steps, schedule.total_steps)
        self.last_print = (time.perf_counter(), 0)
        self.patch_size = cfg.model.patch_size

    # ------------------------------------------------------------------ main loop

    def fit(self) -> None:
        """Train until ``total_steps``: validation and a checkpoint at every epoch end, one at the end."""
        steps_per_epoch = self.schedule.steps_per_epoch
        while self.step < self.total_steps:
            epoch_done = True
            batches_iter: Iterator = iter(self.data.train)
            while True:
                waited = time.perf_counter()
                # A DataLoader draws its base seed from the global RNGs when its iterator starts (each
                # epoch, and after a resume mid-epoch): keep that out of the training streams, so a
                # resumed run draws the same masks as an uninterrupted one.
                rng = ckpt.host_rng_state()
                try:
                    step_batches = next(batches_iter)
                except StopIteration:
                    break
                finally:
                    ckpt.set_host_rng_state(rng)
                self.metrics.data_wait += time.perf_counter() - waited
                self.train_step(step_batches)
                self.step += 1
                self.after_step()
                if self.step >= self.total_steps:
                    epoch_done = self.step % steps_per_epoch == 0
                    break
            if epoch_done:
                epoch = self.step // steps_per_epoch
                if epoch % self.cfg.train.val_interval_epochs == 0 or self.step >= self.total_steps:
                    self.validate(epoch)
                self.save()
        if self.last_saved_step != self.step:
            self.save()

    def train_step(self, step_batches: list[tuple[str, dict]]) -> None:
        """One outer step: every group's batch, in config order (metrics stay on the device)."""
        cfg, engine = self.cfg, self.engine
        log_now = self._is_log_step(self.step + 1)
        figure_now = self.rank == 0 and self.tracker.active and (self.step + 1) % cfg.tracking.figure_interval == 0
        factor = self.schedule.factor(self.step)
        joint_loss = None
        step_finite = torch.ones((), dtype=torch.bool, device=self.device)
        for group, batch in step_batches:
            started = time.perf_counter()
            batch = device_batch(batch, self.device, self.dtype)
            images = {s: self._to_device(x) for s, x in batch["images"].items()}
            valid = {s: v.to(self.device, non_blocking=True) for s, v in batch.get("valid", {}).items()} or None
            out = engine(images, group, valid=valid)
            loss = out["loss"]
            step_finite &= torch.isfinite(loss.detach())
            for key, value in {**loss_terms(out), **self_cross_terms(out, valid, self.patch_size)}.items():
                self.metrics.add(f"train/{group}/{key}", value)
            if log_now:
                self._record_expert_load(group)
            if figure_now:
                self.figure_outputs[group] = figure_cases(out, images)
            if cfg.train.mode == "per_group":
                engine.backward(loss)
                lr = self.base_lrs[group] * factor
                set_lr(engine.optimizer, lr)
                engine.step()
                self.metrics.add(f"lr/{group}", engine.optimizer.param_groups[0]["lr"])
                self._record_grad_norm(group)
            else:
                joint_loss = loss if joint_loss is None else joint_loss + loss
            self.metrics.samples[group] += next(iter(images.values())).shape[0]
            self.metrics.group_time[group] += time.perf_counter() - started
        if joint_loss is not None:
            started = time.perf_counter()
            engine.backward(joint_loss)
            first = step_batches[0][0]
            set_lr(engine.optimizer, self.base_lrs[first] * factor)
            engine.step()
            self.metrics.add("lr/joint", engine.optimizer.param_groups[0]["lr"])
            self._record_grad_norm("joint")
            spent = (time.perf_counter() - started) / len(step_batches)
            for group, _ in step_batches:
                self.metrics.group_time[group] += spent
        self.consecutive_nonfinite = torch.where(step_finite, torch.zeros_like(self.consecutive_nonfinite),
                                                 self.consecutive_nonfinite + 1)
        self.metrics.steps += 1

    def after_step(self) -> None:
        """Logging, figures and the interval checkpoint after ``self.step`` completed steps."""
        cfg = self.cfg
        if self._is_log_step(self.step):
            self.check_finite()
            self.log_interval()
        if self.figure_outputs:
            self.log_figures()
        if self.step % cfg.train.checkpoint_interval == 0 and self.step < self.total_steps:
            self.save()

    # ------------------------------------------------------------------ logging

    def _is_log_step(self, step: int) -> bool:
        return step % self.cfg.tracking.log_interval == 0 or step % self.cfg.train.log_interval == 0

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.to(self.dtype) if self.dtype is not None and x.is_floating_point() else x

    def _record_grad_norm(self, group: str) -> None:
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            self.metrics.add(f"grad_norm/{group}", norm)

    def _record_expert_load(self, group: str) -> None:
        module = self.engine.module
        if not hasattr(module, "expert_load"):
            return
        for layer, load in module.expert_load().items():
            for e, share in enumerate(load["share"].tolist()):
                self.metrics.add(f"moe/{group}/{layer}/expert{e}_share", float(share))
            self.metrics.add(f"moe/{group}/{layer}/dropped_fraction", float(load["dropped_fraction"]))

    def log_interval(self) -> None:
        values = self.metrics.flush()
        group_losses = [v for k, v in values.items() if k.startswith("train/") and k.endswith("/loss")]
        values["train/loss"] = sum(group_losses)
        optimizer = self.engine.optimizer
        scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
        if isinstance(scale, (int, float)):
            values["loss_scale"] = float(scale)
        values["overflow_skipped_steps"] = float(self.engine.skipped_steps)
        values["epoch"] = self.step / self.schedule.steps_per_epoch
        if self.step % self.cfg.tracking.log_interval == 0:
            self.tracker.log_metrics(values, self.step)
        if self.rank == 0 and self.step % self.cfg.train.log_interval == 0:
            self.print_progress(values)

    def print_progress(self, values: dict[str, float]) -> None:
        now = time.perf_counter()
        last_time, last_step = self.last_print
        self.last_print = (now, self.step)
        per_step = (now - last_time) / max(self.step - last_step, 1)
        eta = per_step * (self.total_steps - self.step)
        groups = " ".join(f"{g}={values.get(f'train/{g}/loss', float('nan')):.4f}" for g in self.base_lrs)
        print(f"step {self.step}/{self.total_steps} epoch {values['epoch']:.2f} loss {values['train/loss']:.4f} "
              f"({groups}) {values['throughput/samples_per_s']:.1f} samples/s "
              f"data-wait {100 * values['time/data_wait_fraction']:.0f}% ETA {_hms(eta)}", flush=True)

    def log_figures(self) -> None:
        fig_dir = self.output_dir / "figures"
        for group, cases in self.figure_outputs.items():
            path = fig_dir / f"recon_{group}_step{self.step:08d}.png"
            self.tracker.log_artifact(lambda c=cases, p=path, g=group, s=self.step: save_reconstruction_figure(c, g, p, s),
                                      "figures")
        self.figure_outputs = {}

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self, epoch: int) -> dict[str, float]:
        """Reconstruction loss per group and sensor (self / cross) on the held-out split, averaged over ranks."""
        import deepspeed.comm as dist

        val = getattr(self.data, "val", None) or {}
        # validation draws masks too: keep it from shifting the training RNG streams (exact resume)
        rng = ckpt.rng_state()
        self.engine.eval()
        results: dict[str, float] = {}
        for group, batches in val.items():
            limit = self.cfg.train.max_val_batches
            local = len(batches) if hasattr(batches, "__len__") else (limit or 0)
            # every rank must run the same number of MoE forwards (all-to-all)
            count = torch.tensor([min(local, limit) if limit else local], dtype=torch.long, device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            n = int(count.item())
            # one fixed list of keys on every rank: a rank may see no cross (or self) rows in its batches
            sensors = self.cfg.data.group(group).sensors
            keys = [*LOSS_KEYS, *(f"{kind}/{s}" for kind in ("recon", "recon_self", "recon_cross") for s in sensors)]
            sums_K = torch.zeros(len(keys), device=self.device, dtype=torch.float64)
            counts_K = torch.zeros_like(sums_K)
            for i, batch in enumerate(batches):
                if i >= n:
                    break
                batch = device_batch(batch, self.device, self.dtype)
                images = {s: self._to_device(x) for s, x in batch["images"].items()}
                valid = {s: v.to(self.device) for s, v in batch.get("valid", {}).items()} or None
                out = self.engine(images, group, valid=valid)
                terms = {**loss_terms(out), **self_cross_terms(out, valid, self.patch_size)}
                for k, key in enumerate(keys):
                    if key in terms:
                        sums_K[k] += terms[key].double()
                        counts_K[k] += 1
            if n == 0:
                continue
            totals = torch.stack([sums_K, counts_K])
            dist.all_reduce(totals)
            for key, total, count in zip(keys, *totals.tolist()):
                if count > 0:
                    results[f"val/{group}/{key}"] = total / count
        self.engine.train()
        ckpt.set_rng_state(rng)
        if results:
            self.tracker.log_metrics({**results, "epoch": float(epoch)}, self.step)
            if self.rank == 0:
                shown = " ".join(f"{k[4:]}={v:.4f}" for k, v in results.items() if k.endswith("/recon_loss"))
                print(f"validation after epoch {epoch}: {shown}", flush=True)
        return results

    # ------------------------------------------------------------------ checkpoints

    def check_finite(self) -> None:
        bad = int(self.consecutive_nonfinite.item())
        if bad >= self.cfg.train.max_nonfinite_steps:
            latest = ckpt.find_latest(self.ckpt_root)
            raise NonFiniteLossError(
                f"the loss was NaN/Inf for the last {bad} steps (train.max_nonfinite_steps="
                f"{self.cfg.train.max_nonfinite_steps}); stopping. The last good checkpoint is "
                f"{latest or 'none (no checkpoint was written)'}; lower the learning rates or check the data")

    def save(self) -> None:
        if self.last_saved_step == self.step:
            return
        if int(self.consecutive_nonfinite.item()) > 0:
            self.check_finite()
            if self.rank == 0:
                print(f"step {self.step}: loss not finite, checkpoint skipped (keeping the last good one)", flush=True)
            return
        client = {"msgfm": {"step": self.step, "epoch": self.step / self.schedule.steps_per_epoch,
                            "steps_per_epoch": self.schedule.steps_per_epoch, **self.client_extra}}
        rank_state = {"rng": ckpt.rng_state(), "data": self.data.train.state_dict(), "step": self.step}
        path = ckpt.save(self.engine, self.ckpt_root, self.step, client, rank_state, self.cfg.train.keep_last)
        self.last_saved_step = self.step
        if self.rank == 0:
            print(f"step {self.step}: checkpoint {path}", flush=True)

    def resume(self, path: Path) -> None:
        client, rank_state = ckpt.load(self.engine, path)
        self.step = int(rank_state["step"])
        self.last_saved_step = self.step
        self.data.train.load_state_dict(rank_state["data"])
        ckpt.set_rng_state(rank_state["rng"])  # last: nothing may draw between here and the next step
        self.last_print = (time.perf_counter(), self.step)
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
