"""``--dry-run``: check a many-GPU configuration on one CPU without training.

Builds the model for the target world size (only the local experts are
materialised), runs every start-up check for that world size, then prints
the global parameter counts, the per-GPU memory of model states (formula in
msgfm/train/memory.py) and the steps per epoch when the data is present.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from msgfm.config import RunConfig
from msgfm.data.plan import DataPlan, DataValidationError, configured_batches, plan_data
from msgfm.errors import UserError
from msgfm.tasks import build_pretrain_task, count_parameters
from msgfm.train import ds_config as dsc
from msgfm.train.memory import BYTES, estimate_memory
from msgfm.train.schedule import describe_rates
from msgfm.train.validate import startup_checks


def _m(n: float) -> str:
    return f"{n / 1e6:,.1f}M"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def dry_run(cfg: RunConfig, ds_config: dict[str, Any], ds_name: str, data_root: Path, world_size: int | None) -> int:
    """Print the checks and estimates; raise the first configuration error. Returns 0."""
    rank = int(os.environ.get("RANK", "0"))
    if world_size is None:
        world_size = dsc.intended_world_size(ds_name) or int(os.environ.get("WORLD_SIZE", "1"))
    plan, data_problem = _plan(cfg, data_root)
    resolved = configured_batches(cfg) if plan is None else \
        {g: (plan.batch_sizes[g], plan.lrs[g]) for g in plan.batch_sizes}
    if resolved is None:
        raise UserError(f"data.groups[*].batch_size_per_gpu: auto needs the data (sample counts) to resolve: "
                        f"{data_problem}. Pass --data-root or give integer batch sizes")
    batches = {g: b for g, (b, _) in resolved.items()}
    # the target machine's precision is not checked against this CPU: that is the point of a dry run
    startup_checks(cfg, ds_config, ds_name, world_size, False, batches, check_device=False)
    if rank != 0:  # under a multi-rank launcher only rank 0 reports
        return 0

    model = build_pretrain_task(cfg)  # the model of one rank: num_experts / expert_parallel_size local experts
    local_params = sum(p.numel() for p in model.parameters())
    counts = count_parameters(cfg)
    expert = int(counts["encoder_experts"])
    dense = int(counts["model_total"]) - expert
    ep = cfg.model.moe.expert_parallel_size if cfg.model.moe.enabled else 1
    stage, prec = dsc.zero_stage(ds_config), dsc.precision(ds_config)
    mem = estimate_memory(dense, expert, world_size, ep, stage, prec)
    b_param, b_grad, b_opt = BYTES[prec]

    print(f"dry run: config {cfg.name}, ds_config {ds_name}, world size {world_size}")
    print(f"  checks passed: ZeRO-{stage} {'with' if cfg.model.moe.enabled else 'without'} MoE, "
          f"expert_parallel_size {ep} divides world size {world_size} and num_experts "
          f"{cfg.model.moe.num_experts}, micro batch {ds_config.get('train_micro_batch_size_per_gpu')} = largest "
          f"group batch, gradient_accumulation_steps 1; precision {prec} (not checked against this machine)")
    print("  group batch per GPU / base LR: " + ", ".join(f"{g} {b} / {lr:g}" for g, (b, lr) in resolved.items()))
    print(f"  learning rates per group (world size {world_size}, train.mode {cfg.train.mode}):")
    for line in describe_rates({g: lr for g, (_, lr) in resolved.items()}, batches, world_size, cfg.optimizer,
                               cfg.schedule):
        print(f"    {line}")
    print("parameters (global):")
    print(f"  dense (shared encoder, embeddings, decoders, mask token): {_m(dense)}")
    print(f"  experts (all layers, all experts):                       {_m(expert)}")
    print(f"  total:                                                   {_m(counts['model_total'])}")
    print(f"  active per token:                                        {_m(counts['model_active_per_token'])}")
    print(f"  encoder: total {_m(counts['encoder_total'])}, active {_m(counts['encoder_active_per_token'])}, "
          f"dense Swin equivalent {_m(counts['encoder_dense'])}")
    print(f"  built for one rank here: {_m(local_params)} (experts / {ep})")
    print(f"memory per GPU for model states ({prec}, ZeRO-{stage}, W={world_size}, E={ep}; "
          f"P_d={_m(dense)}, P_e={_m(expert)}; bytes/param: param {b_param}, grad {b_grad}, optimizer {b_opt}):")
    print(f"  params     (P_d + P_e/E) * {b_param}                                  = {_gib(mem.params_bytes)}")
    gd = ("W", "W/E") if stage >= 2 else ("1", "1")
    od = ("W", "W/E") if stage >= 1 else ("1", "1")
    print(f"  grads      P_d*{b_grad}/{gd[0]} + (P_e/E)*{b_grad}/({gd[1]})                       "
          f"= {_gib(mem.grads_bytes)}")
    print(f"  optimizer  P_d*{b_opt}/{od[0]} + (P_e/E)*{b_opt}/({od[1]})                     "
          f"= {_gib(mem.optimizer_bytes)}")
    print(f"  total model states                                          = {_gib(mem.total_bytes)} "
          f"(+ activations, buckets, CUDA context: measure with python -m msgfm.bench.train)")
    if plan is None:
        print(f"steps per epoch: {data_problem}")
        return 0
    per_group = plan.batches_per_epoch(cfg, world_size)
    passes = plan.passes_per_epoch(cfg, world_size)
    steps = max(per_group.values())
    print(f"steps per epoch ({cfg.data.epoch}): {steps} (batches per group per rank: {per_group}); "
          f"{cfg.schedule.epochs} epochs = {steps * cfg.schedule.epochs:,} steps")
    print("passes over each group's data per epoch: " + ", ".join(f"{g} {p:.3g}" for g, p in passes.items()))
    return 0


def _plan(cfg: RunConfig, data_root: Path) -> tuple[DataPlan | None, str]:
    """The data plan when the data is here and sound, else (None, why not)."""
    if not data_root.is_dir():
        return None, (f"data root {data_root} is missing here, not computed (pass --data-root to a copy of the "
                      f"data; the training run itself will stop on a missing path)")
    try:
        return plan_data(cfg, data_root), ""
    except DataValidationError as err:
        return None, f"not computed, the data under {data_root} has problems:\n{err}"
