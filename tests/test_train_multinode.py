"""Two nodes of one rank each, through torchrun's multi-node mode on this machine.

Two torchrun processes on 127.0.0.1 (``--nnodes 2 --node_rank 0/1``, a static master address
and port), so rank 1 runs as LOCAL_RANK 0 of node 1: global and node-local ranks differ, as on
a real cluster. The output folder is shared by both "nodes" (on a cluster: a shared
filesystem, docs/training.md). Runs of the tiny config, 8 steps, a checkpoint every 4:
  A  uninterrupted;
  B  the same, its node-1 rank SIGKILLed once a checkpoint is published;
  C  B relaunched on both nodes: resumes and finishes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train_distributed import free_port, losses
from test_train_support import REPO, write_tiny_run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
STEPS = 8


def launch_nodes(folder: Path, out: Path, log_name: str) -> list[subprocess.Popen]:
    """Node 0 and node 1 of one job, each its own torchrun (its own process group and log)."""
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    nodes = []
    for node in (0, 1):
        cmd = [TORCHRUN, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr",
               "127.0.0.1", "--master_port", str(port), "launchers/pretrain.py", "--deepspeed_config",
               str(folder / "ds_tiny.json"), "--config", str(folder / "tiny.yaml"), "--output-dir", str(out),
               f"train.max_steps={STEPS}"]
        log = open(folder / f"{log_name}.node{node}.log", "w")
        nodes.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))
    return nodes


def worker(agent: subprocess.Popen) -> Any:
    import psutil

    for child in psutil.Process(agent.pid).children(recursive=True):
        try:
            if "launchers/pretrain.py" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def stop(nodes: list[subprocess.Popen], timeout: float) -> None:
    """Wait for both agents; one still running after ``timeout`` (waiting on a dead peer) is killed."""
    deadline = time.time() + timeout
    for proc in nodes:
        try:
            proc.wait(max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    folder = write_tiny_run(tmp_path_factory.mktemp("nodes"), samples_per_group=40)
    a, b = folder / "run_a", folder / "run_b"
    nodes_a = launch_nodes(folder, a, "a")
    nodes_b = launch_nodes(folder, b, "b")
    killed = None
    deadline = time.time() + 400
    while time.time() < deadline and nodes_b[1].poll() is None:
        if (b / "checkpoints" / "latest").is_file() and (rank1 := worker(nodes_b[1])) is not None:
            env = rank1.environ()
            killed = {"after": (b / "checkpoints" / "latest").read_text().strip(),
                      "RANK": env.get("RANK"), "LOCAL_RANK": env.get("LOCAL_RANK"), "GROUP_RANK": env.get("GROUP_RANK")}
            rank1.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    assert killed is not None, (folder / "b.node1.log").read_text()[-3000:]
    stop(nodes_b, 120)
    stop(nodes_a, 400)
    logs = {p.name: p.read_text() for p in folder.glob("*.log")}
    assert [p.returncode for p in nodes_a] == [0, 0], logs["a.node0.log"][-3000:] + logs["a.node1.log"][-3000:]
    assert nodes_b[1].returncode != 0, "node 1's agent must report its killed rank"
    nodes_c = launch_nodes(folder, b, "c")
    stop(nodes_c, 400)
    logs = {p.name: p.read_text() for p in folder.glob("*.log")}
    assert [p.returncode for p in nodes_c] == [0, 0], logs["c.node0.log"][-3000:] + logs["c.node1.log"][-3000:]
    return {"folder": folder, "a": a, "b": b, "killed": killed, "logs": logs}


def test_rank_and_local_rank_differ_on_the_second_node(runs):
    assert runs["killed"]["RANK"] == "1" and runs["killed"]["LOCAL_RANK"] == "0"
    assert runs["killed"]["GROUP_RANK"] == "1"  # torchrun's node rank
    assert "2 rank(s)" in runs["logs"]["a.node0.log"]


def test_two_node_run_trains_and_writes_complete_checkpoints(runs):
    from msgfm.train import checkpoint as ckpt

    loss = losses(runs["a"])
    assert sorted(loss) == list(range(1, STEPS + 1))
    root = runs["a"] / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step00000004", "step00000008"]
    meta = json.loads((root / "step00000008" / "COMPLETE").read_text())
    assert meta["world_size"] == 2
    files = meta["files"]
    # each node's rank wrote its own ZeRO partition and rank state, named by the global rank; rank 0 the rest
    assert files["zero_pp_rank_1_mp_rank_00_optim_states.pt"]["rank"] == 1
    assert files[ckpt.rank_file(1)]["rank"] == 1 and files[ckpt.rank_file(0)]["rank"] == 0
    assert files["mp_rank_00_model_states.pt"]["rank"] == 0
    assert ckpt.verify(root / "step00000008").ok
    state = torch.load(root / "step00000008" / ckpt.rank_file(1), weights_only=False)
    assert state["step"] == STEPS and state["data"]["step"] == STEPS


def test_killed_node_resumes_bit_exactly(runs):
    log = runs["logs"]["c.node0.log"]
    assert f"resumed from {runs['b'] / 'checkpoints'}" in log and "Traceback" not in log
    resumed_at = int(log.split("resumed from")[1].split("at step ")[1].split()[0])
    assert resumed_at >= 4 and resumed_at < STEPS, "the kill came too late to test anything"
    a, b = losses(runs["a"]), losses(runs["b"])
    assert sorted(b) == list(range(1, STEPS + 1))  # every step logged once
    for step in range(resumed_at + 1, STEPS + 1):
        assert b[step] == a[step], f"step {step}: resumed {b[step]} != uninterrupted {a[step]}"
    assert not (runs["b"] / "config_changes.jsonl").exists()  # the same config: nothing to record


def test_final_weights_equal_the_uninterrupted_run(runs):
    from msgfm.train.checkpoint import load_model_state_dict

    a = load_model_state_dict(runs["a"] / "checkpoints" / "step00000008")
    b = load_model_state_dict(runs["b"] / "checkpoints" / "step00000008")
    assert sorted(a) == sorted(b) and any(".deepspeed_experts." in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
