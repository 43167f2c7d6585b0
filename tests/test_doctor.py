"""`msgfm doctor` on the CPU: the table, the data checks, one-line errors, the GPU decisions
driven with simulated GPUs (a V100 under a CUDA 13 torch), the kernel parity check driven by
a torch model of the extension, and 2 gloo ranks (all-reduce, MoE all-to-all, agreement)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_ops_fused_glue import FAKE_EXTENSION
from test_train_support import REPO, write_tiny_run

from msgfm import cli
from msgfm.doctor import diagnose, system
from msgfm.doctor.report import FAIL, OK, SKIP, WARN, Check, format_table

CUDA13_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
CUDA126_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("doctor"), samples_per_group=12)


def rows_by_name(path: Path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(path.read_text())["checks"]}


def test_cpu_machine_skips_the_gpu_rows_and_passes(capsys):
    assert "doctor" in cli.COMMANDS
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for row in ("NVIDIA driver", "GPUs", "fused kernels: build", "fused kernels: parity", "DeepSpeed FusedAdam"):
        line = next(line for line in out.splitlines() if line.startswith(row))
        assert "| skip" in line and "skipped: no CUDA device" in line, line
    assert "all checks passed" in out and "DeepSpeed " in out


def test_data_root_rows_time_every_group(tiny, tmp_path, capsys):
    report = tmp_path / "doctor.json"
    assert cli.main(["doctor", "--config", str(tiny / "tiny.yaml"), "--data-root", str(tiny / "data"),
                     "--deepspeed_config", str(tiny / "ds_tiny.json"), "--json", str(report)]) == 0
    rows = rows_by_name(report)
    assert rows["data: shards and stats"]["status"] == OK
    for group, batch in (("rgb", 4), ("sen12ms", 2), ("mdas", 2)):
        row = rows[f"data: group {group}"]
        assert row["status"] == OK and row["data"]["batch"] == batch and row["data"]["samples"] == 12
        assert row["data"]["samples_per_s_per_worker"] > 0
    assert rows["ds_config ds_tiny.json"]["status"] == OK
    assert "samples/s per worker" in capsys.readouterr().out


def test_missing_stats_fail_with_the_group_and_the_command(tiny, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    (data / "sen12ms" / "stats.json").unlink()
    assert cli.main(["doctor", "--config", str(tiny / "tiny.yaml"), "--data-root", str(data)]) == 1
    out = capsys.readouterr().out
    assert "data: shards and stats" in out and "| FAIL" in out
    assert "group 'sen12ms'" in out and "msgfm stats" in out and "1 check(s) failed" in out


def test_bad_input_is_one_line_without_a_traceback(tmp_path, capsys):
    assert cli.main(["doctor", "--data-root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--data-root" in err and "nowhere" in err and "msgfm prepare-sample" in err
    assert cli.main(["doctor", "--deepspeed_config", str(tmp_path / "none.json")]) == 2
    assert "none.json does not exist" in capsys.readouterr().err


def test_module_entry_point_needs_no_converter_dependencies(tmp_path):
    """python -m msgfm.doctor (what the GPU check runs) works where rasterio and mlflow are missing."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("rasterio", "mlflow"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is blocked for this test')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "msgfm.doctor", "--json", str(tmp_path / "d.json")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert rows_by_name(tmp_path / "d.json")["DeepSpeed"]["status"] == OK


@pytest.mark.parametrize("capability,archs,status,arch", [
    ((9, 0), CUDA13_ARCHS, OK, "sm_90"),          # H100 / H200
    ((8, 6), ["sm_80"], OK, "sm_80"),             # same major, newer minor: machine code runs
    ((9, 0), ["sm_90a"], OK, "sm_90a"),           # arch-specific code, exactly this GPU
    ((8, 9), ["sm_90a", "compute_80"], OK, "compute_80"),  # only PTX of an older arch
    ((7, 0), CUDA126_ARCHS, OK, "sm_70"),         # V100 under a CUDA 12.6 torch
    ((8, 0), ["sm_90"], FAIL, None),
])
def test_which_code_of_this_torch_build_runs_on_a_gpu(capability, archs, status, arch):
    row = system.arch_support_check("GPU", capability, archs, "2.11.0", "13.0")
    assert row.status == status
    assert system.code_for_capability(capability, archs) == arch


def test_v100_under_a_cuda13_torch_is_told_to_install_a_cuda12_build():
    row = system.arch_support_check("Tesla V100-SXM2-32GB", (7, 0), CUDA13_ARCHS, "2.11.0+cu130", "13.0")
    assert row.status == FAIL and "sm_70" in row.result and "CUDA 12.x" in row.todo and "README" in row.todo
    other = system.arch_support_check("A100", (8, 0), ["sm_90"], "2.11.0", "13.0")
    assert "CUDA 12.x" not in other.todo and "sm_80" in other.todo


@pytest.fixture
def simulated_v100(monkeypatch):
    """torch.cuda answering as a CUDA 13 torch on one V100 would (nothing runs on it)."""
    props = SimpleNamespace(name="Tesla V100-SXM2-32GB", major=7, minor=0, total_memory=32 * 2**30,
                            multi_processor_count=80)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CUDA13_ARCHS)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.version, "cuda", "13.0")


def test_gpu_rows_of_a_v100(simulated_v100):
    rows = {row.name: row for row in system.gpu_checks()}
    assert rows["GPU 0"].status == OK and "compute capability 7.0, 32.0 GiB" in rows["GPU 0"].result
    assert rows["torch code for sm_70"].status == FAIL and "CUDA 12.x" in rows["torch code for sm_70"].todo
    precision = rows["fp16 / bf16 (GPU 0)"]
    assert precision.status == WARN and "bf16 no" in precision.result and "v100x8.json" in precision.todo
    bf16 = system.ds_config_check("ds_configs/a100x8_bf16.json", {"bf16": {"enabled": True}})
    assert bf16.status == FAIL and "v100x8.json" in bf16.todo
    assert system.ds_config_check("ds_configs/v100x8.json", {"fp16": {"enabled": True}}).status == OK


def test_deepspeed_version_bound():
    assert system.deepspeed_version_check(None).status == FAIL
    old = system.deepspeed_version_check("0.14.4")
    assert old.status == FAIL and "0.19.4" in old.todo and "einsum" in old.todo
    assert system.deepspeed_version_check("0.19.4").status == OK
    assert system.deepspeed_version_check("0.20.0+cu130").status == OK


def test_parity_check_passes_a_correct_extension_and_catches_a_wrong_one(monkeypatch):
    from msgfm.doctor.kernels import parity_check
    from msgfm.ops import fused

    monkeypatch.setattr(fused, "load_extension", lambda: FAKE_EXTENSION)
    good = parity_check(device="cpu", dtypes=[torch.float32, torch.bfloat16])
    assert good.status == OK and good.data["cases"] == 8, good.details

    def off_by_one_percent(*args):
        out, lse = FAKE_EXTENSION.window_attention_forward(*args)
        return out * 1.01, lse

    broken = SimpleNamespace(**{**vars(FAKE_EXTENSION), "window_attention_forward": off_by_one_percent})
    monkeypatch.setattr(fused, "load_extension", lambda: broken)
    bad = parity_check(device="cpu", dtypes=[torch.float32])
    assert bad.status == FAIL and "float32 out" in bad.result and "kernels.attention=sdpa" in bad.todo


def test_table_wraps_long_cells_and_lists_details():
    rows = [Check(name="a check", status=OK, result="x " * 60),
            Check(name="broken", status=FAIL, result="no", todo="do this", details="line one\nline two"),
            Check(name="not here", status=SKIP, result="skipped: no CUDA device")]
    table = format_table(rows)
    assert all(len(line) <= sum((26, 6, 56, 52)) + 9 for line in table.splitlines())
    assert "broken (FAIL):\n  line one\n  line two" in table and table.endswith("1 check(s) failed: broken")
    with pytest.raises(ValueError, match="status must be one of"):
        Check(name="x", status="passed", result="")


def test_without_a_launcher_no_rank_rows(tiny):
    checks, failed, meta = diagnose(str(tiny / "tiny.yaml"), data_root=tiny / "data", kernels=False)
    assert not failed and meta["world_size"] == 1
    assert not [c for c in checks if c.name.startswith(("ranks agree", "all-reduce", "MoE all-to-all"))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_gloo_ranks_under_torchrun(tiny, tmp_path):
    report = tmp_path / "doctor.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "msgfm.cli", "doctor", "--config", str(tiny / "tiny.yaml"), "--data-root",
           str(tiny / "data"), "--deepspeed_config", str(tiny / "ds_tiny.json"), "--comm-mib", "4", "--json",
           str(report)]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = rows_by_name(report)
    assert json.loads(report.read_text())["meta"]["world_size"] == 2
    allreduce, alltoall = rows["all-reduce bandwidth"], rows["MoE all-to-all"]
    assert allreduce["status"] == OK and allreduce["data"]["bytes"] == 4 * 2**20 and allreduce["data"]["busbw_gbs"] > 0
    # tiny: 4 images x (32 px / 4 / 2^2)^2 tokens at stage 3, 4 experts, capacity ceil(16 / 4 x 1.25) = 5
    assert alltoall["status"] == OK and alltoall["data"]["shape"] == [4, 5, 128] and alltoall["data"]["algbw_gbs"] > 0
    for key in ("config", "data", "ds_config"):
        assert rows[f"ranks agree: {key}"]["status"] == OK
    assert done.stdout.count("all-reduce bandwidth") == 1  # rank 0 prints the one table


@pytest.mark.slow
@pytest.mark.distributed
def test_ranks_with_different_configs_fail(tiny, tmp_path):
    """Each rank started as torchrun would start it, but with its own arguments: rank 1 holds out more data."""
    port = str(_free_port())
    procs = []
    for rank, extra in ((0, []), (1, ["data.val_fraction=0.5"])):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "msgfm.doctor", "--config", str(tiny / "tiny.yaml"), "--data-root",
               str(tiny / "data"), "--comm-mib", "1", "--json", str(tmp_path / f"rank{rank}.json"), *extra]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [1, 1], outputs[0][-3000:]
    rows = rows_by_name(tmp_path / "rank0.json")
    assert rows["ranks agree: config"]["status"] == FAIL and "rank(s) [1]" in rows["ranks agree: config"]["result"]
    assert rows["ranks agree: data"]["status"] == OK
    assert not (tmp_path / "rank1.json").exists()  # only rank 0 reports
