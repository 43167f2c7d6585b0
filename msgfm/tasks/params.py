"""Parameter counts of a run config, global over the expert-parallel split, without building weights.

The model is built on the ``meta`` device (shapes only, no memory, no process group) with
``expert_parallel_size = 1``, so the expert totals are those of all experts of every layer,
whatever the run's split: with expert-parallel size E a rank holds only num_experts / E of them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TypedDict

import torch
from deepspeed.moe.utils import is_moe_param

from msgfm.config import RunConfig
from msgfm.tasks.simmim import build_pretrain_task


def _global_config(cfg: RunConfig, moe_enabled: bool) -> RunConfig:
    moe = dataclasses.replace(cfg.model.moe, expert_parallel_size=1, enabled=moe_enabled)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))


def _numel(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


class ParameterCounts(TypedDict):
    """What :func:`count_parameters` returns (see there)."""

    encoder_dense: int
    encoder_shared: int
    encoder_experts: int
    encoder_total: int
    encoder_active_per_token: int
    embeddings: int
    decoders: int
    mask_token: int
    model_total: int
    model_active_per_token: int
    per_sensor: dict[str, int]


def count_parameters(cfg: RunConfig) -> ParameterCounts:
    """Global parameter counts of the pretraining model of ``cfg`` (works on CPU, no process group).

    Keys: ``encoder_shared`` (encoder parameters outside the experts, gates included),
    ``encoder_experts`` (all experts of all MoE layers), ``encoder_total``,
    ``encoder_active_per_token`` (shared + top_k / num_experts of the experts),
    ``encoder_dense`` (the same encoder with plain MLPs instead of MoE: the Swin's size),
    ``embeddings`` / ``decoders`` (all sensors), ``per_sensor`` (embedding + decoder of each
    sensor), ``mask_token``, ``model_total`` and ``model_active_per_token`` (the encoder's
    active part plus ALL embeddings, decoders and the mask token; one sample touches only its
    sensor's embedding and its target's decoder, see ``per_sensor``).
    """
    with torch.device("meta"):
        model = build_pretrain_task(_global_config(cfg, cfg.model.moe.enabled))
        dense = build_pretrain_task(_global_config(cfg, False)) if cfg.model.moe.enabled else model
    enc = list(model.backbone.encoder.parameters())
    experts = _numel(p for p in enc if is_moe_param(p))
    shared = _numel(enc) - experts
    moe = cfg.model.moe
    active_experts = experts * moe.top_k // moe.num_experts if moe.enabled else 0
    embeddings = _numel(model.backbone.embeddings.parameters())
    decoders = _numel(model.decoders.parameters())
    mask_token = model.backbone.mask_token.numel() if model.backbone.mask_token is not None else 0
    other = embeddings + decoders + mask_token
    return {
        "encoder_dense": _numel(dense.backbone.encoder.parameters()),
        "encoder_shared": shared,
        "encoder_experts": experts,
        "encoder_total": shared + experts,
        "encoder_active_per_token": shared + active_experts,
        "embeddings": embeddings,
        "decoders": decoders,
        "mask_token": mask_token,
        "model_total": shared + experts + other,
        "model_active_per_token": shared + active_experts + other,
        "per_sensor": {s: _numel(model.backbone.embeddings[s].parameters()) + _numel(model.decoders[s].parameters())
                       for s in model.backbone.sensors},
    }
