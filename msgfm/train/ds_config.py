"""DeepSpeed JSON configs: loading, and the checks that tie them to a run config.

How group batch sizes relate to the ds_config
---------------------------------------------
Each outer step runs every due data group in turn with its own batch size, then one
``engine.step()`` (``train.mode: single_update``) or one per group (``per_group``;
docs/training.md). DeepSpeed knows only one
micro batch; it uses it for its batch arithmetic assertion and throughput
timers, never to cut batches (msgfm's data scheduler does that). So msgfm asks:

- ``train_micro_batch_size_per_gpu`` = the *largest* group batch size
  (128, the rgb group, in the paper config);
- ``gradient_accumulation_steps`` = 1 (each backward is followed by its step; single-update mode
  sums the group losses into one backward);
- ``train_batch_size``, if given, = micro batch x world size.

The optimizer and the LR schedule come from the run config (one place for
each fact), so the ds_config must not have ``optimizer`` or ``scheduler``
sections.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from msgfm.errors import UserError


class DSConfigError(UserError):
    """A ds_config that cannot work with the run config; the message says what to change."""


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON config as a dict (a clear error for a missing file or bad JSON)."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in Path(__file__).resolve().parents[2].glob("ds_configs/*.json"))
        raise DSConfigError(f"--deepspeed_config {path} does not exist (shipped: ds_configs/{{{','.join(shipped)}}})")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise DSConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise DSConfigError(f"{path} must hold a JSON object")
    return config


def intended_world_size(path: str | Path) -> int | None:
    """The world size a ds_config is written for, from its name (``v100x8.json`` -> 8), else None."""
    match = re.search(r"x(\d+)", Path(path).stem)
    return int(match.group(1)) if match else None


def precision(config: dict[str, Any]) -> str:
    """``fp16``, ``bf16`` or ``fp32``."""
    if config.get("fp16", {}).get("enabled", False):
        return "fp16"
    bf16 = config.get("bf16", config.get("bfloat16", {}))
    return "bf16" if bf16.get("enabled", False) else "fp32"


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_ds_config(config: dict[str, Any], name: str, group_batches: dict[str, int], world_size: int) -> None:
    """Raise :class:`DSConfigError` when the ds_config contradicts the run config's groups."""
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise DSConfigError(f"{name}: remove the '{section}' section; msgfm builds the optimizer and LR "
                                f"schedule from the run config (optimizer.*, schedule.*, data.groups[*].lr)")
    gas = config.get("gradient_accumulation_steps", 1)
    if gas != 1:
        raise DSConfigError(f"{name}: gradient_accumulation_steps must be 1 (got {gas}); msgfm steps the "
                            f"optimizer after every group batch. Raise data.groups[*].batch_size_per_gpu instead")
    largest = max(group_batches.values())
    micro = config.get("train_micro_batch_size_per_gpu")
    if micro is None:
        raise DSConfigError(f"{name}: set train_micro_batch_size_per_gpu to {largest}, the largest "
                            f"data.groups[*].batch_size_per_gpu ({group_batches})")
    if micro != largest:
        raise DSConfigError(f"{name}: train_micro_batch_size_per_gpu={micro} contradicts the group batch sizes "
                            f"{group_batches}: it must equal the largest, {largest}. Change the ds_config or "
                            f"data.groups[*].batch_size_per_gpu")
    total = config.get("train_batch_size")
    if total is not None and total != micro * world_size:
        raise DSConfigError(f"{name}: train_batch_size={total} != train_micro_batch_size_per_gpu {micro} x world "
                            f"size {world_size}; drop train_batch_size or set it to {micro * world_size}")


def check_moe_compatible(config: dict[str, Any], name: str, moe_enabled: bool) -> None:
    if moe_enabled and zero_stage(config) == 3:
        raise DSConfigError(f"{name}: ZeRO stage 3 does not work with DeepSpeed-MoE layers (model.moe.enabled); "
                            f"use zero_optimization.stage 1 or 2, or model.moe.enabled=false")


def check_device(config: dict[str, Any], name: str, on_gpu: bool) -> None:
    prec = precision(config)
    if not on_gpu and prec != "fp32":
        raise DSConfigError(f"{name} enables {prec}, but no CUDA device is visible; on CPU use "
                            f"ds_configs/cpu.json (fp32) or disable {prec} in the ds_config")
