"""``finetune()``: from parsed arguments to a fine-tuned (or evaluated) model.

Top to bottom: load and check the configs; start the process group (a single CPU
process needs no launcher); data, statistics and the training subset; the model
(initialised from the pretraining checkpoint, timm weights or at random); the
optimizer with layer-wise LR decay and the DeepSpeed engine; auto-resume; then per
epoch: train, evaluate on the validation split, keep the best weights, checkpoint.
At the end the best weights are evaluated on the test split. DeepSpeed setup,
checkpoints (atomic, auto-resume) and MLflow tracking are those of msgfm.train.

Output folder::

    checkpoints/stepNNNNNNNN/   DeepSpeed checkpoints at epoch ends (last train.keep_last), resumable
    best/model.pt, best/metrics.json   the best validation weights (consolidated state dict)
    train_ids_*.txt             the training subset (train fraction < 1)
    outputs/                    figures and per-class tables (also MLflow artifacts)
    metrics.jsonl, mlflow.db    metrics per logging step and per epoch
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from msgfm.config import ModelConfig
from msgfm.finetune.build import build_finetune_model
from msgfm.finetune.config import FinetuneConfig, load_finetune_config, save_finetune_config
from msgfm.finetune.data import TaskDataset, make_loader, split_paths, task_stats
from msgfm.finetune.evaluate import evaluate, summary_line, write_outputs
from msgfm.finetune.metrics import scalars
from msgfm.finetune.options import lr_scales_applied, param_groups, select_train_fraction
from msgfm.finetune.tasks import build_task
from msgfm.train import checkpoint as ckpt
from msgfm.train import ds_config as dsc
from msgfm.train.run import git_commit, init_process_group, seed_everything
from msgfm.train.safe_load import load_weights
from msgfm.train.schedule import LRSchedule
from msgfm.train.tracking import Tracker

log = logging.getLogger(__name__)

# The metric that picks the best epoch, per task kind, and whether larger is better.
BEST_METRIC = {"multilabel": ("mAP_micro", True), "segmentation": ("mIoU", True), "restoration": ("MAE", False)}


def _ds_config_for(cfg: FinetuneConfig, path: str, moe: bool, on_gpu: bool) -> dict[str, Any]:
    ds_config = dsc.load_ds_config(path)
    dsc.check_device(ds_config, path, on_gpu)
    dsc.check_moe_compatible(ds_config, path, moe)
    # the fine-tuning batch comes from the fine-tuning config, not from the pretraining ds_config
    ds_config = {k: v for k, v in ds_config.items() if k not in ("train_batch_size", "optimizer", "scheduler")}
    ds_config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size_per_gpu
    return ds_config


def finetune(config: str, overrides: Sequence[str], ds_config_path: str, *, task_name: str | None = None,
             pretrained: str | None, data_root: str | None, output_dir: str, eval_only: bool = False,
             checkpoint: str | None = None) -> int:
    """Fine-tune (or, with ``eval_only``, evaluate) one task; returns the exit code."""
    cfg = load_finetune_config(config, overrides)
    if task_name is not None and cfg.task.name != task_name:
        raise ValueError(f"--task {task_name} but config '{config}' is for task '{cfg.task.name}'; pass a config of "
                         f"that task (ft_{task_name}*) or override task.name")
    root = Path(data_root or cfg.data.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (data.root or --data-root); convert the dataset "
                                f"first, see docs/finetune.md")
    if eval_only and checkpoint is None:
        raise ValueError("--eval-only needs --checkpoint: a fine-tuning run folder (its best/model.pt) or file")
    on_gpu = torch.cuda.is_available()
    moe = cfg.model.moe.enabled
    ds_config = _ds_config_for(cfg, ds_config_path, moe, on_gpu)
    rank, world = init_process_group(on_gpu)
    out = Path(output_dir)
    seed_everything(cfg.train.seed)  # same initial head weights on every rank
    stats = task_stats(cfg, root)
    task_cfg = cfg.task
    if eval_only:
        cfg.transfer.init = "random"  # weights come from the fine-tuned checkpoint
        pretrained = None
        cfg.model = _fine_tuned_model_config(checkpoint, cfg.model)
    model, report = build_finetune_model(cfg, pretrained)
    cfg.model = model.model_cfg  # what config.yaml and the checkpoints record: the encoder actually built
    img_size = model.encoder.img_size
    task = build_task(task_cfg, stats, img_size)
    resize = img_size if task_cfg.kind == "multilabel" else 0
    if eval_only:
        model.load_state_dict(_fine_tuned_state(checkpoint))
        return _evaluate_only(cfg, model, task, root, stats, out, rank, world, resize)

    train_paths = split_paths(cfg, root, "train")
    if not train_paths:
        raise ValueError(f"data.train lists no shards under {root}")
    full = TaskDataset(train_paths, task_cfg, stats, train=True, hflip=cfg.data.hflip, vflip=cfg.data.vflip,
                       crop=cfg.data.train_crop, resize=resize)
    ids = None
    if cfg.data.train_fraction < 1:
        ids = select_train_fraction(full.all_ids, cfg.data.train_fraction, cfg.data.fraction_seed,
                                    out / f"train_ids_{cfg.data.train_fraction:g}_seed{cfg.data.fraction_seed}.txt")
    train_set = full if ids is None else TaskDataset(train_paths, task_cfg, stats, train=True, hflip=cfg.data.hflip,
                                                     vflip=cfg.data.vflip, crop=cfg.data.train_crop, resize=resize,
                                                     ids=ids)
    val_set = _split_dataset(cfg, root, "val", task_cfg, stats, resize)
    steps_per_epoch = len(train_set) // (cfg.data.batch_size_per_gpu * world)
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train_set)} training samples make no full batch of {cfg.data.batch_size_per_gpu} "
                         f"x {world} ranks; lower data.batch_size_per_gpu")

    import deepspeed

    from msgfm.train.optim import optimizer_class

    groups = param_groups(model, weight_decay=cfg.optimizer.weight_decay, layer_decay=cfg.transfer.layer_decay,
                          depths=model.encoder_depths, no_weight_decay=model.no_weight_decay())
    cls, extra, opt_name = optimizer_class(cfg.optimizer, on_gpu)
    optimizer = cls(groups, lr=cfg.train.lr, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps, **extra)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    seed_everything(cfg.train.seed + 1000 * rank)  # flips, crops, drop path and MoE token choice differ per rank
    schedule = LRSchedule(cfg.schedule, steps_per_epoch=steps_per_epoch, reference_lr=cfg.train.lr)
    total_steps = schedule.total_steps if cfg.train.max_steps is None else min(cfg.train.max_steps,
                                                                               schedule.total_steps)
    tracker = Tracker(cfg.tracking, out, active=rank == 0 and cfg.tracking.enabled)
    state = {"step": 0, "epoch": 0, "best": None, "best_epoch": None}
    if rank == 0:
        removed = ckpt.remove_partial(out / "checkpoints")
        if removed:
            print(f"removed partial checkpoint(s) of an interrupted save: {[p.name for p in removed]}", flush=True)
    latest = ckpt.find_resumable(out / "checkpoints")
    if latest is not None:
        client, _ = ckpt.load(engine, latest)
        state.update(client.get("msgfm", {}).get("state", {}))
        if rank == 0:
            print(f"resumed from {latest} at epoch {state['epoch']} (step {state['step']})", flush=True)
    if rank == 0:
        _start_tracking(cfg, tracker, out, ds_config, report, opt_name, world, len(train_set), steps_per_epoch,
                        total_steps, resumed=latest is not None, resume_step=state["step"])

    dtype = torch.half if engine.fp16_enabled() else (torch.bfloat16 if engine.bfloat16_enabled() else None)
    device = engine.device
    metric_name, larger_is_better = BEST_METRIC[task_cfg.kind]
    class_names = _class_names(train_paths[0], task_cfg)
    try:
        while state["step"] < total_steps:
            epoch = state["epoch"]
            loader = make_loader(train_set, cfg.data.batch_size_per_gpu, train=True, rank=rank, world=world,
                                 seed=cfg.train.seed, epoch=epoch, num_workers=cfg.data.num_workers,
                                 pin_memory=cfg.data.pin_memory and on_gpu)
            engine.train()
            tick, tick_step = time.perf_counter(), state["step"]
            for batch in loader:
                if state["step"] >= total_steps:
                    break
                lr = cfg.train.lr * schedule.factor(state["step"])
                lr_scales_applied(engine.optimizer, lr)
                images, base = task.inputs(batch, device, dtype)
                output = engine(images, base)
                loss = task.loss(output, batch, device)
                aux = model.aux_loss()
                total = loss + model.aux_loss_weight * aux if aux is not None else loss
                engine.backward(total)
                engine.step()
                state["step"] += 1
                if rank == 0 and state["step"] % cfg.train.log_interval == 0:
                    elapsed = time.perf_counter() - tick
                    rate = (state["step"] - tick_step) * cfg.data.batch_size_per_gpu * world / max(elapsed, 1e-9)
                    eta = (total_steps - state["step"]) * cfg.data.batch_size_per_gpu * world / max(rate, 1e-9)
                    values = {"train/loss": loss.item(), "train/lr": lr, "train/samples_per_second": rate}
                    if aux is not None:
                        values["train/aux_loss"] = aux.item()
                    tracker.log_metrics(values, state["step"])
                    print(f"epoch {epoch} step {state['step']}/{total_steps} loss {values['train/loss']:.4f} "
                          f"lr {lr:.2e} {rate:.1f} samples/s ETA {_hms(eta)}", flush=True)
            state["epoch"] = epoch + 1
            last = state["step"] >= total_steps
            if val_set is not None and (state["epoch"] % cfg.train.eval_interval_epochs == 0 or last):
                engine.eval()
                result, figures = evaluate(lambda x, b: engine(x, b), task, _eval_loader(cfg, val_set, rank, world),
                                           device, dtype, max_batches=cfg.train.max_eval_batches,
                                           num_figures=cfg.train.num_figures if rank == 0 else 0)
                value = float(result[metric_name])
                better = state["best"] is None or (value > state["best"] if larger_is_better else value < state["best"])
                if rank == 0:
                    tracker.log_metrics({f"val/{k}": v for k, v in scalars(result).items()} | {"epoch": state["epoch"]},
                                        state["step"])
                    print(f"epoch {state['epoch']} {summary_line('val', result)}", flush=True)
                    _log_outputs(tracker, task, result, figures, out / "outputs" / f"epoch{state['epoch']:04d}", "val",
                                 class_names)
                    if better:
                        _save_best(model, out / "best", result, state["epoch"], tracker)
                if better:
                    state["best"], state["best_epoch"] = value, state["epoch"]
            client = {"msgfm": {"state": dict(state), "config": cfg.to_dict(), "stats": stats.to_dict(),
                                "kind": "finetune"}}
            ckpt.save(engine, out / "checkpoints", state["step"], client, {"step": state["step"]},
                      cfg.train.keep_last)
        _final_test(cfg, model, task, root, stats, out, rank, world, resize, tracker, class_names, device, dtype,
                    state["step"])
    finally:
        tracker.close()
    if rank == 0:
        print(f"\nDone. best val {metric_name} = {state['best']} (epoch {state['best_epoch']}); weights: "
              f"{out / 'best' / 'model.pt'}; MLflow: mlflow ui --backend-store-uri {tracker.uri}", flush=True)
    return 0


def _split_dataset(cfg: FinetuneConfig, root: Path, split: str, task_cfg, stats, resize: int) -> TaskDataset | None:
    paths = split_paths(cfg, root, split)
    return TaskDataset(paths, task_cfg, stats, train=False, resize=resize) if paths else None


def _eval_loader(cfg: FinetuneConfig, dataset: TaskDataset, rank: int, world: int):
    return make_loader(dataset, cfg.data.eval_batch_size_per_gpu, train=False, rank=rank, world=world,
                       seed=cfg.train.seed, epoch=0, num_workers=cfg.data.num_workers, pin_memory=False)


def _class_names(shard: Path, task_cfg) -> list[str]:
    import h5py

    if task_cfg.kind == "restoration":
        return []
    with h5py.File(shard, "r") as f:
        names = f["labels"][task_cfg.label_name].attrs.get("class_names")
    if names is None:
        return [f"class_{i}" for i in range(task_cfg.num_classes)]
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _save_best(model: torch.nn.Module, folder: Path, result: dict[str, Any], epoch: int, tracker: Tracker) -> None:
    """Consolidated weights of the best epoch, written atomically; logged to MLflow."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".model.pt.tmp"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, folder / "model.pt")
    (folder / "metrics.json").write_text(json.dumps({"epoch": epoch, **scalars(result)}, indent=1))
    tracker.log_artifact(lambda: folder / "model.pt", "best")
    tracker.log_artifact(lambda: folder / "metrics.json", "best")


def _fine_tuned_model_config(checkpoint: str | Path, default: ModelConfig) -> ModelConfig:
    """The encoder config a fine-tuning run recorded in its config.yaml (the checkpoint's architecture)."""
    path = Path(checkpoint)
    run_dir = path if path.is_dir() else path.parent.parent  # <run>/best/model.pt -> <run>
    if (run_dir / "config.yaml").is_file():
        return load_finetune_config(run_dir / "config.yaml").model
    print(f"--eval-only: no config.yaml in {run_dir}; building the encoder from the task config's model section",
          flush=True)
    return default


def _fine_tuned_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    path = Path(checkpoint)
    if path.is_dir() and (path / "best" / "model.pt").is_file():
        path = path / "best" / "model.pt"
    if path.is_file():
        return load_weights(path, "fine-tuned weights")
    return ckpt.load_model_state_dict(path)  # a DeepSpeed checkpoint folder of a fine-tuning run


def _log_outputs(tracker: Tracker, task, result, figures, folder: Path, split: str, class_names) -> None:
    for artifact_path, file in write_outputs(task, result, figures, folder, split, class_names).items():
        tracker.log_artifact(lambda file=file: file, artifact_path)


def _final_test(cfg, model, task, root, stats, out, rank, world, resize, tracker, class_names, device, dtype,
                step) -> None:
    test_set = _split_dataset(cfg, root, "test", cfg.task, stats, resize)
    best = out / "best" / "model.pt"
    if test_set is None or not best.is_file():
        return
    model.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
    model.eval()
    result, figures = evaluate(lambda x, b: model(x, b), task, _eval_loader(cfg, test_set, rank, world), device,
                               dtype, num_figures=cfg.train.num_figures if rank == 0 else 0)
    if rank == 0:
        tracker.log_metrics({f"test/{k}": v for k, v in scalars(result).items()}, step)
        print(summary_line("test (best weights)", result), flush=True)
        _log_outputs(tracker, task, result, figures, out / "outputs" / "test", "test", class_names)


def _evaluate_only(cfg, model, task, root, stats, out, rank, world, resize) -> int:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model.to(device).eval()
    class_names = _class_names(split_paths(cfg, root, "val" if cfg.data.val else "test")[0], cfg.task) \
        if (cfg.data.val or cfg.data.test) else []
    found = False
    results = {}
    for split in ("val", "test"):
        dataset = _split_dataset(cfg, root, split, cfg.task, stats, resize)
        if dataset is None:
            continue
        found = True
        result, figures = evaluate(lambda x, b: model(x, b), task, _eval_loader(cfg, dataset, rank, world), device,
                                   None, num_figures=cfg.train.num_figures if rank == 0 else 0)
        results[split] = scalars(result)
        if rank == 0:
            print(summary_line(split, result), flush=True)
            write_outputs(task, result, figures, out / "eval", split, class_names)
    if not found:
        raise ValueError("--eval-only: data.val and data.test list no shards")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval" / "metrics.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "eval" / "metrics.json").write_text(json.dumps(results, indent=1))
    return 0


def _start_tracking(cfg, tracker, out, ds_config, report, opt_name, world, num_train, steps_per_epoch, total_steps,
                    resumed: bool, resume_step: int) -> None:

    out.mkdir(parents=True, exist_ok=True)
    save_finetune_config(cfg, out / "config.yaml")
    (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    artifacts = {"config": out / "config.yaml", "config/ds": out / "ds_config.json"}
    if report is not None:
        (out / "transfer.txt").write_text(report.summary() + "\n\nloaded:\n" + "\n".join(report.loaded) +
                                          "\n\nnew:\n" + "\n".join(report.missing) + "\n\nunused:\n" +
                                          "\n".join(report.unused) + "\n")
        artifacts["transfer"] = out / "transfer.txt"
        print(report.summary(), flush=True)
    run_id_file = out / "mlflow_run_id"
    tracker.start(run_name=f"{cfg.name}-{out.name}",
                  params={"config": cfg.to_dict(), "resolved": {"train_samples": num_train,
                                                                "steps_per_epoch": steps_per_epoch,
                                                                "total_steps": total_steps, "optimizer": opt_name}},
                  tags={"git_commit": git_commit(), "world_size": str(world), "task": cfg.task.name},
                  artifacts=artifacts,
                  resume_run_id=run_id_file.read_text().strip() if resumed and run_id_file.is_file() else None,
                  resume_step=resume_step)
    print(f"msgfm fine-tuning: {cfg.name}, task {cfg.task.name} ({cfg.task.kind}), sensors {cfg.task.sensors}, "
          f"method {cfg.transfer.method}, {num_train} training samples, {steps_per_epoch} steps/epoch, "
          f"{total_steps} steps, {world} rank(s)", flush=True)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
