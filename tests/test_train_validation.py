"""Start-up validation: every configuration mistake stops the run before any data is read,
with an error that names the key or file and what to change."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_support import REPO, write_tiny_ds_config, write_tiny_run

from msgfm.train import pretrain


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("tiny"), samples_per_group=12)


def run(tiny: Path, *overrides: str, ds: Path | None = None, data_root: str | None = None, world: int = 2) -> None:
    os.environ["WORLD_SIZE"] = str(world)
    try:
        pretrain(str(tiny / "tiny.yaml"), list(overrides), str(ds or tiny / "ds_tiny.json"), data_root,
                 str(tiny / "out"))
    finally:
        os.environ.pop("WORLD_SIZE", None)


def test_zero3_with_moe(tiny):
    (tiny / "z3").mkdir(exist_ok=True)
    ds = write_tiny_ds_config(tiny / "z3", zero_optimization={"stage": 3})
    with pytest.raises(ValueError, match="ZeRO stage 3 does not work with DeepSpeed-MoE"):
        run(tiny, ds=ds)


def test_expert_parallel_must_divide_world(tiny):
    with pytest.raises(ValueError, match=r"expert_parallel_size=2 does not divide the world size 3"):
        run(tiny, world=3)


def test_expert_parallel_must_divide_experts(tiny):
    with pytest.raises(ValueError, match=r"model.moe.expert_parallel_size.*num_experts=4"):
        run(tiny, "model.moe.expert_parallel_size=3", world=3)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_cpu(tiny, precision):
    folder = tiny / precision
    folder.mkdir(exist_ok=True)
    ds = write_tiny_ds_config(folder, **{precision: {"enabled": True}})
    with pytest.raises(ValueError, match=f"enables {precision}, but no CUDA device.*cpu.json"):
        run(tiny, ds=ds)


def test_missing_data_path(tiny):
    with pytest.raises(FileNotFoundError, match="data root .*nowhere does not exist.*prepare-sample"):
        run(tiny, data_root=str(tiny / "nowhere"))


def test_group_batches_contradict_ds_config(tiny):
    with pytest.raises(ValueError, match=r"train_micro_batch_size_per_gpu=4 contradicts the group batch sizes.*"
                                         r"must equal the largest, 8"):
        run(tiny, "data.groups.rgb.batch_size_per_gpu=8")
    folder = tiny / "gas"
    folder.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1"):
        run(tiny, ds=write_tiny_ds_config(folder, gradient_accumulation_steps=2))
    with pytest.raises(ValueError, match=r"train_batch_size=16 != .* world size 2"):
        run(tiny, ds=write_tiny_ds_config(folder, train_batch_size=16))
    with pytest.raises(ValueError, match="remove the 'optimizer' section"):
        run(tiny, ds=write_tiny_ds_config(folder, optimizer={"type": "AdamW", "params": {"lr": 1e-4}}))


def test_nothing_was_written(tiny):
    """The checks run before the process group and the output folder exist."""
    assert not (tiny / "out").exists()


def test_launcher_reports_one_line_and_exit_code(tiny):
    proc = subprocess.run([sys.executable, "launchers/pretrain.py", "--deepspeed_config", str(tiny / "ds_tiny.json"),
                           "--config", str(tiny / "tiny.yaml"), "--data-root", str(tiny / "missing")],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WORLD_SIZE": "2"})
    assert proc.returncode == 2
    assert "pretrain: error: data root" in proc.stderr and "Traceback" not in proc.stderr


def test_dry_run_paper_setup_for_8_v100(tmp_path):
    proc = subprocess.run([sys.executable, "launchers/pretrain.py", "--deepspeed_config", "ds_configs/v100x8.json",
                           "--dry-run", "--data-root", str(tmp_path / "absent")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "world size 8" in out and "ZeRO-2 with MoE" in out and "precision fp16" in out
    # the encoder: 219M parameters with all experts, 86.8M active per token (paper, Table 11: 89M)
    encoder = out.split("encoder: total ")[1]
    total_m = float(encoder.split("M")[0])
    active_m = float(encoder.split("active ")[1].split("M")[0])
    assert 210 < total_m < 230 and 85 < active_m < 92
    assert "params     (P_d + P_e/E) * 2" in out and "optimizer  P_d*12/W" in out
    assert f"steps per epoch: data root {tmp_path / 'absent'} is missing here" in out
    # base and effective rates per group: Table 10's rates x the reference group's global batch / 512
    assert "rgb: base 0.0001, global batch 1024, effective 0.0002 (x the reference group's global batch / 512); " \
           "warm-up from 1e-06 [reference]" in out
    assert "sen12ms: base 2.5e-05, global batch 256, effective 5e-05" in out
    assert "mdas: base 1e-05, global batch 96, effective 2e-05" in out


# 9 training samples per group, 4 per rank: rgb 1 batch of 4, the pairs 2 batches of 2
@pytest.mark.parametrize("epoch,passes", [("every_group_once", "rgb 1, sen12ms 1, mdas 1"),
                                          ("largest_group_once", "rgb 2, sen12ms 1, mdas 1")])
def test_dry_run_prints_passes_per_epoch_and_rates(tiny, capsys, epoch, passes):
    code = pretrain(str(tiny / "tiny.yaml"), [f"data.epoch={epoch}"],
                    str(tiny / "ds_tiny.json"), None, "unused", dry_run=True, world_size=2)
    out = capsys.readouterr().out
    assert code == 0
    assert f"steps per epoch ({epoch}): 2 (batches per group per rank: {{'rgb': 1, 'sen12ms': 2, 'mdas': 2}})" in out
    assert f"passes over each group's data per epoch: {passes}" in out
    assert "rgb: base 0.003, global batch 8, effective 0.003 (unscaled, optimizer.lr_reference_batch: null)" in out


def test_dry_run_catches_a_bad_world_size():
    with pytest.raises(ValueError, match="expert_parallel_size=8 does not divide the world size 12"):
        pretrain("msgfm_swinb_192", [], str(REPO / "ds_configs" / "v100x8.json"), None, "unused", dry_run=True,
                 world_size=12)
