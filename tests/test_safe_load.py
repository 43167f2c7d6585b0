"""A checkpoint is data, not code: weights from elsewhere load with weights_only=True or from safetensors.

Each test plants a pickle whose payload would create a folder when unpickled in full (the
stand-in for any code an attacker would run), checks that the payload really works with a full
unpickle, and then that msgfm's loaders refuse the file with one line and nothing ran.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_support import REPO, child_env

from msgfm.train import checkpoint as ckpt
from msgfm.train.safe_load import UnsafeCheckpointError, load_weights


class Payload:
    """Unpickling this calls os.mkdir(marker): harmless, and visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def evil_file(path: Path, marker: Path, tensors: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(tensors or {}), "trap": Payload(marker)}, path)
    return path


def evil_checkpoint(folder: Path, marker: Path, in_expert: bool = False) -> Path:
    """A run folder with one checkpoint in msgfm's layout (valid manifest included) carrying the payload."""
    tag = folder / "checkpoints" / ckpt.tag_for(1)
    tag.mkdir(parents=True)
    module = {"mask_token": torch.zeros(1, 1, 8)}
    if in_expert:
        torch.save({"module": module, "msgfm": {"step": 1}}, tag / ckpt.MODEL_STATES)
        evil_file(tag / "layer_0_expert_0_mp_rank_00_model_states.pt", marker)
    else:
        evil_file(tag / ckpt.MODEL_STATES, marker, {"module": module})
    from msgfm.train.manifest import describe_files

    files = describe_files(tag, sorted(p.name for p in tag.iterdir()), rank=0)
    (tag / ckpt.COMPLETE).write_text(json.dumps({"step": 1, "world_size": 1, "tag": tag.name, "files": files}))
    return folder


def test_the_payload_runs_when_fully_unpickled(tmp_path):
    path = evil_file(tmp_path / "x.pt", tmp_path / "ran")
    torch.load(path, weights_only=False)
    assert (tmp_path / "ran").is_dir()  # so its absence below means something


@pytest.mark.parametrize("in_expert", [False, True])
def test_pretrained_checkpoint_with_code_is_refused(tmp_path, in_expert):
    marker = tmp_path / "ran"
    run = evil_checkpoint(tmp_path / "pretrained", marker, in_expert)
    with pytest.raises(UnsafeCheckpointError) as info:
        ckpt.load_model_state_dict(run)
    message = str(info.value)
    assert "\n" not in message and "refusing to load" in message and "'posix.mkdir'" in message
    assert ("layer_0_expert_0" if in_expert else ckpt.MODEL_STATES) in message
    assert "weights_only=True" in message and ".safetensors" in message
    if not in_expert:
        with pytest.raises(UnsafeCheckpointError):
            ckpt.load_client_state(run)
    assert not marker.exists()


def test_fine_tuned_and_timm_weights_with_code_are_refused(tmp_path):
    from msgfm.config import load_finetune_config
    from msgfm.finetune.build import fine_tuned_state, timm_backbone_state

    marker = tmp_path / "ran"
    path = evil_file(tmp_path / "best" / "model.pt", marker, {"head.weight": torch.zeros(2)})
    with pytest.raises(UnsafeCheckpointError, match="refusing to load fine-tuned weights"):
        fine_tuned_state(tmp_path)
    cfg = load_finetune_config("ft_ben_tiny", ["model.moe.enabled=false"])
    with pytest.raises(UnsafeCheckpointError, match="refusing to load timm weights"):
        timm_backbone_state(cfg, path)
    assert not marker.exists()


def test_plain_weights_and_safetensors_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from safetensors.torch import save_file

    state = {"w": torch.arange(4.0), "b": torch.ones(2)}
    torch.save(state, tmp_path / "a.pt")
    save_file(state, str(tmp_path / "a.safetensors"))
    for name in ("a.pt", "a.safetensors"):
        loaded = load_weights(tmp_path / name, "weights")
        assert set(loaded) == {"w", "b"} and torch.equal(loaded["w"], state["w"])
    # DeepSpeed's loss scaler (in a ZeRO-0 model-states file) is plain data and is allowed
    scaler = DynamicLossScaler(init_scale=2.0**8, scale_window=1000, min_scale=1, delayed_shift=1,
                               consecutive_hysteresis=False)
    torch.save({"module": state, "optimizer": {"loss_scaler": scaler}}, tmp_path / "d.pt")
    assert load_weights(tmp_path / "d.pt", "weights")["optimizer"]["loss_scaler"].cur_scale == 256
    (tmp_path / "torn.pt").write_bytes((tmp_path / "a.pt").read_bytes()[:50])
    with pytest.raises(ValueError, match="torn.pt: weights are not a readable torch file"):
        load_weights(tmp_path / "torn.pt", "weights")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_weights(tmp_path / "none.pt", "weights")


@pytest.mark.slow
def test_finetune_launcher_refuses_in_one_line_and_nothing_runs(tmp_path):
    """The real entry point, as a user runs it: --pretrained pointing at a folder someone sent."""
    from fixtures.make_vaihingen import write_vaihingen

    from msgfm.data.convert import run as convert
    from msgfm.data.stats import write_stats

    write_vaihingen(tmp_path / "raw", height=100, width=120)
    convert(["vaihingen", str(tmp_path / "raw"), "-o", str(tmp_path / "shards"), "--size", "128", "--workers", "1"])
    write_stats(sorted((tmp_path / "shards").glob("*.h5")), progress=False)
    marker = tmp_path / "ran"
    run = evil_checkpoint(tmp_path / "downloaded", marker)
    proc = subprocess.run(
        [sys.executable, "launchers/finetune.py", "--deepspeed_config", "ds_configs/cpu.json", "--task", "vaihingen",
         "--config", "ft_vaihingen_tiny", "--pretrained", str(run), "--data-root", str(tmp_path / "shards"),
         "--output-dir", str(tmp_path / "out"), "transfer.init=pretrained", "tracking.enabled=false"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("finetune: error:")]
    assert len(errors) == 1 and "refusing to load pretrained weights" in errors[0] and ckpt.MODEL_STATES in errors[0]
    assert not marker.exists()
