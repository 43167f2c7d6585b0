"""AdamW with the paper's parameter groups, as DeepSpeed-MoE needs them.

Parameters are grouped by owner and weight decay. The owner is a sensor for that sensor's own
parameters (its patch embedding f_i, ``backbone.embeddings.<sensor>``, and its decoder D_i,
``decoders.<sensor>``; the group's ``sensor`` key) and ``None`` for everything shared (the encoder,
the mask token). Per owner two groups by weight decay (none on what ``model.no_weight_decay()``
names, nor on 1-D tensors: norms and biases, as SimMIM does); then every MoE expert parameter is
moved into its own group per expert-parallel group with
``split_params_into_different_moe_groups_for_optimizer``: ZeRO-1/2 reduce and partition expert
gradients over the expert-data-parallel group, which they find through those groups' ``moe`` flag.

Each owner in its own groups gives every sensor its own flat ZeRO partition, so an optimizer
step can leave a sensor alone (:class:`UpdateGate`) and give it its own rate (:func:`set_rates`).

The kernel follows ``optimizer.implementation``: ``auto`` is DeepSpeed's fused
Adam on GPU and torch AdamW on CPU; ``apex`` is NVIDIA apex's FusedAdam, found
by what it provides (``apex.optimizers.FusedAdam``), never by the bare name.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from msgfm.config import OptimizerConfig
from msgfm.errors import UserError
from msgfm.ops.apex_support import apex_fused_adam

log = logging.getLogger(__name__)


# Modules whose children are keyed by sensor name: a sensor's own parameters live under them.
SENSOR_MODULES = ("embeddings", "decoders")
SHARED = "shared"


def parameter_owner(name: str) -> str | None:
    """The sensor that owns parameter ``name`` (``...embeddings.<sensor>.`` / ``...decoders.<sensor>.``), else None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-2]):
        if part in SENSOR_MODULES:
            return parts[i + 1]
    return None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Per owner (shared, then each sensor) decay / no-decay groups; MoE experts split into their own groups."""
    no_weight_decay = getattr(model, "no_weight_decay", None)
    skip = set(no_weight_decay()) if callable(no_weight_decay) else set()
    buckets: dict[tuple[str | None, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (name in skip or param.ndim <= 1)
        buckets.setdefault((parameter_owner(name), decay), []).append(param)
    owners = [None, *dict.fromkeys(o for o, _ in buckets if o is not None)]
    groups = [{"name": f"{owner or SHARED}/{'decay' if decay else 'no_decay'}", "sensor": owner,
               "params": buckets.get((owner, decay), []), "weight_decay": weight_decay if decay else 0.0}
              for owner in owners for decay in (True, False)]
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


def set_rates(optimizer: Any, shared_lr: float, sensor_lrs: Mapping[str, float]) -> None:
    """The shared parameter groups at ``shared_lr``, each sensor's at ``sensor_lrs[sensor]`` (x ``lr_scale``);
    groups of sensors not named keep their rate (the gate leaves them out of the step)."""
    for group in optimizer.param_groups:
        sensor = group.get("sensor")
        if sensor is None:
            group["lr"] = shared_lr * group.get("lr_scale", 1.0)
        elif sensor in sensor_lrs:
            group["lr"] = sensor_lrs[sensor] * group.get("lr_scale", 1.0)


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, fp16), whose ``step`` touches the parameters."""
    while not isinstance(optimizer, torch.optim.Optimizer) or isinstance(
            getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class UpdateGate:
    """Which parameter groups an optimizer step may touch, and the rates it used, seen inside the step.

    Hooks on the torch optimizer under DeepSpeed (ZeRO-1/2 call it once per parameter group): before
    each call the groups of sensors outside ``active_sensors`` are taken out of ``param_groups``, so
    neither their parameters nor their optimizer state (Adam moments, step count) change and no weight
    decay reaches them; shared groups always take part. Each call also records ``{owner: rate}`` of the
    groups it stepped (``rate`` = lr / lr_scale), read at the call: a rate set after ``engine.step()``
    shows up as the wrong rate in :meth:`drain`.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = base_optimizer(optimizer)
        self.active_sensors: set[str] | None = None  # None: every group
        self.calls: list[dict[str, float]] = []
        self._stashed: list[list[dict[str, Any]]] = []
        self.optimizer.register_step_pre_hook(self._before)
        self.optimizer.register_step_post_hook(self._after)

    def _takes_part(self, group: Mapping[str, Any]) -> bool:
        sensor = group.get("sensor")
        return sensor is None or self.active_sensors is None or sensor in self.active_sensors

    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        groups = optimizer.param_groups
        self._stashed.append(groups)
        optimizer.param_groups = [g for g in groups if self._takes_part(g)]
        rates: dict[str, float] = {}
        for g in optimizer.param_groups:
            owner = g.get("sensor") or SHARED
            rate = g["lr"] / g.get("lr_scale", 1.0)
            rates.setdefault(owner, rate)  # every group of one owner has its rate (up to lr_scale rounding)
        if rates:
            self.calls.append(rates)

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        optimizer.param_groups = self._stashed.pop()

    def drain(self) -> dict[str, float]:
        """``{owner: rate}`` over the calls since the last drain (one engine step); empty when the step was
        skipped (fp16 overflow)."""
        merged: dict[str, float] = {}
        for call in self.calls:
            merged.update(call)
        self.calls = []
        return merged
