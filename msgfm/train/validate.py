"""Start-up checks, run before any data is read: each failure is one clear error saying what to change."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from msgfm.config import RunConfig
from msgfm.errors import UserError
from msgfm.train import ds_config as dsc


def resolve_data_root(cfg: RunConfig, data_root: str | Path | None) -> Path:
    """``--data-root`` when given, else ``data.root`` of the config."""
    return Path(data_root if data_root is not None else cfg.data.root)


def check_parallelism(cfg: RunConfig, world_size: int) -> None:
    moe = cfg.model.moe
    if not moe.enabled:
        return
    ep = moe.expert_parallel_size
    if world_size % ep:
        raise UserError(f"model.moe.expert_parallel_size={ep} does not divide the world size {world_size}: launch "
                        f"a multiple of {ep} ranks, or set model.moe.expert_parallel_size to a divisor of "
                        f"{world_size} that also divides model.moe.num_experts={moe.num_experts}")
    if moe.num_experts % ep:  # also checked by MoEConfig; repeated here for configs built in code
        raise UserError(f"model.moe.expert_parallel_size={ep} does not divide model.moe.num_experts="
                        f"{moe.num_experts}")


def startup_checks(cfg: RunConfig, ds_config: dict[str, Any], ds_name: str, world_size: int, on_gpu: bool,
                   group_batches: dict[str, int] | None, check_device: bool = True) -> None:
    """Everything that can be checked from the configs alone (the data is planned separately). Without
    ``group_batches`` (``auto`` batch sizes need the data) the ds_config's batch keys wait for the plan."""
    dsc.check_moe_compatible(ds_config, ds_name, cfg.model.moe.enabled)
    check_parallelism(cfg, world_size)
    if check_device:
        dsc.check_device(ds_config, ds_name, on_gpu)
    if group_batches is not None:
        dsc.check_ds_config(ds_config, ds_name, group_batches, world_size)
