"""``pretrain()``: from parsed arguments to a finished (or resumed) pretraining run.

Order matters: every check that needs only the configs runs before any data is read; the data
is planned once (shards, statistics, batch sizes) and checked against the ds_config before any
process group does real work; then the task, the optimizer and the DeepSpeed engine; then
auto-resume; then the loop.
"""
from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import deepspeed.comm as dist
import torch

from msgfm.config import RunConfig, load_config, save_config
from msgfm.data.pipeline import build_pretrain_data
from msgfm.data.plan import DataPlan, configured_batches, plan_data
from msgfm.errors import check_output_folder
from msgfm.models import reinit_experts
from msgfm.tasks import build_pretrain_task
from msgfm.train import checkpoint as ckpt
from msgfm.train import ds_config as dsc
from msgfm.train.config_guard import guard_resume, note_changes
from msgfm.train.engine import build_engine, total_steps
from msgfm.train.evaluation import HeldOutLoss
from msgfm.train.optim import build_optimizer
from msgfm.train.runtime import device_name, git_commit, init_process_group, seed_everything
from msgfm.train.schedule import LRSchedule, describe_rates, effective_lrs, reference_group
from msgfm.train.tracking import ShardSet, Tracker
from msgfm.train.trainer import Trainer, TrainerSettings
from msgfm.train.validate import resolve_data_root, startup_checks


def pretrain(config: str, overrides: Sequence[str], ds_config_path: str, data_root: str | None,
             output_dir: str, dry_run: bool = False, world_size: int | None = None,
             allow_config_change: bool = False) -> int:
    """Run (or dry-run) pretraining; returns the process exit code. ``allow_config_change``: resume a run
    folder whose checkpoint was written with other training settings (msgfm/train/config_guard.py)."""
    cfg = load_config(config, overrides)
    ds_config = dsc.load_ds_config(ds_config_path)
    ds_name = str(ds_config_path)
    root = resolve_data_root(cfg, data_root)
    if dry_run:
        from msgfm.train.dryrun import dry_run as run_dry  # the dry run builds the model on the CPU only

        return run_dry(cfg, ds_config, ds_name, root, world_size)
    check_output_folder(output_dir, "--output-dir", create=False)  # before any data is read

    on_gpu = torch.cuda.is_available()
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    fixed = configured_batches(cfg)
    # configs first (with auto batch sizes the batch checks wait for the data), then the data, once
    startup_checks(cfg, ds_config, ds_name, env_world, on_gpu, {g: b for g, (b, _) in fixed.items()} if fixed else None)
    plan = plan_data(cfg, root)
    if fixed is None:
        dsc.check_ds_config(ds_config, ds_name, plan.batch_sizes, env_world)

    rank, _ = init_process_group(on_gpu)
    out = Path(output_dir)
    ckpt.prepare_run_folder(out, rank)
    dist.barrier()
    latest = ckpt.find_resumable(out / "checkpoints")  # collective: every rank verifies what it will read
    # before anything is built: a changed architecture is one line, not a failed load
    changes = guard_resume(latest, cfg.to_dict(), allow_config_change, rank) if latest is not None else []
    trainer = build_trainer(cfg, ds_config, plan, out)
    if latest is not None:
        trainer.resume(latest)
    start_tracking(trainer, cfg, plan, resumed=latest is not None)
    if latest is not None and trainer.rank == 0:
        note_changes(trainer.tracker, trainer.step, latest, changes)
    try:
        trainer.fit()
    finally:
        trainer.tracker.close()
    if trainer.rank == 0:
        _print_where(out, trainer.tracker)
    return 0


def build_trainer(cfg: RunConfig, ds_config: dict[str, Any], plan: DataPlan, out: Path,
                  tracking: bool = True) -> Trainer:
    """Task, data, optimizer, DeepSpeed engine and schedule of one rank (process group already up)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    seed = cfg.train.seed
    seed_everything(seed)  # identical initial weights on every rank
    task = build_pretrain_task(cfg)  # activation checkpointing per stage: model.grad_checkpointing
    if cfg.model.moe.enabled:
        # DeepSpeed's expert-parallel groups are consecutive ranks: this rank holds experts of index rank % E
        reinit_experts(task, seed, ep_rank=rank % cfg.model.moe.expert_parallel_size)
    data = build_pretrain_data(cfg, plan, rank, world, seed)
    base_lrs = dict(data.lrs)
    reference = reference_group(base_lrs)
    peak_lrs = effective_lrs(base_lrs, data.batch_sizes, world, cfg.optimizer)
    optimizer = build_optimizer(task, cfg.optimizer, lr=peak_lrs[reference], on_gpu=torch.cuda.is_available())
    engine = build_engine(task, optimizer, ds_config, seed, rank)
    schedule = LRSchedule(cfg.schedule, steps_per_epoch=data.train.steps_per_epoch, reference_lr=base_lrs[reference])
    train, track = cfg.train, cfg.tracking
    settings = TrainerSettings(total_steps=total_steps(schedule, train.max_steps), mode=train.mode,
                               log_interval=train.log_interval, tracking_interval=track.log_interval,
                               figure_interval=track.figure_interval, checkpoint_interval=train.checkpoint_interval,
                               eval_interval_epochs=train.val_interval_epochs, keep_last=train.keep_last,
                               max_nonfinite_steps=train.max_nonfinite_steps)
    tracker = Tracker(cfg.tracking, out, active=tracking and rank == 0 and cfg.tracking.enabled)
    client_extra = {"config": cfg.to_dict(), "ds_config": ds_config, "stats": data.stats, "git_commit": git_commit()}
    return Trainer(engine, data.train, base_lrs=peak_lrs, schedule=schedule, settings=settings, tracker=tracker,
                   output_dir=out, rank=rank, world_size=world, client_extra=client_extra,
                   evaluator=HeldOutLoss(data.val, train.max_val_batches),
                   group_sensors={g.name: g.sensors for g in cfg.data.groups}, reference_group=reference)


def start_tracking(trainer: Trainer, cfg: RunConfig, plan: DataPlan, resumed: bool) -> None:
    """Rank 0: write the resolved configs beside the run, open (or reopen) the MLflow run, say what runs."""
    if trainer.rank != 0:
        return
    out = trainer.output_dir
    ds_config, stats = trainer.client_extra["ds_config"], trainer.client_extra["stats"]
    save_config(cfg, out / "config.yaml")
    (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    steps_per_epoch = trainer.data.steps_per_epoch
    passes = plan.passes_per_epoch(cfg, trainer.world_size)
    trainer.tracker.open(
        run_name=f"{cfg.name}-{out.name}", resumed=resumed, resume_step=trainer.step,
        params={"config": cfg.to_dict(), "ds_config": ds_config,
                "resolved": {"batch_size_per_gpu": plan.batch_sizes, "base_lr": plan.lrs, "lr": trainer.base_lrs,
                             "passes_per_epoch": passes,
                             "steps_per_epoch": steps_per_epoch, "total_steps": trainer.total_steps}},
        tags={"git_commit": git_commit(), "world_size": str(trainer.world_size), "devices": device_name(),
              "host": socket.gethostname(), "precision": dsc.precision(ds_config)},
        artifacts={"config": out / "config.yaml", "config/ds": out / "ds_config.json",
                   "config/stats": out / "stats.json"},
        datasets=[ShardSet(name=name, context="training", shards=tuple(summary.shards))
                  for name, summary in plan.summaries.items()])
    print(f"msgfm pretraining: {cfg.name}, {trainer.world_size} rank(s), {dsc.precision(ds_config)}, ZeRO-"
          f"{dsc.zero_stage(ds_config)}, groups {plan.batch_sizes} per GPU, train.mode {cfg.train.mode}, "
          f"{steps_per_epoch} steps/epoch ({cfg.data.epoch}), {trainer.total_steps} steps", flush=True)
    print("  learning rates per group:\n    " + "\n    ".join(
        describe_rates(plan.lrs, plan.batch_sizes, trainer.world_size, cfg.optimizer, cfg.schedule)), flush=True)
    print(f"  passes over each group's data per epoch: {passes}", flush=True)


def _print_where(out: Path, tracker: Tracker) -> None:
    latest = ckpt.find_latest(out / "checkpoints")
    rows = []
    if (out / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    print("\nDone.", flush=True)
    if len(losses) >= 2:
        k = max(1, len(losses) // 5)  # average a fifth of the log points at each end: single steps are noisy
        first = sum(v for _, v in losses[:k]) / k
        last = sum(v for _, v in losses[-k:]) / k
        print(f"  loss:        {first:.4f} (steps {losses[0][0]}-{losses[k - 1][0]}) -> {last:.4f} "
              f"(steps {losses[-k][0]}-{losses[-1][0]}), summed over the groups", flush=True)
    print(f"  checkpoint:  {latest}", flush=True)
    print(f"  figures:     {out / 'figures'} (also in the MLflow run's artifacts)", flush=True)
    print(f"  metrics:     {out / 'metrics.jsonl'}", flush=True)
    if tracker.uri.startswith("sqlite"):
        print(f"  MLflow run:  {tracker.run_id} in {tracker.uri}\n"
              f"  open it:     {tracker.ui_command()}   (then http://127.0.0.1:5000)", flush=True)
    else:
        print(f"  MLflow run:  {tracker.run_id} at {tracker.uri}", flush=True)
