"""The GPU check's plumbing on the CPU: the full plan is consistent, the comparisons and the
report are right on canned numbers, the wheel target asks for Python 3.12 wheels, and the
CPU smoke of tools/gpu_check.sh runs end to end without what the GPU machine lacks."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from test_train_support import REPO

from msgfm.bench import gpu_check, gpu_report
from msgfm.bench.train import peak_tflops


def test_full_plan_runs_the_paper_model_on_one_gpu(tmp_path):
    from msgfm.config import load_config
    from msgfm.train.ds_config import load_ds_config, precision

    plan = gpu_check.make_plan("full", tmp_path)
    assert sum(plan.budgets.values()) + 3 * plan.budgets["train"] <= 480  # the 8 minutes
    assert [run.name for run in plan.runs] == ["bf16 fused", "bf16 sdpa", "fp16 fused", "fp16 sdpa"]
    for run in plan.runs:
        cfg = load_config(plan.config, plan.overrides + run.overrides)
        assert cfg.name == "msgfm_swinb_192" and cfg.model.moe.expert_parallel_size == 1
        assert cfg.model.moe.num_experts == 8
        assert precision(load_ds_config(run.ds_config)) == run.name.split()[0]
        fast = run.name.endswith("fused")
        expected = ("fused", "fused") if fast else ("sdpa", "torch")
        assert (cfg.kernels.attention, cfg.kernels.window_process) == expected
    assert 20 <= plan.steps <= 30 and plan.warmup >= 1


def test_peak_table():
    assert peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert peak_tflops("Tesla V100-SXM2-32GB", "fp16") == 125.0
    assert peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None
    assert peak_tflops("Some Future GPU", "bf16") is None


def _run(losses: list[float], **extra) -> dict:
    return {"precision": "bf16", "total_loss": losses, "finite": True, "steps": 20, "warmup": 3, **extra}


def test_loss_agreement_within_and_beyond_tolerance():
    same = gpu_report.loss_agreement("a", _run([2.0, 1.9, 1.8, 1.7, 9.0]), "b", _run([2.0, 1.91, 1.8, 1.7, 1.0]))
    assert same["agree"] and same["steps"] == 4 and same["max_rel_diff"] == pytest.approx(0.01 / 1.91)
    apart = gpu_report.loss_agreement("a", _run([2.0, 1.9]), "b", _run([2.0, 2.1]))
    assert not apart["agree"] and apart["tolerance"] == gpu_report.LOSS_RTOL["bf16"]
    assert not gpu_report.loss_agreement("a", _run([]), "b", _run([]))["agree"]


def test_loss_scale_calibration_and_late_overflows():
    calibrating = gpu_report.loss_scale_summary(_run([1.0], overflow_steps=[0, 1, 2],
                                                     loss_scale_history=[32768.0, 16384.0, 8192.0, 8192.0]))
    assert calibrating["calibration_overflows"] == 3 and calibrating["late_overflows"] == []
    assert (calibrating["scale_first"], calibrating["scale_last"]) == (32768.0, 8192.0)
    late = gpu_report.loss_scale_summary(_run([1.0], overflow_steps=[0, 1, 7]))
    assert late["calibration_overflows"] == 2 and late["late_overflows"] == [7]


def _profile(tmp_path: Path, fused_ms: float, sdpa_ms: float) -> dict:
    from msgfm.ops.benchmark import ProfileRow, write_reports

    rows = [ProfileRow(shape="stage1", op="attention", impl=impl, pass_="fwd+bwd", median_ms=ms, p10_ms=ms,
                       p90_ms=ms, peak_mib=1.0, gbs=1.0, pct_copy_bw=1.0, speedup=1.0)
            for impl, ms in (("eager", 3.0), ("sdpa", sdpa_ms), ("fused", fused_ms))]
    write_reports(rows, {"device": "test"}, tmp_path)
    return gpu_check.load_profile(tmp_path)


def test_targets_from_profile_and_runs(tmp_path):
    runs = {"bf16 fused": _run([1.0], s_per_step=0.10, mfu_pct=41.0), "bf16 sdpa": _run([1.0], s_per_step=0.12),
            "fp16 fused": _run([1.0], precision="fp16", s_per_step=0.2, overflow_steps=[0, 1, 9])}
    profile = _profile(tmp_path, fused_ms=1.0, sdpa_ms=1.5)
    assert "| stage1 | attention | fused | fwd+bwd | 1.000 |" in profile["table"]
    rows = {t["target"]: t for t in gpu_report.targets(profile, runs)}
    assert rows["fused attention fwd+bwd vs sdpa, stage 1, bf16"]["measured"] == "1.50x"
    assert rows["fused attention fwd+bwd vs sdpa, stage 1, bf16"]["met"] is True
    assert rows["training step with fused faster than sdpa (bf16)"]["met"] is True
    assert rows["training step with fused faster than sdpa (fp16)"]["met"] is None  # no fp16 sdpa run
    assert rows["MFU of the paper model, bf16, fused (H100/H200)"]["met"] is True
    assert rows["fp16 + loss scaling: finite losses, no overflow after calibration"]["met"] is False
    slow = gpu_report.targets(_profile(tmp_path, fused_ms=1.4, sdpa_ms=1.5), {})
    assert slow[0]["met"] is False and all(t["met"] is None for t in slow[1:])


def test_eager_attention_is_used_for_counting_and_then_restored():
    from msgfm.bench.train import eager_attention
    from msgfm.config import load_config
    from msgfm.tasks import build_pretrain_task

    cfg = load_config("demo_cpu", ["model.moe.enabled=false", "kernels.attention=sdpa"])
    model = build_pretrain_task(cfg)
    encoder = model.backbone.encoder
    with eager_attention(model):
        assert (encoder.kernels.attention, encoder.kernels.window_process) == ("eager", "torch")
    assert encoder.kernels.attention == "sdpa"


def test_make_targets_ask_for_python312_wheels_and_the_smoke(tmp_path):
    stamp = tmp_path / "stamp"
    stamp.write_text("")
    os.utime(stamp, (4e9, 4e9))  # newer than setup.py: make does not reinstall
    dry = subprocess.run(["make", "-n", "gpu-wheels", f"PY={sys.executable}", f"STAMP={stamp}"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    text = dry.stdout
    assert "DS_BUILD_OPS=0" in text and "pip wheel --no-deps -w .gpu-wheels" in text and "deepspeed==" in text
    assert "--only-binary=:all: --python-version 3.12 --implementation cp" in text
    assert "--platform manylinux_2_17_x86_64" in text and "pydantic_core" in text and "hjson" in text
    smoke = subprocess.run(["make", "-n", "gpu-check", "GPU_CHECK_MODE=smoke", f"PY={sys.executable}",
                            f"STAMP={stamp}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert f"PYTHON={sys.executable} bash tools/gpu_check.sh" in smoke.stdout and "--mode smoke" in smoke.stdout
    assert ".gpu-wheels/" in (REPO / ".gitignore").read_text().splitlines()


def test_full_mode_without_a_gpu_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--mode", "full", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--mode smoke" in err


def test_only_runs_the_selected_parts(tmp_path):
    plan = gpu_check.make_plan("smoke", tmp_path)
    report = gpu_check.GpuCheck(plan, tmp_path / "out", tmp_path, deadline_s=300, wheels=None,
                                only=["build"]).run()
    status = {p["name"]: (p["status"], p["note"]) for p in report["parts"]}
    assert status["environment"][0] == "ok" and status["synthetic data"][0] == "ok"
    assert status["build kernels + FusedAdam"] == ("skip", "skipped: no CUDA device")
    for name in ("kernel tests", "doctor", "train fp32 eager", "train fp32 sdpa"):
        assert status[name] == ("skip", "skipped: not selected by --only")
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "everything"])


def _probe_wheel(folder: Path) -> Path:
    """A tiny pure-Python wheel, written by hand: what the GPU machine installs from .gpu-wheels."""
    files = {"msgfm_probe/__init__.py": b"CARRIED = True\n",
             "msgfm_probe-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: msgfm-probe\nVersion: 0.1\n",
             "msgfm_probe-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                b"Tag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for name, data in files.items()] + ["msgfm_probe-0.1.dist-info/RECORD,,"]
    path = folder / "msgfm_probe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("msgfm_probe-0.1.dist-info/RECORD", "\n".join(record) + "\n")
    return path


@pytest.mark.slow
def test_cpu_smoke_of_the_gpu_check_end_to_end(tmp_path):
    """bash tools/gpu_check.sh --mode smoke, as on the GPU machine: carried wheels installed into a
    temporary site folder, rasterio and mlflow missing, reports under $OUT."""
    wheels, blocked, out = tmp_path / "wheels", tmp_path / "blocked", tmp_path / "out"
    wheels.mkdir()
    blocked.mkdir()
    _probe_wheel(wheels)
    for name in ("rasterio", "mlflow"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_WHEELS": str(wheels), "OUT": str(out),
           "PYTHONPATH": str(blocked), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "tools/gpu_check.sh", "--mode", "smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "installing 1 wheel(s)" in done.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    status = {p["name"]: p["status"] for p in report["parts"]}
    assert status == {"environment": "ok", "synthetic data": "ok", "build kernels + FusedAdam": "skip",
                      "kernel tests": "ok", "doctor": "ok", "profile bf16": "skip", "train fp32 eager": "ok",
                      "train fp32 sdpa": "ok", "profile fp16": "skip"}
    assert report["environment"]["carried wheels"] == "msgfm_probe-0.1-py3-none-any.whl"
    assert "skipped" in report["kernel_tests"]["summary"]
    assert not [row for row in report["doctor"]["checks"] if row["status"] == "FAIL"]
    runs = report["train"]
    for name in ("fp32 eager", "fp32 sdpa"):
        run = runs[name]
        assert run["finite"] and len(run["total_loss"]) == 3 and run["samples_per_s"] > 0
        assert run["loss_scale_history"] == [] and run["overflow_steps"] == []
    assert runs["fp32 eager"]["attention"] == "eager" and runs["fp32 sdpa"]["attention"] == "sdpa"
    # the FLOPs are counted the same way whatever the attention implementation
    assert runs["fp32 eager"]["step_tflop"] == pytest.approx(runs["fp32 sdpa"]["step_tflop"])
    (agreement,) = report["loss_agreement"]
    assert agreement["agree"] and agreement["steps"] == 3 and agreement["losses_a"][0] == agreement["losses_b"][0]
    assert [t["met"] for t in report["targets"]] == [None] * 5  # nothing measured without a GPU
    markdown = (out / "gpu_check.md").read_text()
    for heading in ("# msgfm GPU check (smoke)", "## Parts", "## Training runs", "## Targets", "## msgfm doctor"):
        assert heading in markdown
    # what the device tool brings back: at most 8 files, plain names, no sub-folders here
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    assert "failed parts: none" in done.stdout and "total" in done.stdout.splitlines()[-3]
