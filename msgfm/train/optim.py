"""AdamW with the paper's parameter groups, as DeepSpeed-MoE needs them.

Two groups by weight decay (none on what ``model.no_weight_decay()`` names, nor
on 1-D tensors: norms and biases, as SimMIM does), then every MoE expert
parameter moved into its own group per expert-parallel group with
``split_params_into_different_moe_groups_for_optimizer``: ZeRO-1/2 reduce and
partition expert gradients over the expert-data-parallel group, which they
find through those groups' ``moe`` flag.

The kernel follows ``optimizer.implementation``: ``auto`` is DeepSpeed's fused
Adam on GPU and torch AdamW on CPU; ``apex`` is NVIDIA apex's FusedAdam, found
by what it provides (``apex.optimizers.FusedAdam``), never by the bare name.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from msgfm.config import OptimizerConfig
from msgfm.errors import UserError
from msgfm.ops.apex_support import apex_fused_adam

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay / no-decay groups, with MoE expert parameters split into their own groups."""
    no_weight_decay = getattr(model, "no_weight_decay", None)
    skip = set(no_weight_decay()) if callable(no_weight_decay) else set()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name in skip or param.ndim <= 1 else decay).append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


def optimizer_class(cfg: OptimizerConfig, on_gpu: bool) -> tuple[type, dict[str, Any], str]:
    """(class, extra kwargs, human-readable name) for ``optimizer.implementation``."""
    kind = cfg.implementation
    if kind == "auto":
        kind = "deepspeed" if on_gpu else "torch"
    if kind == "torch":
        return torch.optim.AdamW, {}, "torch.optim.AdamW"
    if not on_gpu:
        raise UserError(f"optimizer.implementation={cfg.implementation} needs a CUDA device; on CPU "
                        f"set optimizer.implementation=torch (or auto)")
    if kind == "deepspeed":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam, {"adam_w_mode": True}, "deepspeed.ops.adam.FusedAdam"
    cls, reason = apex_fused_adam()
    if cls is None:
        raise UserError(f"optimizer.implementation=apex: {reason}. Build NVIDIA apex from source "
                        f"(github.com/NVIDIA/apex) or set optimizer.implementation=auto")
    return cls, {"adam_w_mode": True}, "apex.optimizers.FusedAdam"


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float, on_gpu: bool) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; ``lr`` is only the initial value (the loop sets it every step)."""
    cls, extra, name = optimizer_class(cfg, on_gpu)
    log.info("optimizer: %s (betas %s, eps %g, weight decay %g)", name, cfg.betas, cfg.eps, cfg.weight_decay)
    return cls(param_groups(model, cfg.weight_decay), lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, **extra)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's LR to ``lr`` x its ``lr_scale`` (layer-wise decay; 1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
