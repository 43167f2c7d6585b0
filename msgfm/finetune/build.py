"""Build the fine-tuning model of a config and initialise it: pretrained msGFM, timm weights, or random.

Every initialisation goes through one path: a state dict in the pretraining model's
layout (``embeddings.<sensor>.*``, ``encoder.*``) is mapped onto the fine-tuning
model by :func:`load_pretrained` (see msgfm/finetune/transfer.py for the rules).
timm weights get there through ``msgfm.models.load_timm_state_dict`` into a dense
one-sensor pretraining model.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from msgfm.config import ModelConfig, from_dict
from msgfm.finetune.config import FinetuneConfig
from msgfm.finetune.model import FinetuneModel
from msgfm.finetune.options import freeze
from msgfm.finetune.transfer import (BIAS_TABLE, ENCODER_PREFIX, TransferError, TransferReport,
                                     adapt_encoder_state, embedding_sensor, interpolate_bias_table, sensor_embeddings,
                                     stack_embeddings)
from msgfm.sensors import get_sensor
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


def new_model(cfg: FinetuneConfig, model_cfg: ModelConfig) -> FinetuneModel:
    task = cfg.task
    if task.kind == "restoration":
        outputs = get_sensor(task.target_sensor).num_channels
    else:
        outputs = task.num_classes
    return FinetuneModel(model_cfg, cfg.kernels, task.sensors, cfg.transfer.method, task.kind,
                         num_outputs=outputs, head_channels=cfg.transfer.head_channels,
                         head_norm=cfg.transfer.head_norm, head_dropout=cfg.transfer.head_dropout)


def load_pretrained(model: FinetuneModel, state: Mapping[str, torch.Tensor]) -> TransferReport:
    """Copy a pretraining-layout state dict into ``model`` (encoder + sensor embeddings); report by name."""
    report = TransferReport()
    own = model.state_dict()
    new_state = adapt_encoder_state(state, own, report)
    pretrained_embeds = sensor_embeddings(state)
    if model.method == "stack":
        target = {k[len("embed."):]: v for k, v in own.items() if k.startswith("embed.")}
        stacked, report.embeddings_from = stack_embeddings(pretrained_embeds, model.sensors, model.channels, target)
        new_state.update({f"embed.{k}": v for k, v in stacked.items()})
    else:
        for sensor in model.sensors:
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
    model.load_state_dict(new_state, strict=False)
    consumed = {k for k in state if k.startswith(ENCODER_PREFIX) or embedding_sensor(k) in model.sensors}
    report.loaded = sorted(new_state)
    report.missing = sorted(k for k in own if k not in new_state)
    report.unused = sorted(k for k in state if k not in consumed)
    return report


def timm_as_pretrain_state(cfg: FinetuneConfig, weights: str | Path) -> dict[str, torch.Tensor]:
    """timm Swin weights -> a pretraining-layout state dict (through msgfm.models.load_timm_state_dict)."""
    from msgfm.config import RunConfig
    from msgfm.models import build_pretrain_model, load_timm_state_dict

    sensor = cfg.transfer.timm_sensor or cfg.task.sensors[0]
    if sensor not in cfg.task.sensors:
        raise ValueError(f"transfer.timm_sensor '{sensor}' is not one of the task's sensors {cfg.task.sensors}")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"transfer.timm_weights: no file at {path}; save a timm SwinTransformer's "
                                f"state_dict() there (torch.save) or give a .safetensors file")
    timm_state = load_weights(path, "timm weights")  # safetensors, or a torch file loaded as data only
    model_tree = dataclasses.asdict(cfg.model)
    model_tree["sensors"] = [sensor]
    model_tree["moe"]["enabled"] = False
    run_cfg = from_dict(RunConfig, {"model": model_tree, "data": {"groups": []}})
    pretrain = build_pretrain_model(run_cfg)
    own = pretrain.encoder.state_dict()
    # timm checkpoints of another window (e.g. 12 for Swin-B/384): resample the bias tables first
    timm_state = {k: interpolate_bias_table(v, (int(round(own[k].shape[0] ** 0.5)) + 1) // 2)
                  if k.endswith(BIAS_TABLE) and k in own and own[k].shape != v.shape else v
                  for k, v in timm_state.items()}
    load_timm_state_dict(pretrain, timm_state, sensor)
    return pretrain.state_dict()


def build_finetune_model(cfg: FinetuneConfig, pretrained: str | Path | None = None
                         ) -> tuple[FinetuneModel, TransferReport | None]:
    """The model of ``cfg``, initialised as ``transfer.init`` says; frozen encoder for linear probing."""
    init = cfg.transfer.init
    report = None
    if init == "pretrained":
        if pretrained is None:
            raise ValueError("transfer.init is 'pretrained': pass --pretrained CKPT_DIR (a pretraining checkpoint "
                             "or run folder), or set transfer.init=random for the random-init baseline")
        from msgfm.train.checkpoint import load_client_state, load_model_state_dict

        state = load_model_state_dict(pretrained)
        model_cfg = encoder_config(cfg, checkpoint_model_config(load_client_state(pretrained)))
        model = new_model(cfg, model_cfg)
        report = load_pretrained(model, state)
    elif init == "timm":
        if cfg.model.moe.enabled:
            raise ValueError("transfer.init=timm: timm Swin weights are dense; set model.moe.enabled=false")
        model = new_model(cfg, encoder_config(cfg, None))
        report = load_pretrained(model, timm_as_pretrain_state(cfg, cfg.transfer.timm_weights))
    else:
        if pretrained is not None:
            raise ValueError(f"--pretrained was given but transfer.init={init}; set transfer.init=pretrained")
        model = new_model(cfg, encoder_config(cfg, None))
    if report is not None:
        log.info(report.summary())
    if cfg.transfer.freeze_encoder:
        frozen = sum(freeze(m) for m in model.encoder_modules())
        log.info("linear probing: %d encoder parameters frozen", frozen)
    return model, report
