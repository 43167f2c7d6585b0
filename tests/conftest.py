"""Shared fixtures: a single-rank gloo process group for DeepSpeed-MoE, tiny configs."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REALDATA = REPO_ROOT.parent / "shared" / "realdata"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def single_rank_dist():
    """DeepSpeed MoE layers need torch.distributed even on one process: a 1-rank gloo group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        import deepspeed

        from msgfm.train.runtime import skip_cpu_shm_comm_op

        skip_cpu_shm_comm_op()  # else DeepSpeed JIT-builds an op the tests never use (~40-100 s)
        # rank, world size and a free port passed directly, not through RANK/MASTER_PORT: child processes
        # the tests start would inherit those and try to join this group's (busy) port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False,
                                   init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield dist


@pytest.fixture
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real sample data not found at {REALDATA}")
    return REALDATA
