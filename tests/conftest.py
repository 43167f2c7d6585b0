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


@pytest.fixture(scope="session")
def tiny_pretrained_run(tmp_path_factory, single_rank_dist) -> Path:
    """A tiny MoE pretraining run folder (4 experts, 32 px) whose newest checkpoint, in DeepSpeed's layout
    with expert files and msgfm's manifest, holds weights perturbed away from their initial values (every
    LayerNorm differs from ones/zeros, so swapping two of them changes the outputs). Shared by the export tests."""
    from test_train_support import write_tiny_run

    from msgfm.config import load_config
    from msgfm.data.plan import plan_data
    from msgfm.train.ds_config import load_ds_config
    from msgfm.train.pretrain import build_trainer

    folder = write_tiny_run(tmp_path_factory.mktemp("tiny_pretrained"), samples_per_group=12)
    cfg = load_config(folder / "tiny.yaml", ["model.moe.expert_parallel_size=1", "train.max_steps=1",
                                             "train.checkpoint_interval=1"])
    trainer = build_trainer(cfg, load_ds_config(folder / "ds_tiny.json"), plan_data(cfg, folder / "data"),
                            folder / "run", tracking=False)
    trainer.fit()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in trainer.engine.module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    trainer.step += 1
    trainer.save()
    return folder / "run"
