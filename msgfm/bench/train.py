"""Training throughput: samples/s per group and total, where the time goes, and MFU on GPU.

    python -m msgfm.bench.train                                  # CPU: demo_cpu, 1 process
    deepspeed --num_gpus 2 --module msgfm.bench.train                 # CPU: demo_cpu, 2 ranks, experts split
    deepspeed --num_gpus 8 --module msgfm.bench.train --config msgfm_swinb_192 --deepspeed_config ds_configs/v100x8.json

Without ``--data-root`` (or when it is missing) the benchmark writes synthetic shards of the
config's size to a temporary folder (msgfm.train.synthetic): it measures the engine, not disk.

Timing. Each group's step is split into data wait (next batch), augment (``device_batch``:
normalization, crops and flips on the device), forward, backward
(``engine.backward``) and optimizer step (``engine.step``); on GPU the device is synchronised
at each boundary (this benchmark only; training never does). Communication is DeepSpeed's
comms logger total (all-to-all of the MoE layers, gradient reductions); it overlaps the phases
above and is reported as their share, not added to them.

FLOPs and MFU. The FLOPs of one training step of each group are counted once with
``torch.utils.flop_counter.FlopCounterMode`` on the real engine (matmuls, convolutions,
attention; 2 FLOPs per multiply-add; forward and backward; MoE layers count the top-k experts a
token visits, i.e. the *active* FLOPs). For Swin-B/192 (window 6) the encoder's forward is about
11.3 GMACs = 22.6 GFLOP per image (Swin-B/224's 15.4 GMACs x 2304/3136 tokens), and a training
step is forward + backward = 3 x forward = ~68 GFLOP per image; the counter should agree to a
few percent (the decoders and embeddings add a little). MFU = counted FLOP/s / the device's
peak dense half-precision FLOP/s (table below, or ``--peak-tflops``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from msgfm.data.device_transforms import device_batch

# Peak dense fp16/bf16 tensor-core TFLOP/s by device-name fragment (vendor datasheets).
PEAK_TFLOPS = {"V100": 125.0, "A100": 312.0, "H100": 989.0, "H200": 989.0, "A10": 125.0, "L4": 121.0,
               "RTX 4090": 165.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--config", default="msgfm_swinb_192" if gpu else "demo_cpu")
    p.add_argument("--deepspeed_config", default=None, help="default: a100x8_bf16.json on GPU, cpu.json on CPU")
    p.add_argument("--data-root", default=None, help="shards to read (default: synthetic, written to a temp dir)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (one batch of every group each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: lookup)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1)
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    return p.parse_args(argv)


def _init_process_group(on_gpu: bool) -> None:
    import deepspeed

    from msgfm.train.run import share_cpu_threads, skip_cpu_shm_comm_op

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(29700 + os.getpid() % 200))):
        os.environ.setdefault(key, value)
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        skip_cpu_shm_comm_op()
        share_cpu_threads()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)


def _sync(on_gpu: bool) -> float:
    if on_gpu:
        torch.cuda.synchronize()
    return time.perf_counter()


def count_step_flops(trainer, step_batches) -> dict[str, float]:
    """Run one (untimed) training step, counting each group's forward + backward FLOPs on the real engine."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    engine = trainer.engine
    for group, batch in step_batches:
        images = device_batch(batch, trainer.device, trainer.dtype)["images"]
        with FlopCounterMode(display=False) as counter:
            out = engine(images, group)
            engine.backward(out["loss"])
        engine.step()
        flops[group] = float(counter.get_total_flops())
    return flops


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    repo = Path(__file__).resolve().parents[2]
    ds_path = Path(args.deepspeed_config or repo / "ds_configs" / ("a100x8_bf16.json" if on_gpu else "cpu.json"))
    _init_process_group(on_gpu)
    import deepspeed.comm as dist

    from msgfm.config import load_config
    from msgfm.train.ds_config import load_ds_config, precision, zero_stage
    from msgfm.train.run import build_trainer
    from msgfm.train.synthetic import write_synthetic_data

    world, rank = dist.get_world_size(), dist.get_rank()
    overrides = list(args.overrides)
    cfg = load_config(args.config, overrides)
    if cfg.model.moe.enabled and world % cfg.model.moe.expert_parallel_size:
        overrides.append(f"model.moe.expert_parallel_size={world}")  # e.g. the 2-rank demo config in 1 process
        print(f"note: model.moe.expert_parallel_size set to the world size {world} for this benchmark")
        cfg = load_config(args.config, overrides)
    ds_config = load_ds_config(ds_path)
    ds_config["train_micro_batch_size_per_gpu"] = max(int(g.batch_size_per_gpu) for g in cfg.data.groups)
    ds_config["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    tmp = tempfile.TemporaryDirectory(prefix="msgfm-bench-")
    data_root = Path(args.data_root) if args.data_root and Path(args.data_root).is_dir() else None
    if data_root is None:
        data_root = Path(tmp.name) / "data"
        per_group = (args.steps + args.warmup + 2) * max(int(g.batch_size_per_gpu) for g in cfg.data.groups) * world
        if rank == 0:
            write_synthetic_data(cfg, data_root, per_group)
        dist.barrier()
    trainer = build_trainer(cfg, ds_config, data_root, Path(tmp.name) / "out", tracking=False)
    engine = trainer.engine
    from deepspeed.comm.comm import comms_logger
    from deepspeed.comm.comm import timers as comm_timers

    batches = iter(trainer.data.train)

    def next_batches():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(trainer.data.train)
            return next(batches)

    flops = count_step_flops(trainer, next_batches())
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    samples: dict[str, int] = defaultdict(int)
    total_start = None
    for step in range(args.warmup + args.steps):
        timed = step >= args.warmup
        if step == args.warmup:
            for name in comm_timers.timers:  # DeepSpeed's per-op timers accumulate (ms) until reset
                comm_timers(name).reset()
            total_start = _sync(on_gpu)
        t0 = _sync(on_gpu)
        step_batches = next_batches()
        wait = _sync(on_gpu) - t0
        for i, (group, batch) in enumerate(step_batches):
            t_aug = _sync(on_gpu)
            batch = device_batch(batch, trainer.device, trainer.dtype)
            images, valid = batch["images"], batch["valid"]
            t0 = _sync(on_gpu)
            out = engine(images, group, valid=valid)
            t1 = _sync(on_gpu)
            engine.backward(out["loss"])
            t2 = _sync(on_gpu)
            engine.step()
            t3 = _sync(on_gpu)
            if timed:
                times[group]["data wait"] += wait / len(step_batches)
                times[group]["augment"] += t0 - t_aug
                times[group]["forward"] += t1 - t0
                times[group]["backward"] += t2 - t1
                times[group]["optimizer step"] += t3 - t2
                samples[group] += next(iter(images.values())).shape[0] * world
    total = _sync(on_gpu) - total_start
    comm_ms = sum(comm_timers(name).elapsed(reset=False) for name in comms_logger.comms_dict)
    if rank != 0:
        return 0
    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores, torch threads " \
                                                           f"{torch.get_num_threads()})"
    print(f"msgfm.bench.train: {cfg.name}, {world} rank(s) on {device}, {precision(ds_config)}, "
          f"ZeRO-{zero_stage(ds_config)}, expert parallel {cfg.model.moe.expert_parallel_size}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'group':<10} {'batch/rank':>10} {'samples/s':>10} {'wait':>7} {'augment':>7} {'fwd':>7} {'bwd':>7} "
          f"{'step':>7} {'GFLOP/img':>10}")
    for group, phases in times.items():
        spent = sum(phases.values())
        batch = samples[group] // (args.steps * world)
        pct = {k: 100 * v / spent for k, v in phases.items()}
        print(f"{group:<10} {batch:>10} {samples[group] / spent:>10.1f} {pct['data wait']:>6.1f}% "
              f"{pct['augment']:>6.1f}% {pct['forward']:>6.1f}% {pct['backward']:>6.1f}% "
              f"{pct['optimizer step']:>6.1f}% {flops[group] / batch / 1e9:>10.2f}")
    all_samples = sum(samples.values())
    print(f"total: {all_samples / total:.1f} samples/s over all groups ({total / args.steps:.3f} s per step); "
          f"communication (rank 0, overlapping the phases above): {comm_ms / 1e3:.2f} s = "
          f"{100 * comm_ms / 1e3 / total:.1f}% of the time")
    step_flops = sum(flops.values()) * world  # every rank runs the same step
    achieved = step_flops * args.steps / total
    if on_gpu:
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
        mfu = f"{100 * achieved / (peak * 1e12 * world):.1f}% of {peak:g} TFLOP/s per GPU" if peak else \
            "unknown peak: pass --peak-tflops"
        print(f"model FLOPs: {achieved / 1e12:.2f} TFLOP/s achieved, MFU {mfu}; peak memory "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    else:
        print(f"model FLOPs: {achieved / 1e9:.2f} GFLOP/s achieved (MFU is reported on GPU only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
