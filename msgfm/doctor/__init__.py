"""``msgfm doctor``: the preflight to run before spending a night on GPUs.

Prints one table (check, status, result, what to do) and exits 1 if any check failed:

- torch, its CUDA runtime and the NVIDIA driver; each GPU's name, compute capability and
  memory; whether this torch build has code for it; fp16 and real (not emulated) bf16;
- the fused kernels: load the ahead-of-time build or JIT-build for this GPU's architecture
  only, then a forward + backward parity check against float64 on fresh random inputs;
- DeepSpeed >= 0.19.4 and whether its FusedAdam loads (or builds) and steps;
- with ``--data-root``: every group's shards and statistics, and one batch per group read
  and augmented (host samples/s per loader worker);
- under the deepspeed launcher or torchrun (WORLD_SIZE > 1): all-reduce bandwidth, the
  all-to-all of one MoE dispatch at the config's shape, in GB/s, and that every rank sees
  the same config and data.

Without a GPU the GPU rows say "skipped: no CUDA device" and the rest still runs.

    msgfm doctor --data-root data                       # one process
    torchrun --nproc_per_node 8 -m msgfm.cli doctor --data-root data --deepspeed_config ds_configs/v100x8.json
    deepspeed --num_gpus 8 --no_local_rank --module msgfm.doctor --data-root data
    python -m msgfm.doctor ...                          # the same without the other msgfm commands
"""
from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msgfm.doctor.report import FAIL, Check, failures, format_table, skipped, write_json
from msgfm.errors import UserError, user_message

__all__ = ["Check", "add_parser", "diagnose", "main", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``msgfm doctor``."""
    p = subparsers.add_parser("doctor", help="check this machine before training: torch, CUDA, GPUs, kernels, "
                              "DeepSpeed, data, ranks", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="msgfm_swinb_192", help="config name or YAML path (default: %(default)s)")
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder holding the config's shard folders: check shards, stats and reading speed")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None, metavar="JSON",
                   help="check this ds_config's precision against the GPUs (and compare it across ranks)")
    p.add_argument("--no-kernels", action="store_true", help="skip the fused-kernel build and parity check")
    p.add_argument("--comm-mib", type=float, default=None,
                   help="all-reduce buffer size for the multi-rank check (default: 256 on GPU, 16 on CPU)")
    p.add_argument("--json", type=Path, default=None, help="also write every row and its numbers to this file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    p.set_defaults(func=run)


def _progress(rank: int, text: str) -> None:
    if rank == 0:
        print(f"doctor: {text}", file=sys.stderr, flush=True)


def diagnose(config: str, overrides: Sequence[str] = (), data_root: Path | None = None,
             ds_config_path: str | None = None, kernels: bool = True,
             comm_mib: float | None = None) -> tuple[list[Check], bool, dict[str, Any]]:
    """Run every check; returns (rows for this rank to show, whether any rank failed, metadata).

    Raises ValueError (one line) for bad input: an unknown config, a missing data root or ds_config."""
    import torch

    from msgfm.config import load_config
    from msgfm.doctor import data, distributed, system
    from msgfm.doctor.kernels import kernel_checks

    cfg = load_config(config, list(overrides))
    if data_root is not None and not Path(data_root).is_dir():
        globs = ", ".join(g for group in cfg.data.groups for g in group.shards)
        raise UserError(f"--data-root {data_root} is not a folder; pass the folder that holds the shards of "
                        f"config {cfg.name} ({globs}), e.g. one made by `msgfm prepare-sample DIR`")
    ds_config = None
    if ds_config_path is not None:
        from msgfm.train.ds_config import load_ds_config

        ds_config = load_ds_config(ds_config_path)
    on_gpu = torch.cuda.is_available()
    world = distributed.launched_world_size()
    rank = 0
    if world > 1:
        from msgfm.train.runtime import init_process_group

        rank, world = init_process_group(on_gpu)  # also picks this rank's GPU (LOCAL_RANK)
    _progress(rank, f"checking torch, CUDA and the GPUs ({world} rank(s))")
    checks = [system.torch_check(), system.driver_check(), *system.gpu_checks(), system.cuda_toolkit_check()]
    if ds_config is not None and ds_config_path is not None:
        checks.append(system.ds_config_check(ds_config_path, ds_config))
    checks += kernel_checks(progress=rank == 0) if kernels else [skipped("fused kernels", "skipped: --no-kernels")]
    _progress(rank, "checking DeepSpeed (FusedAdam builds on first use on a GPU)")
    checks += system.deepspeed_checks()
    _progress(rank, "checking the data" if data_root else "no --data-root: data checks skipped")
    data_rows, data_print = data.data_checks(cfg, Path(data_root) if data_root else None)
    checks += data_rows
    any_failed = bool(failures(checks))
    if world > 1:
        _progress(rank, "measuring all-reduce and the MoE all-to-all")
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        dtype = _comm_dtype(ds_config, on_gpu)
        nbytes = int((comm_mib or (256 if on_gpu else 16)) * 2**20)
        iters = 20 if on_gpu else 5
        checks.append(distributed.allreduce_check(nbytes, dtype, device, iters))
        checks.append(distributed.alltoall_check(cfg, dtype, device, iters))
        checks += distributed.agreement_checks({"config": data.fingerprint(cfg.to_dict()), "data": data_print,
                                                "ds_config": data.fingerprint(ds_config) if ds_config else None})
        others, any_failed = distributed.gather_rank_rows(checks, rank)
        checks += others
    meta = {"config": cfg.name, "world_size": world, "rank": rank, "host": socket.gethostname(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "data_root": str(data_root) if data_root else None}
    return checks, any_failed, meta


def _comm_dtype(ds_config: dict[str, Any] | None, on_gpu: bool) -> Any:
    """What the collectives carry in training: half precision on GPUs, fp32 on CPU ranks."""
    import torch

    from msgfm.train.ds_config import precision

    if not on_gpu:
        return torch.float32
    if ds_config:
        prec = precision(ds_config)
    else:
        from msgfm.doctor.system import bf16_native

        prec = "bf16" if bf16_native(torch.cuda.current_device()) else "fp16"
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(prec, torch.float32)


def run(args: argparse.Namespace) -> int:
    """``msgfm doctor``: print the table (rank 0), optionally write JSON; 1 if any check failed."""
    checks, any_failed, meta = diagnose(args.config, args.overrides, args.data_root, args.deepspeed_config,
                                        kernels=not args.no_kernels, comm_mib=args.comm_mib)
    if meta["rank"] == 0:
        print(format_table(checks), flush=True)
        if args.json is not None:
            write_json(checks, args.json, meta)
    if meta["world_size"] > 1:  # the group diagnose() opened under the launcher (never a caller's own)
        _leave_process_group()
    return 1 if any_failed or any(c.status == FAIL for c in checks) else 0


def _leave_process_group() -> None:
    """Under a launcher: wait for every rank, then close the process group. A rank that exits with its gloo
    group still open can abort in the group's threads ("terminate called without an active exception",
    exit -6), which the launcher reports as a failed doctor."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m msgfm.doctor [options]``: the same as ``msgfm doctor``, without importing the other
    commands (the converters need rasterio, which a bare GPU machine may lack)."""
    parser = argparse.ArgumentParser(prog="msgfm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["doctor", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except Exception as err:  # user errors: one line, as in msgfm.cli; bugs keep their traceback
        message = user_message(err)
        if message is None:
            raise
        print(f"msgfm doctor: error: {message}", file=sys.stderr)
        return 2
