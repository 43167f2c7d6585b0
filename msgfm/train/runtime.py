"""Process-level set-up every entry point shares: seeds, the process group, CPU threads, the run folder.

Nothing here knows about models or data; pretraining, fine-tuning, the benchmarks and
``msgfm doctor`` call these instead of repeating them.
"""
from __future__ import annotations

import math
import os
import random
import socket
import subprocess
from pathlib import Path
from typing import Any

import deepspeed
import deepspeed.comm as dist
import deepspeed.ops
import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) alike."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def skip_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op at process-group start.

    Training never uses it (it serves ``inference_all_reduce``), the first build costs ~40 s of a
    2-core machine, and concurrent builds into the shared torch_extensions cache wait on each
    other's lock file. DeepSpeed caches the op table in ``deepspeed.ops``, so the entry sticks.
    """
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def share_cpu_threads() -> None:
    """CPU ranks on one machine split its cores (torch would give each rank all of them), unless
    OMP_NUM_THREADS says otherwise."""
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if "OMP_NUM_THREADS" not in os.environ and local_ranks > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def init_process_group(on_gpu: bool) -> tuple[int, int]:
    """Start DeepSpeed's process group (nccl on GPU, gloo on CPU); returns (rank, world size).

    Under the deepspeed launcher or torchrun the environment names the ranks; a plain
    ``python launchers/...`` run becomes a one-process group (DeepSpeed would otherwise try
    MPI discovery and fail without mpi4py).
    """
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        skip_cpu_shm_comm_op()
        share_cpu_threads()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size()


# What a launcher sets for its ranks: a child that is its own one-process job must not inherit them.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")


def own_job_environment(**extra: str) -> dict[str, str]:
    """The environment minus the launcher's rank variables (plus ``extra``), for a child
    process that starts its own process group (it then picks a free port of its own)."""
    return {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}, **extra}


def git_commit() -> str:
    """The commit of the msgfm source tree in use, or "unknown"."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def engine_dtype(engine: Any) -> torch.dtype | None:
    """The half-precision dtype a DeepSpeed engine trains in (inputs are cast to it), or None for fp32."""
    if engine.fp16_enabled():
        return torch.half
    return torch.bfloat16 if engine.bfloat16_enabled() else None


def device_name() -> str:
    """What the ranks run on, for logs and tracking tags."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def hms(seconds: float) -> str:
    """Seconds as H:MM:SS ("?" when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
