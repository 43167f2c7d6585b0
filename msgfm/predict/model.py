"""The model a prediction runs: a fine-tuned task module with the facts of its inputs.

:func:`load_model` is the one place that knows where models come from. Today that is a
fine-tuning run folder (``launchers/finetune.py --output-dir``: ``config.yaml``, ``best/model.pt``,
``model_inputs.json``), loaded as ``--eval-only`` loads it. An export folder (``msgfm export``:
``config.json`` + ``model.safetensors``) is recognised and will be one more function here,
:func:`load_export`, that returns the same :class:`PredictionModel`; nothing else in
msgfm.predict changes for it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from msgfm.config import FinetuneConfig, load_finetune_config
from msgfm.errors import MissingFileError, UserError
from msgfm.finetune.build import build_finetune_model, fine_tuned_run_dir, fine_tuned_state
from msgfm.finetune.inputs import ModelInputs, read_model_inputs
from msgfm.tasks.downstream import DownstreamTask
from msgfm.train.runtime import init_process_group


@dataclass
class PredictionModel:
    """A task module in eval mode on its device, its config and the facts of its inputs."""

    task: DownstreamTask
    cfg: FinetuneConfig
    inputs: ModelInputs
    source: Path


def load_model(path: str | Path, *, task_name: str, device: torch.device) -> PredictionModel:
    """The fine-tuned model at ``path`` (a run folder, its ``best/model.pt``, or the ``msgfm export`` folder of a
    fine-tuning run), checked to be for ``task_name``."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"--model {path}: no such folder; give a fine-tuning run folder "
                               f"(launchers/finetune.py --output-dir) or its msgfm export")
    if path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        model = load_export(path, device)
    else:
        model = load_finetune_run(path, device)
    if model.cfg.task.name != task_name:
        raise UserError(f"--task {task_name}, but the model at {path} was fine-tuned for task "
                        f"'{model.cfg.task.name}'; pass --task {model.cfg.task.name} or another model")
    return model


def load_finetune_run(path: Path, device: torch.device) -> PredictionModel:
    """A fine-tuning run folder's best weights, built from the config the run recorded."""
    run_dir = fine_tuned_run_dir(path)
    if not (run_dir / "config.yaml").is_file():
        raise MissingFileError(f"--model {path}: no config.yaml in {run_dir}; give a fine-tuning run folder "
                               f"(launchers/finetune.py --output-dir)")
    if path.is_dir() and not (run_dir / "best" / "model.pt").is_file():
        raise MissingFileError(f"--model {path}: no best/model.pt: not a fine-tuning run folder, or one that never "
                               f"finished an epoch (a pretraining run needs fine-tuning first: launchers/finetune.py)")
    return _build(run_dir, lambda: fine_tuned_state(path), device, source=run_dir)


def load_export(path: Path, device: torch.device) -> PredictionModel:
    """An ``msgfm export`` folder of a fine-tuning run: built from its ``task/`` folder (the run's config.yaml
    and model_inputs.json, the task module's weights in safetensors) as a run folder is built."""
    from safetensors.torch import load_file

    from msgfm.export.writer import TASK_CONFIG, TASK_DIR, TASK_WEIGHTS

    folder = path / TASK_DIR
    if not (folder / TASK_WEIGHTS).is_file():
        raise UserError(f"--model {path} is an msgfm export without a task module ({TASK_DIR}/{TASK_WEIGHTS}), "
                        f"e.g. of a pretraining run: msgfm predict runs fine-tuned models; export a fine-tuning "
                        f"run (msgfm export RUN -o DIR) or pass its run folder")
    if not (folder / TASK_CONFIG).is_file():
        raise MissingFileError(f"--model {path}: {TASK_DIR}/{TASK_CONFIG} is missing; export the fine-tuning run "
                               f"again")
    return _build(folder, lambda: load_file(str(folder / TASK_WEIGHTS)), device, source=path)


def _build(folder: Path, weights: Callable[[], dict[str, torch.Tensor]], device: torch.device, source: Path
           ) -> PredictionModel:
    """The task module described by ``folder``'s config.yaml and model_inputs.json, with ``weights()``."""
    inputs = read_model_inputs(folder)
    cfg = load_finetune_config(folder / "config.yaml")
    cfg.transfer.init = "random"  # the weights come from the run, not from a pretraining checkpoint
    cfg.transfer.freeze_encoder = False
    if cfg.model.moe.enabled and not dist.is_initialized():
        init_process_group(device.type == "cuda")  # DeepSpeed's MoE layers need a (one-process) group
    task, _ = build_finetune_model(cfg, None, inputs.stats)
    task.load_state_dict(weights())
    task.to(device).eval()
    return PredictionModel(task=task, cfg=cfg, inputs=inputs, source=source)
