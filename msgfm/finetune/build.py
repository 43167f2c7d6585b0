"""Build the fine-tuning task of a config and initialise it: pretrained msGFM, timm weights, or random.

Every initialisation goes through one path: a state dict in the backbone layout
(``embeddings.<sensor>.*``, ``encoder.*``; see msgfm/models/adapter.py, which also turns
pretraining checkpoints and timm weights into it) is mapped onto the task's backbone by
:func:`load_pretrained` (the rules are in msgfm/finetune/transfer.py).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from msgfm.config import FinetuneConfig, ModelConfig, from_dict, parse_override
from msgfm.data.stats import Stats
from msgfm.errors import MissingFileError, UserError
from msgfm.finetune.options import freeze
from msgfm.finetune.transfer import (
    ENCODER_PREFIX,
    TransferError,
    TransferReport,
    adapt_encoder_state,
    embedding_sensor,
    sensor_embeddings,
    stack_embeddings,
)
from msgfm.models import MsGFMBackbone, backbone_state, timm_to_backbone
from msgfm.sensors import get_sensor
from msgfm.tasks.downstream import TASK_CLASSES, DownstreamTask, backbone_embeddings, stacked_name
from msgfm.train.checkpoint import load_client_state, load_model_state_dict
from msgfm.train.config_guard import config_values_equal
from msgfm.train.safe_load import load_weights

log = logging.getLogger(__name__)

# What fine-tuning may change in a pretrained encoder's model config.
FINETUNE_MODEL_KEYS = ("img_size", "window_size", "drop_path_rate", "grad_checkpointing")


def checkpoint_model_config(client_state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pretraining run's ``model`` section from a checkpoint's client state, if recorded."""
    info = client_state.get("msgfm", {}) if isinstance(client_state, Mapping) else {}
    config = info.get("config") if isinstance(info, Mapping) else None
    if isinstance(config, Mapping) and isinstance(config.get("model"), Mapping):
        return dict(config["model"])
    return None


def encoder_config(cfg: FinetuneConfig, pretrained_model: Mapping[str, Any] | None) -> ModelConfig:
    """The fine-tuning encoder's config: the checkpoint's architecture + the task's size and drop path.

    MoE experts all live on every rank during fine-tuning (``expert_parallel_size=1``), and evaluation
    drops no token: ``eval_capacity_factor`` = number of experts gives every expert room for all tokens,
    so scores depend neither on the evaluation batch size and its split over ranks nor on the RNG
    (DeepSpeed's gate picks the tokens to drop at random).
    """
    if pretrained_model is None:
        tree = dataclasses.asdict(cfg.model)
    else:
        tree = copy.deepcopy(dict(pretrained_model))
        for key in FINETUNE_MODEL_KEYS:
            tree[key] = getattr(cfg.model, key)
        tree["sensors"] = []  # the fine-tuning model has its own embeddings
    moe = tree.setdefault("moe", {})
    moe["expert_parallel_size"] = 1
    experts = moe.get("num_experts", cfg.model.moe.num_experts)
    moe["eval_capacity_factor"] = max(float(experts), float(moe.get("eval_capacity_factor", 0.0)))
    if isinstance(tree["moe"].get("blocks"), dict):  # JSON/YAML round trips may turn stage keys into str
        tree["moe"]["blocks"] = {int(k): v for k, v in tree["moe"]["blocks"].items()}
    return from_dict(ModelConfig, tree, "model")


def new_model(cfg: FinetuneConfig, model_cfg: ModelConfig, stats: Stats | None = None) -> DownstreamTask:
    """The task module of ``cfg`` with a freshly initialised backbone of ``model_cfg`` (no mask token).

    ``stats`` (the task's normalization statistics) are needed by restoration tasks only."""
    task = cfg.task
    channels = {s: get_sensor(s).num_channels for s in task.sensors}
    backbone = MsGFMBackbone(model_cfg, cfg.kernels, backbone_embeddings(task.sensors, channels,
                                                                       cfg.transfer.method), mask_token=False)
    if task.kind == "restoration":
        if stats is None:
            raise UserError(f"task '{task.name}' predicts physical units: it needs the training statistics")
        outputs = get_sensor(task.target_sensor).num_channels
    else:
        outputs = task.num_classes
    return TASK_CLASSES[task.kind](backbone, task, stats, method=cfg.transfer.method, num_outputs=outputs,
                                   head_channels=cfg.transfer.head_channels, head_norm=cfg.transfer.head_norm,
                                   head_dropout=cfg.transfer.head_dropout, layernorm=cfg.kernels.layernorm)


def load_pretrained(task: DownstreamTask, state: Mapping[str, torch.Tensor]) -> TransferReport:
    """Copy a backbone-layout state dict into the task's backbone (encoder + sensor embeddings); report
    by name (backbone-relative names; the task's own new parts, e.g. ``head.*``, count as missing)."""
    report = TransferReport()
    own = task.backbone.state_dict()
    new_state = adapt_encoder_state(state, own, report)
    pretrained_embeds = sensor_embeddings(state)
    channels = {s: get_sensor(s).num_channels for s in task.sensors}
    if task.method == "stack":
        prefix = f"embeddings.{stacked_name(task.sensors)}."
        target = {k[len(prefix):]: v for k, v in own.items() if k.startswith(prefix)}
        stacked, report.embeddings_from = stack_embeddings(pretrained_embeds, task.sensors, channels, target)
        new_state.update({prefix + k: v for k, v in stacked.items()})
    else:
        for sensor in task.sensors:
            if sensor not in pretrained_embeds:
                report.embeddings_from[sensor] = "random"
                continue
            for param, value in pretrained_embeds[sensor].items():
                key = f"embeddings.{sensor}.{param}"
                if value.shape != own[key].shape:
                    raise TransferError(f"pretrained embedding '{sensor}' {param} has shape {tuple(value.shape)}, "
                                        f"the fine-tuning model needs {tuple(own[key].shape)}")
                new_state[key] = value
            report.embeddings_from[sensor] = "pretrained"
    task.backbone.load_state_dict(new_state, strict=False)
    consumed = {k for k in state if k.startswith(ENCODER_PREFIX) or embedding_sensor(k) in task.sensors}
    report.loaded = sorted(new_state)
    report.missing = sorted(k for k in own if k not in new_state) + \
        sorted(k for k in task.state_dict() if not k.startswith("backbone."))
    report.unused = sorted(k for k in state if k not in consumed)
    return report


def timm_backbone_state(cfg: FinetuneConfig, weights: str | Path) -> dict[str, torch.Tensor]:
    """Timm Swin weights as a backbone-layout state dict for the task sensor ``transfer.timm_sensor``."""
    sensor = cfg.transfer.timm_sensor or cfg.task.sensors[0]
    if sensor not in cfg.task.sensors:
        raise UserError(f"transfer.timm_sensor '{sensor}' is not one of the task's sensors {cfg.task.sensors}")
    path = Path(weights)
    if not path.is_file():
        raise MissingFileError(f"transfer.timm_weights: no file at {path}; save a timm SwinTransformer's "
                               f"state_dict() there (torch.save) or give a .safetensors file")
    timm_state = load_weights(path, "timm weights")  # safetensors, or a torch file loaded as data only
    # a timm checkpoint of another window (e.g. 12 for Swin-B/384) is resampled by adapt_encoder_state
    return timm_to_backbone(timm_state, sensor)


def pretraining_client_state(pretrained: str | Path) -> Mapping[str, Any]:
    """The client state of the checkpoint ``--pretrained`` names; a fine-tuning run is refused, in one line."""
    client = load_client_state(pretrained)
    info = client.get("msgfm", {})
    config = info.get("config") if isinstance(info, Mapping) else None
    if isinstance(info, Mapping) and (info.get("kind") == "finetune" or (isinstance(config, Mapping)
                                                                          and "task" in config)):
        task = config.get("task", {}).get("name", "?") if isinstance(config, Mapping) else "?"
        raise UserError(f"--pretrained {pretrained} is a fine-tuning run (task '{task}'), not a pretraining "
                        f"checkpoint: pass a pretraining run folder or checkpoint; to score this run use "
                        f"--eval-only --checkpoint {pretrained}")
    return client


def resolve_encoder(cfg: FinetuneConfig, pretrained: str | Path | None = None) -> ModelConfig:
    """The encoder config ``transfer.init`` leads to (the checkpoint's architecture for ``pretrained``), checked
    against the other arguments; builds nothing."""
    init = cfg.transfer.init
    if init == "pretrained":
        if pretrained is None:
            raise UserError("transfer.init is 'pretrained': pass --pretrained CKPT_DIR (a pretraining checkpoint "
                            "or run folder), or set transfer.init=random for the random-init baseline")
        return encoder_config(cfg, checkpoint_model_config(pretraining_client_state(pretrained)))
    if init == "timm" and cfg.model.moe.enabled:
        raise UserError("transfer.init=timm: timm Swin weights are dense; set model.moe.enabled=false")
    if init == "random" and pretrained is not None:
        raise UserError(f"--pretrained was given but transfer.init={init}; set transfer.init=pretrained")
    return encoder_config(cfg, None)


def _override_leaves(parts: list[str], value: Any) -> list[tuple[list[str], Any]]:
    if isinstance(value, Mapping):
        return [leaf for k, v in value.items() for leaf in _override_leaves([*parts, str(k)], v)]
    return [(parts, value)]


def refuse_dropped_model_overrides(overrides: Sequence[str], built: ModelConfig, source: str) -> None:
    """An override of the encoder that ``source`` (a checkpoint) replaces is refused with its key, not dropped.

    Only :data:`FINETUNE_MODEL_KEYS` are taken from the fine-tuning config when the architecture comes from a
    checkpoint; an override of any other ``model.*`` key that differs from what is built would be ignored."""
    tree = dataclasses.asdict(built)
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] != "model":
            continue
        for path, leaf in _override_leaves(parts[1:], value):
            if not path or path[0] in FINETUNE_MODEL_KEYS:
                continue
            node: Any = tree
            for part in path:  # moe.blocks has integer keys
                node = node.get(int(part) if part.isdigit() else part) if isinstance(node, dict) else None
            if node is not None and config_values_equal(node, leaf):
                continue
            key = "model." + ".".join(path)
            built_value = "not set" if node is None else f"{node!r}"
            raise UserError(f"override '{text}': the encoder's architecture comes from {source} ({key} is "
                            f"{built_value} there), so {key} cannot change; fine-tuning may change only "
                            f"{', '.join('model.' + k for k in FINETUNE_MODEL_KEYS)}. Drop the override, or set "
                            f"transfer.init=random to build the encoder from the config")


def build_finetune_model(cfg: FinetuneConfig, pretrained: str | Path | None = None, stats: Stats | None = None,
                         model_cfg: ModelConfig | None = None) -> tuple[DownstreamTask, TransferReport | None]:
    """The task module of ``cfg``, initialised as ``transfer.init`` says; frozen backbone for linear probing.

    ``model_cfg``: the encoder config :func:`resolve_encoder` gave (resolved here when None)."""
    init = cfg.transfer.init
    model_cfg = model_cfg if model_cfg is not None else resolve_encoder(cfg, pretrained)
    model = new_model(cfg, model_cfg, stats)
    report = None
    if init == "pretrained":
        assert pretrained is not None  # resolve_encoder refused it
        report = load_pretrained(model, backbone_state(load_model_state_dict(pretrained)))
    elif init == "timm":
        report = load_pretrained(model, timm_backbone_state(cfg, cfg.transfer.timm_weights))
    if report is not None:
        log.info(report.summary())
    if cfg.transfer.freeze_encoder:
        frozen = sum(freeze(m) for m in model.encoder_modules())
        log.info("linear probing: %d encoder parameters frozen", frozen)
    return model, report


def fine_tuned_run_dir(checkpoint: str | Path) -> Path:
    """The run folder of a fine-tuned model given as its run folder or its ``<run>/best/model.pt``."""
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent.parent


def fine_tuned_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The task module's weights of a fine-tuning run folder (its ``best/model.pt``), a weights file, or
    one of its DeepSpeed checkpoint folders."""
    path = Path(checkpoint)
    if path.is_dir() and (path / "best" / "model.pt").is_file():
        path = path / "best" / "model.pt"
    if path.is_file():
        return load_weights(path, "fine-tuned weights")  # data only: a file from elsewhere runs no code
    return load_model_state_dict(path)  # a DeepSpeed checkpoint folder of a fine-tuning run
