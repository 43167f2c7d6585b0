"""Training throughput: samples/s per group and total, where the time goes, and MFU on GPU.

    python -m msgfm.bench.train                                  # CPU: demo_cpu, 1 process
    deepspeed --num_gpus 2 --module msgfm.bench.train                 # CPU: demo_cpu, 2 ranks, experts split
    deepspeed --num_gpus 8 --module msgfm.bench.train --config msgfm_swinb_192 --deepspeed_config ds_configs/v100x8.json
    python -m msgfm.bench.train --json runs/bench.json kernels.attention=sdpa    # also write the numbers

Without ``--data-root`` (or when it is missing) the benchmark writes synthetic shards of the
config's size to a temporary folder (msgfm.data.synthetic): it measures the engine, not disk.
``--synthetic-samples`` caps how many (the loaders start over when they run out).

Timing. Each group's step is split into data wait (next batch), augment (``device_batch``:
normalization, crops and flips on the device), forward, backward
(``engine.backward``) and optimizer step (``engine.step``); on GPU the device is synchronised
at each boundary (this benchmark only; training never does). Communication is DeepSpeed's
comms logger total (all-to-all of the MoE layers, gradient reductions); it overlaps the phases
above and is reported as their share, not added to them.

FLOPs and MFU. The FLOPs of one training step of each group are counted once with
``torch.utils.flop_counter.FlopCounterMode`` on the real engine (matmuls, convolutions,
attention; 2 FLOPs per multiply-add; forward and backward; MoE layers count the top-k experts a
token visits, i.e. the *active* FLOPs). The counting step runs attention through the ``eager``
path, whose matmuls the counter sees (it cannot see inside the fused CUDA kernels), so every
attention implementation is credited with the same model FLOPs. For Swin-B/192 (window 6) the
encoder's forward is about 11.3 GMACs = 22.6 GFLOP per image (Swin-B/224's 15.4 GMACs x
2304/3136 tokens), and a training step is forward + backward = 3 x forward = ~68 GFLOP per
image; the counter should agree to a few percent (the decoders and embeddings add a little).
MFU = counted FLOP/s / the device's peak dense FLOP/s in the run's precision (table below,
or ``--peak-tflops``).

Numerics. The loss of every group step (warm-up included) and, in fp16, the loss scale after
every optimizer step are recorded, with the steps DeepSpeed skipped on overflow: two runs that
differ only in ``kernels.attention`` start from the same weights and data, so their first
losses can be compared (msgfm.bench.gpu_check does).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import deepspeed.comm as dist
import torch

from msgfm.config import KernelsConfig, load_config
from msgfm.data.plan import plan_data
from msgfm.data.synthetic import write_synthetic_data
from msgfm.ops import resolve_attention_impl, resolve_window_process_impl
from msgfm.train.ds_config import load_ds_config, precision, zero_stage
from msgfm.train.pretrain import build_trainer
from msgfm.train.runtime import init_process_group

# Peak dense tensor-core TFLOP/s per precision, by device-name fragment (vendor datasheets; no
# sparsity). First match wins, so the specific names come before the families. V100 has no bf16.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"fp16": 756.0, "bf16": 756.0}),
    ("H100 NVL", {"fp16": 835.0, "bf16": 835.0}),
    ("H200 NVL", {"fp16": 835.0, "bf16": 835.0}),
    ("H100", {"fp16": 989.0, "bf16": 989.0}),
    ("H200", {"fp16": 989.0, "bf16": 989.0}),
    ("A100", {"fp16": 312.0, "bf16": 312.0}),
    ("V100", {"fp16": 125.0}),
    ("A10", {"fp16": 125.0, "bf16": 125.0}),
    ("L4", {"fp16": 121.0, "bf16": 121.0}),
    ("RTX 4090", {"fp16": 165.0, "bf16": 165.0}),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of ``device_name`` in ``precision`` (fp16/bf16; fp32 runs are held to the
    16-bit peak, the rate the hardware offers), or None if the device is not in the table."""
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in device_name:
            return peaks.get(precision if precision in ("fp16", "bf16") else "fp16")
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--config", default="msgfm_swinb_192" if gpu else "demo_cpu")
    p.add_argument("--deepspeed_config", default=None, help="default: a100x8_bf16.json on GPU, cpu.json on CPU")
    p.add_argument("--data-root", default=None, help="shards to read (default: synthetic, written to a temp dir)")
    p.add_argument("--synthetic-samples", type=int, default=None,
                   help="samples per group of the synthetic data (default: enough for every step)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (one batch of every group each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: lookup)")
    p.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1)
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    return p.parse_args(argv)


def _sync(on_gpu: bool) -> float:
    if on_gpu:
        torch.cuda.synchronize()
    return time.perf_counter()


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run attention and window process through plain torch ops (what FlopCounterMode can count)."""
    saved: dict[Any, Any] = {}
    module: Any  # swapping a dataclass attribute of an nn.Module, which mypy types as Tensor | Module
    for module in model.modules():
        kernels = getattr(module, "kernels", None)
        if isinstance(kernels, KernelsConfig):
            saved[module] = kernels
            module.kernels = dataclasses.replace(kernels, attention="eager", window_process="torch")
    try:
        yield
    finally:
        for module, kernels in saved.items():
            module.kernels = kernels


def loss_scale(engine: Any) -> float | None:
    """The fp16 dynamic loss scale in force (None without loss scaling)."""
    if not engine.fp16_enabled():
        return None
    optimizer = engine.optimizer
    scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
    return float(scale) if isinstance(scale, (int, float)) else None


class StepLog:
    """Per group step: the loss, and the loss scale and overflow skips after ``engine.step()``."""

    def __init__(self) -> None:
        self.losses: list[dict[str, float]] = []  # one dict (group -> loss) per outer step
        self.loss_scales: list[float] = []
        self.overflow_steps: list[int] = []  # indices of optimizer steps DeepSpeed skipped
        self.optimizer_steps = 0

    def record(self, engine: Any, outer_step: int, group: str, loss: torch.Tensor, skipped_before: int) -> None:
        while len(self.losses) <= outer_step:
            self.losses.append({})
        self.losses[outer_step][group] = float(loss.detach().float().item())
        scale = loss_scale(engine)
        if scale is not None:
            self.loss_scales.append(scale)
        if engine.skipped_steps > skipped_before:
            self.overflow_steps.append(self.optimizer_steps)
        self.optimizer_steps += 1


def count_step_flops(trainer: Any, step_batches: list[tuple[str, dict]], log: StepLog) -> dict[str, float]:
    """Run one (untimed) training step, counting each group's forward + backward FLOPs on the real
    engine with eager attention (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    engine, task = trainer.engine, trainer.task
    with eager_attention(engine.module):
        for group, batch in step_batches:
            inputs = task.prepare(batch, group, trainer.device, trainer.dtype)
            with FlopCounterMode(display=False) as counter:
                out = engine(inputs, group)
                engine.backward(out["loss"])
            skipped = engine.skipped_steps
            engine.step()
            log.record(engine, 0, group, out["loss"], skipped)
            flops[group] = float(counter.get_total_flops())
    return flops


def run_benchmark(args: argparse.Namespace) -> dict[str, Any] | None:
    """Build the engine, count FLOPs, time the steps; rank 0 returns every number, other ranks None."""
    on_gpu = torch.cuda.is_available()
    repo = Path(__file__).resolve().parents[2]
    ds_path = Path(args.deepspeed_config or repo / "ds_configs" / ("a100x8_bf16.json" if on_gpu else "cpu.json"))
    init_process_group(on_gpu)  # a plain `python -m msgfm.bench.train` is a one-process group
    world, rank = dist.get_world_size(), dist.get_rank()
    # every group in every step: the benchmark times each group's forward, backward and step (it measures
    # costs per group, not the epoch layout); the user's overrides still win
    overrides = ["data.epoch=largest_group_once", *args.overrides]
    cfg = load_config(args.config, overrides)
    if cfg.model.moe.enabled and world % cfg.model.moe.expert_parallel_size:
        overrides.append(f"model.moe.expert_parallel_size={world}")  # e.g. the 2-rank demo config in 1 process
        print(f"note: model.moe.expert_parallel_size set to the world size {world} for this benchmark")
        cfg = load_config(args.config, overrides)
    ds_config = load_ds_config(ds_path)
    largest = max(int(g.batch_size_per_gpu) for g in cfg.data.groups)
    ds_config["train_micro_batch_size_per_gpu"] = largest
    ds_config["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    tmp = tempfile.TemporaryDirectory(prefix="msgfm-bench-")
    data_root = Path(args.data_root) if args.data_root and Path(args.data_root).is_dir() else None
    if data_root is None:
        data_root = Path(tmp.name) / "data"
        per_group = args.synthetic_samples or (args.steps + args.warmup + 2) * largest * world
        if rank == 0:
            write_synthetic_data(cfg, data_root, per_group)
        dist.barrier()
    trainer = build_trainer(cfg, ds_config, plan_data(cfg, data_root), Path(tmp.name) / "out", tracking=False)
    engine = trainer.engine
    from deepspeed.comm.comm import comms_logger
    from deepspeed.comm.comm import timers as comm_timers

    batches = iter(trainer.data)

    def next_batches() -> list[tuple[str, dict]]:
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(trainer.data)
            return next(batches)

    log = StepLog()
    flops = count_step_flops(trainer, next_batches(), log)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    samples: dict[str, int] = defaultdict(int)
    total_start = time.perf_counter()
    for step in range(args.warmup + args.steps):
        timed = step >= args.warmup
        if step == args.warmup:
            for name in comm_timers.timers:  # DeepSpeed's per-op timers accumulate (ms) until reset
                comm_timers(name).reset()
            total_start = _sync(on_gpu)
        t0 = _sync(on_gpu)
        step_batches = next_batches()
        wait = _sync(on_gpu) - t0
        for group, batch in step_batches:
            t_aug = _sync(on_gpu)
            inputs = trainer.task.prepare(batch, group, trainer.device, trainer.dtype)  # device_batch inside
            t0 = _sync(on_gpu)
            out = engine(inputs, group)
            t1 = _sync(on_gpu)
            engine.backward(out["loss"])
            t2 = _sync(on_gpu)
            skipped = engine.skipped_steps
            engine.step()
            t3 = _sync(on_gpu)
            log.record(engine, step + 1, group, out["loss"], skipped)
            if timed:
                times[group]["data wait"] += wait / len(step_batches)
                times[group]["augment"] += t0 - t_aug
                times[group]["forward"] += t1 - t0
                times[group]["backward"] += t2 - t1
                times[group]["optimizer step"] += t3 - t2
                samples[group] += next(iter(inputs["images"].values())).shape[0] * world
    total = _sync(on_gpu) - total_start
    comm_ms = sum(comm_timers(name).elapsed(reset=False) for name in comms_logger.comms_dict)
    if rank != 0:
        return None
    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores, torch threads " \
                                                           f"{torch.get_num_threads()})"
    prec = precision(ds_config)
    groups = {}
    for group, phases in times.items():
        spent = sum(phases.values())
        batch = samples[group] // (args.steps * world)
        groups[group] = {"batch_per_rank": batch, "samples_per_s": samples[group] / spent,
                         "phase_pct": {k: 100 * v / spent for k, v in phases.items()},
                         "gflop_per_image": flops[group] / batch / 1e9}
    step_flops = sum(flops.values()) * world  # every rank runs the same step
    achieved = step_flops * args.steps / total
    peak = args.peak_tflops or (peak_tflops(device, prec) if on_gpu else None)
    totals = [sum(step.values()) for step in log.losses]
    return {
        "config": cfg.name, "world_size": world, "device": device, "precision": prec,
        "ds_config": str(ds_path), "zero_stage": zero_stage(ds_config),
        "expert_parallel_size": cfg.model.moe.expert_parallel_size if cfg.model.moe.enabled else None,
        "attention": resolve_attention_impl(cfg.kernels.attention, trainer.device),
        "window_process": resolve_window_process_impl(cfg.kernels.window_process, trainer.device),
        "steps": args.steps, "warmup": args.warmup, "groups": groups,
        "samples_per_s": sum(samples.values()) / total, "s_per_step": total / args.steps,
        "comm_s": comm_ms / 1e3, "comm_pct": 100 * comm_ms / 1e3 / total,
        "step_tflop": step_flops / 1e12, "achieved_tflops": achieved / 1e12, "peak_tflops": peak,
        "mfu_pct": 100 * achieved / (peak * 1e12 * world) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "losses": log.losses, "total_loss": totals, "finite": all(math.isfinite(v) for v in totals),
        "loss_scale_history": log.loss_scales, "overflow_steps": log.overflow_steps,
        "optimizer_steps": log.optimizer_steps, "skipped_steps": int(engine.skipped_steps),
    }


def print_report(r: dict[str, Any]) -> None:
    """The benchmark's table: per group, then totals, FLOPs, MFU, memory and loss scaling."""
    print(f"msgfm.bench.train: {r['config']}, {r['world_size']} rank(s) on {r['device']}, {r['precision']}, "
          f"ZeRO-{r['zero_stage']}, expert parallel {r['expert_parallel_size']}, attention {r['attention']}, "
          f"window process {r['window_process']}, {r['steps']} timed steps after {r['warmup']} warm-up")
    print(f"{'group':<10} {'batch/rank':>10} {'samples/s':>10} {'wait':>7} {'augment':>7} {'fwd':>7} {'bwd':>7} "
          f"{'step':>7} {'GFLOP/img':>10}")
    for group, g in r["groups"].items():
        pct = g["phase_pct"]
        print(f"{group:<10} {g['batch_per_rank']:>10} {g['samples_per_s']:>10.1f} {pct['data wait']:>6.1f}% "
              f"{pct['augment']:>6.1f}% {pct['forward']:>6.1f}% {pct['backward']:>6.1f}% "
              f"{pct['optimizer step']:>6.1f}% {g['gflop_per_image']:>10.2f}")
    print(f"total: {r['samples_per_s']:.1f} samples/s over all groups ({r['s_per_step']:.3f} s per step); "
          f"communication (rank 0, overlapping the phases above): {r['comm_s']:.2f} s = {r['comm_pct']:.1f}% of "
          f"the time")
    if r["peak_memory_gib"] is None:
        print(f"model FLOPs: {r['achieved_tflops'] * 1e3:.2f} GFLOP/s achieved (MFU is reported on GPU only)")
    else:
        mfu = f"{r['mfu_pct']:.1f}% of {r['peak_tflops']:g} TFLOP/s per GPU" if r["mfu_pct"] is not None else \
            "unknown peak: pass --peak-tflops"
        print(f"model FLOPs: {r['achieved_tflops']:.2f} TFLOP/s achieved, MFU {mfu}; peak memory "
              f"{r['peak_memory_gib']:.2f} GiB")
    if r["loss_scale_history"]:
        scales = r["loss_scale_history"]
        print(f"loss scale: {scales[0]:g} -> {scales[-1]:g}; {len(r['overflow_steps'])} of {r['optimizer_steps']} "
              f"optimizer steps skipped on overflow {r['overflow_steps'][:20]}")
    print(f"loss (sum of groups) per step: {' '.join(f'{v:.4f}' for v in r['total_loss'][:8])}"
          f"{' ...' if len(r['total_loss']) > 8 else ''}; all finite: {r['finite']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run_benchmark(args)
    if result is None:
        return 0
    print_report(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
