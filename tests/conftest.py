"""Shared fixtures: a single-rank gloo process group for DeepSpeed-MoE, tiny configs."""
from __future__ import annotations

import os
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
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        import deepspeed

        from msgfm.train.runtime import skip_cpu_shm_comm_op

        skip_cpu_shm_comm_op()  # else DeepSpeed JIT-builds an op the tests never use (~40-100 s)
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    yield dist


@pytest.fixture
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real sample data not found at {REALDATA}")
    return REALDATA
