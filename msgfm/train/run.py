"""``pretrain()``: from parsed arguments to a finished (or resumed) run.

Order matters: every check that needs only the configs runs before any data
is read or any process group is used for real work; then the model, the
optimizer and the DeepSpeed engine; then auto-resume; then the loop.
"""
from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from msgfm.config import RunConfig, load_config, save_config
from msgfm.train import checkpoint as ckpt
from msgfm.train import ds_config as dsc
from msgfm.train.schedule import LRSchedule
from msgfm.train.tracking import Tracker
from msgfm.train.validate import check_data_path, resolve_data_root, startup_checks

if TYPE_CHECKING:
    from msgfm.train.loop import Trainer

log = logging.getLogger(__name__)


def fixed_group_batches(cfg: RunConfig, data_root: Path | None) -> dict[str, tuple[int, float]]:
    """(batch per GPU, base LR) per group; ``auto`` sizes need the sample counts (metadata only)."""
    from msgfm.data.scheduler import resolve_group_batches

    if all(g.batch_size_per_gpu != "auto" for g in cfg.data.groups):
        return resolve_group_batches(cfg, {g.name: 0 for g in cfg.data.groups})
    from msgfm.data.pipeline import validate_data

    if data_root is None or not data_root.is_dir():
        raise ValueError("data.groups[*].batch_size_per_gpu: auto needs the data (sample counts) to resolve; "
                         "pass --data-root or give integer batch sizes")
    sizes = {name: s.num_samples for name, s in validate_data(cfg, data_root).items()}
    return resolve_group_batches(cfg, sizes)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def skip_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op at process-group start.

    Training never uses it (it serves ``inference_all_reduce``), the first build costs ~40 s of a
    2-core machine, and concurrent builds into the shared torch_extensions cache wait on each
    other's lock file. DeepSpeed caches the op table in ``deepspeed.ops``, so the entry sticks.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_process_group(on_gpu: bool) -> tuple[int, int]:
    """Start DeepSpeed's process group (nccl on GPU, gloo on CPU); returns (rank, world size).

    Under the deepspeed launcher or torchrun the environment names the ranks; a plain
    ``python launchers/...`` run becomes a one-process group (DeepSpeed would otherwise try
    MPI discovery and fail without mpi4py).
    """
    import deepspeed
    import deepspeed.comm as dist

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        skip_cpu_shm_comm_op()
        share_cpu_threads()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size()


def share_cpu_threads() -> None:
    """CPU ranks on one machine split its cores (torch would give each rank all of them), unless
    OMP_NUM_THREADS says otherwise."""
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if "OMP_NUM_THREADS" not in os.environ and local_ranks > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def pretrain(config: str, overrides: Sequence[str], ds_config_path: str, data_root: str | None,
             output_dir: str, dry_run: bool = False, world_size: int | None = None) -> int:
    """Run (or dry-run) pretraining; returns the process exit code."""
    cfg = load_config(config, overrides)
    ds_config = dsc.load_ds_config(ds_config_path)
    ds_name = str(ds_config_path)
    root = resolve_data_root(cfg, data_root)
    if dry_run:
        from msgfm.train.dryrun import dry_run as run_dry

        return run_dry(cfg, ds_config, ds_name, root, world_size)

    on_gpu = torch.cuda.is_available()
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = fixed_group_batches(cfg, root)
    # configs first, then the data path: both before a process group or any sample is touched
    startup_checks(cfg, ds_config, ds_name, env_world, {g: b for g, (b, _) in resolved.items()}, on_gpu)
    check_data_path(cfg, root)

    import deepspeed.comm as dist

    init_process_group(on_gpu)
    out = Path(output_dir)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        removed = ckpt.remove_partial(out / "checkpoints")
        if removed:
            print(f"removed {len(removed)} partial checkpoint(s) left by an interrupted save: "
                  f"{[p.name for p in removed]}", flush=True)
    dist.barrier()
    trainer = build_trainer(cfg, ds_config, root, out)
    latest = ckpt.find_resumable(out / "checkpoints")
    if latest is not None:
        trainer.resume(latest)
    start_tracking(trainer, resumed=latest is not None)
    try:
        trainer.fit()
    finally:
        trainer.tracker.close()
    if trainer.rank == 0:
        _print_where(out, trainer.tracker)
    return 0


def build_trainer(cfg: RunConfig, ds_config: dict[str, Any], data_root: Path, out: Path,
                  tracking: bool = True) -> "Trainer":
    """Model, data, optimizer, DeepSpeed engine and schedule of one rank (process group already up)."""
    import deepspeed
    import deepspeed.comm as dist

    from msgfm.data.pipeline import build_pretrain_data
    from msgfm.models import build_pretrain_model, reinit_experts
    from msgfm.train.loop import Trainer
    from msgfm.train.optim import build_optimizer

    rank, world = dist.get_rank(), dist.get_world_size()
    seed = cfg.train.seed
    seed_everything(seed)  # identical initial weights on every rank
    model = build_pretrain_model(cfg)  # activation checkpointing per stage: model.grad_checkpointing
    if cfg.model.moe.enabled:
        # DeepSpeed's expert-parallel groups are consecutive ranks: this rank holds experts of index rank % E
        reinit_experts(model, seed, ep_rank=rank % cfg.model.moe.expert_parallel_size)
    data = build_pretrain_data(cfg, data_root, rank, world, seed)
    base_lrs = dict(data.lrs)
    optimizer = build_optimizer(model, cfg.optimizer, lr=max(base_lrs.values()), on_gpu=torch.cuda.is_available())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    seed_everything(seed + 1000 * rank)  # masks, cross choices and MoE token selection differ per rank
    schedule = LRSchedule(cfg.schedule, steps_per_epoch=data.train.steps_per_epoch,
                          reference_lr=max(base_lrs.values()))
    tracker = Tracker(cfg.tracking, out, active=tracking and rank == 0 and cfg.tracking.enabled)
    client_extra = {"config": cfg.to_dict(), "ds_config": ds_config, "stats": data.stats}
    return Trainer(cfg, engine, data, schedule, base_lrs, tracker, out, rank, world, client_extra)


def start_tracking(trainer: "Trainer", resumed: bool) -> None:
    """Rank 0: write the resolved configs beside the run, open (or reopen) the MLflow run, say what runs."""
    if trainer.rank != 0:
        return
    cfg, out, data = trainer.cfg, trainer.output_dir, trainer.data
    ds_config = trainer.client_extra["ds_config"]
    run_id_file = out / "mlflow_run_id"
    run_id = run_id_file.read_text().strip() if resumed and run_id_file.is_file() else None
    save_config(cfg, out / "config.yaml")
    (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    (out / "stats.json").write_text(json.dumps(data.stats, indent=2))
    on_gpu = torch.cuda.is_available()
    devices = torch.cuda.get_device_name() if on_gpu else f"cpu ({os.cpu_count()} cores)"
    trainer.tracker.start(
        run_name=f"{cfg.name}-{out.name}",
        params={"config": cfg.to_dict(), "ds_config": ds_config,
                "resolved": {"batch_size_per_gpu": data.batch_sizes, "lr": trainer.base_lrs,
                             "steps_per_epoch": data.train.steps_per_epoch, "total_steps": trainer.total_steps}},
        tags={"git_commit": git_commit(), "world_size": str(trainer.world_size), "devices": devices,
              "host": socket.gethostname(), "precision": dsc.precision(ds_config)},
        artifacts={"config": out / "config.yaml", "config/ds": out / "ds_config.json",
                   "config/stats": out / "stats.json"},
        resume_run_id=run_id, resume_step=trainer.step)
    print(f"msgfm pretraining: {cfg.name}, {trainer.world_size} rank(s), {dsc.precision(ds_config)}, ZeRO-"
          f"{dsc.zero_stage(ds_config)}, groups {data.batch_sizes} per GPU, LRs {trainer.base_lrs}, "
          f"{data.train.steps_per_epoch} steps/epoch, {trainer.total_steps} steps", flush=True)


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
              f"  open it:     mlflow ui --backend-store-uri {tracker.uri}   (then http://127.0.0.1:5000)", flush=True)
    else:
        print(f"  MLflow run:  {tracker.run_id} at {tracker.uri}", flush=True)
