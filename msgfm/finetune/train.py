"""``finetune()``: from parsed arguments to a fine-tuned (or evaluated) model.

Top to bottom: load and check the configs; start the process group (a single CPU process needs
no launcher); statistics, the task module (initialised from the pretraining checkpoint, timm
weights or at random), the training subset; the optimizer with layer-wise LR decay and the
DeepSpeed engine; then the one Trainer of msgfm.train: auto-resume, steps, per epoch the
validation split scored with the task's metric (keeping the best weights), checkpoints. At
the end the best weights are evaluated on the test split.

Output folder::

    checkpoints/stepNNNNNNNN/   DeepSpeed checkpoints at epoch ends (last train.keep_last), resumable
    best/model.pt, best/metrics.json   the best validation weights (consolidated state dict)
    train_ids_*.txt             the training subset (train fraction < 1)
    outputs/                    figures and per-class tables (also MLflow artifacts)
    config.yaml, model_inputs.json   the resolved config; what the model expects of its inputs (msgfm predict)
    metrics.jsonl, mlflow.db    metrics per logging step and per epoch; MLflow also gets the shards of each
                                split as datasets and the best weights as a logged model at the end
    mlartifacts/                MLflow's artifacts, at locations relative to this folder
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import deepspeed.comm as dist
import torch

from msgfm.config import FinetuneConfig, ModelConfig, load_finetune_config, read_yaml_tree, save_finetune_config
from msgfm.data.format import read_shard_info
from msgfm.data.stats import Stats
from msgfm.errors import MissingFileError, UserError, check_output_folder
from msgfm.finetune.build import (
    build_finetune_model,
    fine_tuned_run_dir,
    fine_tuned_state,
    refuse_dropped_model_overrides,
    resolve_encoder,
)
from msgfm.finetune.data import CheckedBatches, EpochBatches, TaskDataset, make_loader, split_paths, task_stats
from msgfm.finetune.evaluate import evaluate, summary_line, write_outputs
from msgfm.finetune.inputs import INPUTS_FILE, ModelInputs, model_inputs, write_model_inputs
from msgfm.finetune.options import param_groups, scaled_rates, select_train_fraction
from msgfm.finetune.transfer import TransferReport
from msgfm.tasks.downstream import DownstreamTask
from msgfm.tasks.metrics import scalars
from msgfm.train import checkpoint as ckpt
from msgfm.train import ds_config as dsc
from msgfm.train.config_guard import guard_resume, note_changes
from msgfm.train.engine import build_engine, total_steps
from msgfm.train.optim import optimizer_class
from msgfm.train.runtime import device_name, git_commit, init_process_group, seed_everything
from msgfm.train.schedule import LRSchedule
from msgfm.train.tracking import ShardSet, Tracker
from msgfm.train.trainer import Trainer, TrainerSettings

# The metric that picks the best epoch, per task kind, and whether larger is better.
BEST_METRIC = {"multilabel": ("mAP_micro", True), "segmentation": ("mIoU", True), "restoration": ("MAE", False)}


def finetune(config: str, overrides: Sequence[str], ds_config_path: str, *, task_name: str | None = None,
             pretrained: str | None, data_root: str | None, output_dir: str, eval_only: bool = False,
             checkpoint: str | None = None, allow_config_change: bool = False) -> int:
    """Fine-tune (or, with ``eval_only``, evaluate) one task; returns the exit code. ``allow_config_change``:
    resume a run folder whose checkpoint was written with other training settings (msgfm/train/config_guard.py)."""
    cfg = load_finetune_config(config, overrides)
    if task_name is not None and cfg.task.name != task_name:
        raise UserError(f"--task {task_name} but config '{config}' is for task '{cfg.task.name}'; pass a config of "
                        f"that task (ft_{task_name}*) or override task.name")
    root = Path(data_root or cfg.data.root)
    if not root.is_dir():
        raise MissingFileError(f"data root {root} does not exist (data.root or --data-root); convert the dataset "
                               f"first, see docs/finetune.md")
    if eval_only and checkpoint is None:
        raise UserError("--eval-only needs --checkpoint: a fine-tuning run folder (its best/model.pt) or file")
    check_output_folder(output_dir, "--output-dir", create=False)
    on_gpu = torch.cuda.is_available()
    ds_config = _ds_config_for(cfg, ds_config_path, cfg.model.moe.enabled, on_gpu)
    rank, world = init_process_group(on_gpu)
    out = Path(output_dir)
    seed_everything(cfg.train.seed)  # same initial head weights on every rank
    stats = task_stats(cfg, root)
    if eval_only:
        return _evaluate_only(cfg, checkpoint, stats, root, out, rank, world, overrides)

    ckpt.prepare_run_folder(out, rank)
    dist.barrier()
    latest = ckpt.find_resumable(out / "checkpoints")  # collective: every rank verifies what it will read
    model_cfg = resolve_encoder(cfg, pretrained)
    if pretrained is not None:
        refuse_dropped_model_overrides(overrides, model_cfg, f"the pretrained checkpoint {pretrained}")
    cfg.model = model_cfg  # what config.yaml and the checkpoints record: the encoder actually built
    # before anything is built: a changed architecture is one line, not a failed load
    changes = guard_resume(latest, cfg.to_dict(), allow_config_change, rank) if latest is not None else []
    task, report = build_finetune_model(cfg, pretrained, stats, model_cfg)
    train_batches, val_set = _training_data(cfg, task, stats, root, out, rank, world, on_gpu)
    groups = param_groups(task, weight_decay=cfg.optimizer.weight_decay, layer_decay=cfg.transfer.layer_decay,
                          depths=cfg.model.depths, no_weight_decay=task.no_weight_decay())
    rates = scaled_rates(cfg, world)  # GFM's linear rule with train.lr_reference_batch set
    if rank == 0:
        print(rates.describe(cfg.train.lr), flush=True)
    cls, extra, opt_name = optimizer_class(cfg.optimizer, on_gpu)
    optimizer = cls(groups, lr=rates.lr, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps, **extra)
    engine = build_engine(task, optimizer, ds_config, cfg.train.seed, rank)
    schedule = LRSchedule(rates.schedule, steps_per_epoch=train_batches.steps_per_epoch, reference_lr=rates.lr)
    train = cfg.train
    settings = TrainerSettings(total_steps=total_steps(schedule, train.max_steps), log_interval=train.log_interval,
                               tracking_interval=train.log_interval, eval_interval_epochs=train.eval_interval_epochs,
                               evaluate_at_end=True,
                               keep_last=train.keep_last, max_nonfinite_steps=train.max_nonfinite_steps)
    tracker = Tracker(cfg.tracking, out, active=rank == 0 and cfg.tracking.enabled)
    first_shard = split_paths(cfg, root, "train")[0]
    class_names = _class_names(first_shard, cfg)
    inputs = model_inputs(cfg.task.name, cfg.task.sensors, read_shard_info(first_shard, check_data=False), stats,
                          class_names)
    evaluator = BestOnValidation(cfg, val_set, out, class_names)
    client_extra = {"config": cfg.to_dict(), "stats": stats.to_dict(), "kind": "finetune"}
    trainer = Trainer(engine, train_batches, base_lrs={cfg.task.name: rates.lr}, schedule=schedule,
                      settings=settings, tracker=tracker, output_dir=out, rank=rank, world_size=world,
                      client_extra=client_extra, evaluator=evaluator)
    if latest is not None:
        trainer.resume(latest)
    if rank == 0:
        _start_tracking(trainer, cfg, ds_config, report, inputs, opt_name, len(train_batches.dataset),
                        resumed=latest is not None, datasets=_shard_sets(cfg, root))
        if latest is not None:
            note_changes(tracker, trainer.step, latest, changes)
    try:
        trainer.fit()
        _final_test(trainer, cfg, stats, root, class_names)
        if rank == 0:
            _log_model(tracker, cfg, out, trainer.step)
    finally:
        tracker.close()
    if rank == 0:
        metric_name = BEST_METRIC[cfg.task.kind][0]
        print(f"\nDone. best val {metric_name} = {evaluator.best} (epoch {evaluator.best_epoch}); weights: "
              f"{out / 'best' / 'model.pt'}; MLflow: {tracker.ui_command()}", flush=True)
    return 0


class BestOnValidation:
    """The fine-tuning evaluator: the task's metric on the validation split at epoch ends; the best
    weights so far are kept in ``best/`` (rank 0) with their metrics."""

    def __init__(self, cfg: FinetuneConfig, val_set: TaskDataset | None, out: Path, class_names: list[str]) -> None:
        self.cfg, self.val_set, self.out, self.class_names = cfg, val_set, out, class_names
        self.metric_name, self.larger_is_better = BEST_METRIC[cfg.task.kind]
        self.best: float | None = None
        self.best_epoch: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")

    def __call__(self, trainer: Trainer, epoch: int) -> dict[str, float]:
        if self.val_set is None:
            return {}
        cfg, rank, task = self.cfg, trainer.rank, trainer.task
        assert isinstance(task, DownstreamTask)
        trainer.engine.eval()
        result, figures = evaluate(task, _eval_loader(cfg, self.val_set, rank, trainer.world_size), trainer.device,
                                   trainer.dtype, max_batches=cfg.train.max_eval_batches,
                                   num_figures=cfg.train.num_figures if rank == 0 else 0)
        trainer.engine.train()
        value = float(result[self.metric_name])
        better = self.best is None or (value > self.best if self.larger_is_better else value < self.best)
        values = scalars(result)
        if rank == 0:
            trainer.tracker.log_metrics({f"val/{k}": v for k, v in values.items()} | {"epoch": epoch}, trainer.step)
            print(f"epoch {epoch} {summary_line('val', result)}", flush=True)
            _log_outputs(trainer.tracker, task, result, figures, self.out / "outputs" / f"epoch{epoch:04d}", "val",
                         self.class_names)
            if better:
                _save_best(task, self.out / "best", result, epoch, trainer.tracker)
        if better:
            self.best, self.best_epoch = value, epoch
        return values


def _ds_config_for(cfg: FinetuneConfig, path: str, moe: bool, on_gpu: bool) -> dict[str, Any]:
    ds_config = dsc.load_ds_config(path)
    dsc.check_device(ds_config, path, on_gpu)
    dsc.check_moe_compatible(ds_config, path, moe)
    # the fine-tuning batch comes from the fine-tuning config, not from the pretraining ds_config
    ds_config = {k: v for k, v in ds_config.items() if k not in ("train_batch_size", "optimizer", "scheduler")}
    ds_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size_per_gpu
    return ds_config


def _training_data(cfg: FinetuneConfig, task: DownstreamTask, stats: Stats, root: Path, out: Path, rank: int,
                   world: int, on_gpu: bool) -> tuple[EpochBatches, TaskDataset | None]:
    """The training batches (the configured fraction of the training split) and the validation set."""
    train_paths = split_paths(cfg, root, "train")
    if not train_paths:
        raise UserError(f"data.train lists no shards under {root}")
    task_cfg, data = cfg.task, cfg.data
    resize = _resize(cfg, task)

    def dataset(ids: list[str] | None) -> TaskDataset:
        return TaskDataset(train_paths, task_cfg, stats, train=True, hflip=data.hflip, vflip=data.vflip,
                           crop=data.train_crop, resize=resize, ids=ids)

    train_set = dataset(None)
    if data.train_fraction < 1:
        ids = select_train_fraction(train_set.all_ids, data.train_fraction, data.fraction_seed,
                                    out / f"train_ids_{data.train_fraction:g}_seed{data.fraction_seed}.txt")
        train_set = dataset(ids)
    batches = EpochBatches(train_set, task_cfg.name, data.batch_size_per_gpu, rank=rank, world=world,
                           seed=cfg.train.seed, num_workers=data.num_workers, pin_memory=data.pin_memory and on_gpu)
    return batches, _split_dataset(cfg, root, "val", stats, resize)


def _resize(cfg: FinetuneConfig, task: DownstreamTask) -> int:
    """Multilabel samples are resized to the model's input; dense tasks keep their size (sliding windows)."""
    return task.img_size if cfg.task.kind == "multilabel" else 0


def _split_dataset(cfg: FinetuneConfig, root: Path, split: str, stats: Stats, resize: int) -> TaskDataset | None:
    paths = split_paths(cfg, root, split)
    return TaskDataset(paths, cfg.task, stats, train=False, resize=resize) if paths else None


def _eval_loader(cfg: FinetuneConfig, dataset: TaskDataset, rank: int, world: int) -> CheckedBatches:
    return CheckedBatches(make_loader(dataset, cfg.data.eval_batch_size_per_gpu, train=False, rank=rank, world=world,
                                      seed=cfg.train.seed, epoch=0, num_workers=cfg.data.num_workers,
                                      pin_memory=False), dataset)


def _class_names(shard: Path, cfg: FinetuneConfig) -> list[str]:
    import h5py

    task_cfg = cfg.task
    if task_cfg.kind == "restoration":
        return []
    with h5py.File(shard, "r") as f:
        names = f["labels"][task_cfg.label_name].attrs.get("class_names")
    if names is None:
        return [f"class_{i}" for i in range(task_cfg.num_classes)]
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _save_best(task: DownstreamTask, folder: Path, result: dict[str, Any], epoch: int, tracker: Tracker) -> None:
    """Consolidated weights of the best epoch, written atomically; logged to MLflow."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.pt.tmp"
    torch.save({k: v.detach().cpu() for k, v in task.state_dict().items()}, tmp)
    os.replace(tmp, folder / "model.pt")
    (folder / "metrics.json").write_text(json.dumps({"epoch": epoch, **scalars(result)}, indent=1))
    tracker.log_artifact(lambda: folder / "model.pt", "best")
    tracker.log_artifact(lambda: folder / "metrics.json", "best")


def _not_fine_tuned(checkpoint: str | Path) -> UserError:
    return UserError(f"--checkpoint {checkpoint} is a pretraining run, not a fine-tuned model: --eval-only scores "
                     f"a fine-tuning run folder or its best/model.pt; to fine-tune from {checkpoint} pass it as "
                     f"--pretrained (without --eval-only)")


def _fine_tuned_model_config(checkpoint: str | Path, default: ModelConfig) -> ModelConfig:
    """The encoder config a fine-tuning run recorded in its config.yaml (the checkpoint's architecture);
    a pretraining run is refused in one line."""
    path = Path(checkpoint)
    run_dir = fine_tuned_run_dir(checkpoint)
    if (run_dir / "config.yaml").is_file():
        if "task" not in read_yaml_tree(run_dir / "config.yaml"):
            raise _not_fine_tuned(checkpoint)
        return load_finetune_config(run_dir / "config.yaml").model
    if path.is_dir() and not (path / "best" / "model.pt").is_file():  # a DeepSpeed checkpoint folder
        info = ckpt.load_client_state(path).get("msgfm", {})
        if isinstance(info, Mapping) and info.get("kind") != "finetune":
            raise _not_fine_tuned(checkpoint)
    print(f"--eval-only: no config.yaml in {run_dir}; building the encoder from the task config's model section",
          flush=True)
    return default


def _log_outputs(tracker: Tracker, task: DownstreamTask, result: dict[str, Any], figures: dict[str, Any],
                 folder: Path, split: str, class_names: list[str]) -> None:
    for artifact_path, file in write_outputs(task, result, figures, folder, split, class_names).items():
        tracker.log_artifact(functools.partial(Path, file), artifact_path)


def _final_test(trainer: Trainer, cfg: FinetuneConfig, stats: Stats, root: Path, class_names: list[str]) -> None:
    """The best weights on the test split (when there is one), logged as ``test/...``."""
    task = trainer.task
    assert isinstance(task, DownstreamTask)
    out, rank = trainer.output_dir, trainer.rank
    test_set = _split_dataset(cfg, root, "test", stats, _resize(cfg, task))
    best = out / "best" / "model.pt"
    if test_set is None or not best.is_file():
        return
    task.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
    task.eval()
    result, figures = evaluate(task, _eval_loader(cfg, test_set, rank, trainer.world_size), trainer.device,
                               trainer.dtype, num_figures=cfg.train.num_figures if rank == 0 else 0)
    if rank == 0:
        trainer.tracker.log_metrics({f"test/{k}": v for k, v in scalars(result).items()}, trainer.step)
        print(summary_line("test (best weights)", result), flush=True)
        _log_outputs(trainer.tracker, task, result, figures, out / "outputs" / "test", "test", class_names)


def _evaluate_only(cfg: FinetuneConfig, checkpoint: str | None, stats: Stats, root: Path, out: Path, rank: int,
                   world: int, overrides: Sequence[str]) -> int:
    """``--eval-only``: the fine-tuned weights of ``checkpoint`` on the val and test splits."""
    assert checkpoint is not None
    cfg.transfer.init = "random"  # weights come from the fine-tuned checkpoint
    cfg.model = _fine_tuned_model_config(checkpoint, cfg.model)
    refuse_dropped_model_overrides(overrides, cfg.model, f"the fine-tuned run {checkpoint}")
    task, _ = build_finetune_model(cfg, None, stats)
    task.load_state_dict(fine_tuned_state(checkpoint))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    task.to(device).eval()
    resize = _resize(cfg, task)
    class_names = _class_names(split_paths(cfg, root, "val" if cfg.data.val else "test")[0], cfg) \
        if (cfg.data.val or cfg.data.test) else []
    results = {}
    for split in ("val", "test"):
        dataset = _split_dataset(cfg, root, split, stats, resize)
        if dataset is None:
            continue
        result, figures = evaluate(task, _eval_loader(cfg, dataset, rank, world), device, None,
                                   num_figures=cfg.train.num_figures if rank == 0 else 0)
        results[split] = scalars(result)
        if rank == 0:
            print(summary_line(split, result), flush=True)
            write_outputs(task, result, figures, out / "eval", split, class_names)
    if not results:
        raise UserError("--eval-only: data.val and data.test list no shards")
    if rank == 0:
        (out / "eval").mkdir(parents=True, exist_ok=True)
        (out / "eval" / "metrics.json").write_text(json.dumps(results, indent=1))
    return 0


def _shard_sets(cfg: FinetuneConfig, root: Path) -> list[ShardSet]:
    """The shards of each split, for MLflow's dataset inputs."""
    contexts = {"train": "training", "val": "validation", "test": "test"}
    return [ShardSet(name=f"{cfg.task.name}-{split}", context=context,
                     shards=tuple(read_shard_info(p, check_data=False) for p in paths))
            for split, context in contexts.items() if (paths := split_paths(cfg, root, split))]


def _log_model(tracker: Tracker, cfg: FinetuneConfig, out: Path, step: int) -> None:
    """The best weights as an MLflow logged model, laid out as a run folder (config.yaml, model_inputs.json,
    best/): its artifact folder is itself a model `msgfm predict --model` takes."""
    best = out / "best"
    if not (best / "model.pt").is_file():
        return
    files = [("", out / "config.yaml"), ("", out / INPUTS_FILE), ("best", best / "model.pt"),
             ("best", best / "metrics.json")]
    tracker.log_model(cfg.name, files, params={"config": cfg.to_dict()}, model_type="msgfm-finetuned", step=step)


def _start_tracking(trainer: Trainer, cfg: FinetuneConfig, ds_config: dict[str, Any], report: TransferReport | None,
                    inputs: ModelInputs, opt_name: str, num_train: int, resumed: bool,
                    datasets: list[ShardSet]) -> None:
    """Rank 0: the resolved configs, the model's inputs (units, statistics; what `msgfm predict` reads) and the
    transfer report beside the run; open (or reopen) the MLflow run."""
    out = trainer.output_dir
    out.mkdir(parents=True, exist_ok=True)
    save_finetune_config(cfg, out / "config.yaml")
    (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    artifacts = {"config": out / "config.yaml", "config/ds": out / "ds_config.json",
                 "config/inputs": write_model_inputs(inputs, out)}
    if report is not None:
        (out / "transfer.txt").write_text(report.summary() + "\n\nloaded:\n" + "\n".join(report.loaded) +
                                          "\n\nnew:\n" + "\n".join(report.missing) + "\n\nunused:\n" +
                                          "\n".join(report.unused) + "\n")
        artifacts["transfer"] = out / "transfer.txt"
        print(report.summary(), flush=True)
    steps_per_epoch = trainer.data.steps_per_epoch
    trainer.tracker.open(run_name=f"{cfg.name}-{out.name}", resumed=resumed, resume_step=trainer.step,
                         params={"config": cfg.to_dict(), "resolved": {
                             "train_samples": num_train, "steps_per_epoch": steps_per_epoch,
                             "total_steps": trainer.total_steps, "optimizer": opt_name,
                             "lr": trainer.base_lrs[cfg.task.name]}},
                         tags={"git_commit": git_commit(), "world_size": str(trainer.world_size),
                               "task": cfg.task.name, "devices": device_name()},
                         artifacts=artifacts, datasets=datasets)
    print(f"msgfm fine-tuning: {cfg.name}, task {cfg.task.name} ({cfg.task.kind}), sensors {cfg.task.sensors}, "
          f"method {cfg.transfer.method}, {num_train} training samples, {steps_per_epoch} steps/epoch, "
          f"{trainer.total_steps} steps, {trainer.world_size} rank(s)", flush=True)
