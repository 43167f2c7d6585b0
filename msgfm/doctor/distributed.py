"""Checks that need every rank of a launch (deepspeed launcher or torchrun, WORLD_SIZE > 1):
all-reduce bandwidth, the all-to-all of one MoE dispatch at the config's shape, and that all
ranks see the same config and data. Collectives go through ``deepspeed.comm``, the layer the
MoE layers and ZeRO use (DeepSpeed is the one distributed engine: docs/architecture.md).

Bandwidths follow nccl-tests: algorithm bandwidth = bytes per rank / time; bus bandwidth
= algorithm bandwidth x 2(n-1)/n for all-reduce and x (n-1)/n for all-to-all, comparable
with the link's speed whatever the rank count.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from msgfm.config import RunConfig
from msgfm.doctor.report import FAIL, OK, WARN, Check


def launched_world_size() -> int:
    """WORLD_SIZE as a launcher set it (1 when run as one plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _seconds_per_op(op: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Mean time of ``op`` after warm-up; the slowest rank's, since a collective ends with it."""
    import deepspeed.comm as dist
    from deepspeed.comm import ReduceOp

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        op()
    sync()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(iters):
        op()
    sync()
    elapsed = torch.tensor([(time.perf_counter() - started) / iters], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=ReduceOp.MAX)
    return float(elapsed.item())


def allreduce_check(nbytes: int, dtype: torch.dtype, device: torch.device, iters: int) -> Check:
    """All-reduce of an ``nbytes`` buffer (the gradient reduction of data parallelism)."""
    import deepspeed.comm as dist

    world = dist.get_world_size()
    buffer = torch.randn(max(1, nbytes // torch.empty((), dtype=dtype).element_size()), device=device).to(dtype)
    size = buffer.numel() * buffer.element_size()
    seconds = _seconds_per_op(lambda: dist.all_reduce(buffer), device, warmup=2, iters=iters)
    algbw = size / seconds / 1e9
    busbw = algbw * 2 * (world - 1) / world
    return Check(name="all-reduce bandwidth", status=OK,
                 result=f"{size / 2**20:.0f} MiB {str(dtype).replace('torch.', '')} over {world} ranks: "
                        f"{seconds * 1e3:.2f} ms, {algbw:.2f} GB/s algorithm, {busbw:.2f} GB/s bus",
                 data={"bytes": size, "seconds": seconds, "algbw_gbs": algbw, "busbw_gbs": busbw})


def moe_dispatch_shape(cfg: RunConfig) -> tuple[int, int, int, int]:
    """(experts, capacity, channels, tokens) of one MoE layer's dispatch on one rank, as DeepSpeed's
    top-k gate sizes it: capacity = ceil(tokens / experts x capacity_factor), at least min_capacity.
    Tokens = the largest group batch per GPU x the token grid of the first MoE stage."""
    moe, model = cfg.model.moe, cfg.model
    stage = min(moe.blocks) if moe.blocks else 0
    fixed = [int(g.batch_size_per_gpu) for g in cfg.data.groups if g.batch_size_per_gpu != "auto"]
    batch = max(fixed) if fixed else int(cfg.data.total_batch_size_per_gpu or 1)
    tokens = batch * model.stage_resolutions[stage] ** 2
    capacity = max(math.ceil(tokens / moe.num_experts * moe.capacity_factor), moe.min_capacity)
    return moe.num_experts, capacity, model.embed_dim * 2**stage, tokens


def alltoall_check(cfg: RunConfig, dtype: torch.dtype, device: torch.device, iters: int) -> Check:
    """The all-to-all of one MoE dispatch ([experts, capacity, channels] per rank) over all ranks."""
    import deepspeed.comm as dist

    if not cfg.model.moe.enabled:
        return Check(name="MoE all-to-all", status=OK, result="not used: model.moe.enabled is false")
    world = dist.get_world_size()
    experts, capacity, channels, tokens = moe_dispatch_shape(cfg)
    while experts * capacity % world:  # all_to_all_single splits the rows evenly over the ranks
        capacity += 1
    send = torch.randn(experts * capacity, channels, device=device).to(dtype)
    receive = torch.empty_like(send)
    seconds = _seconds_per_op(lambda: dist.all_to_all_single(receive, send), device, warmup=2, iters=iters)
    size = send.numel() * send.element_size()
    algbw = size / seconds / 1e9
    busbw = algbw * (world - 1) / world
    return Check(name="MoE all-to-all", status=OK,
                 result=f"one dispatch of {cfg.name} ({tokens} tokens -> [{experts}, {capacity}, {channels}] "
                        f"{str(dtype).replace('torch.', '')}, {size / 2**20:.1f} MiB per rank) over {world} ranks: "
                        f"{seconds * 1e3:.2f} ms, {algbw:.2f} GB/s algorithm, {busbw:.2f} GB/s bus; each MoE layer "
                        f"runs two per forward and two per backward",
                 data={"shape": [experts, capacity, channels], "bytes": size, "seconds": seconds,
                       "algbw_gbs": algbw, "busbw_gbs": busbw})


def agreement_checks(fingerprints: dict[str, str | None]) -> list[Check]:
    """One row per fingerprint (config, ds_config, data): every rank's must equal rank 0's."""
    import deepspeed.comm as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, fingerprints)
    rows = []
    for key, mine in fingerprints.items():
        values = [g.get(key) for g in gathered]
        if mine is None and all(v is None for v in values):
            continue
        differ = [rank for rank, value in enumerate(values) if value != values[0]]
        if differ:
            rows.append(Check(name=f"ranks agree: {key}", status=FAIL,
                              result=f"rank(s) {differ} differ from rank 0 ({values[0]} vs {values[differ[0]]})",
                              todo=f"give every rank the same {key} (same files, same paths, same overrides); "
                                   f"the MoE all-to-all hangs or trains wrongly otherwise",
                              data={"values": values}))
        else:
            rows.append(Check(name=f"ranks agree: {key}", status=OK,
                              result=f"{len(values)} ranks see the same {key} ({values[0]})"))
    return rows


def gather_rank_rows(checks: list[Check], rank: int) -> tuple[list[Check], bool]:
    """(the warn/FAIL rows of the other ranks, named by rank, for rank 0 to show; whether any rank failed)."""
    import deepspeed.comm as dist

    mine = [asdict(c) for c in checks if c.status in (WARN, FAIL)]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    any_failed = any(row["status"] == FAIL for rows in gathered for row in rows)
    others = [Check(**{**row, "name": f"rank {r}: {row['name']}"}) for r, rows in enumerate(gathered) if r != rank
              for row in rows]
    return others, any_failed
