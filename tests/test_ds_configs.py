"""Every shipped ds_config parses, DeepSpeed accepts it, and it agrees with the run config it is for."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from msgfm.config import load_config
from msgfm.train import ds_config as dsc

DS_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
FILES = sorted(DS_DIR.glob("*.json"))
# the run config each ds_config is written for
TARGET = {"v100x8.json": "msgfm_swinb_192", "a100x8_bf16.json": "msgfm_swinb_192", "cpu.json": "demo_cpu"}


def test_every_shipped_file_is_covered():
    assert {f.name for f in FILES} == set(TARGET), "add the new ds_config to TARGET with its run config"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_deepspeed_accepts(path: Path):
    from deepspeed.runtime.config import DeepSpeedConfig

    config = json.loads(path.read_text())
    parsed = DeepSpeedConfig(config)  # world size 1 outside a process group: the batch assertion runs
    assert parsed.train_micro_batch_size_per_gpu == config["train_micro_batch_size_per_gpu"]
    assert parsed.gradient_accumulation_steps == 1
    assert parsed.zero_optimization_stage == 2  # MoE needs ZeRO-1/2
    assert parsed.gradient_clipping > 0


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_agrees_with_its_run_config(path: Path):
    cfg = load_config(TARGET[path.name])
    config = dsc.load_ds_config(path)
    batches = {g.name: int(g.batch_size_per_gpu) for g in cfg.data.groups}
    world = dsc.intended_world_size(path) or 2
    dsc.check_ds_config(config, path.name, batches, world)
    dsc.check_moe_compatible(config, path.name, cfg.model.moe.enabled)
    assert world % cfg.model.moe.expert_parallel_size == 0


def test_precision_of_shipped_files():
    assert dsc.precision(dsc.load_ds_config(DS_DIR / "v100x8.json")) == "fp16"  # V100 has no bf16
    assert dsc.precision(dsc.load_ds_config(DS_DIR / "a100x8_bf16.json")) == "bf16"
    assert dsc.precision(dsc.load_ds_config(DS_DIR / "cpu.json")) == "fp32"
    assert dsc.intended_world_size("ds_configs/v100x8.json") == 8
    assert dsc.intended_world_size("ds_configs/cpu.json") is None


def test_missing_and_broken_files(tmp_path: Path):
    with pytest.raises(dsc.DSConfigError, match="does not exist"):
        dsc.load_ds_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(dsc.DSConfigError, match="not valid JSON"):
        dsc.load_ds_config(bad)
