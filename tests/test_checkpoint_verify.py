"""A checkpoint is trusted only if it is whole: manifests, verified resume with fallback, `msgfm verify`.

Checkpoints are written by 2 thread ranks with the stand-in engine (tests/fake_dist.py), then
damaged the ways the fault tests found (a truncated optimizer partition, a missing file, a torn
marker, a flipped byte); the resume choice runs on 2 ranks that must agree. The slow test does
the same with the real DeepSpeed engine and checks the run continues bit-exactly.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_dist import FakeEngine, ThreadGroup
from test_train_support import REPO

from msgfm.cli import main as msgfm_main
from msgfm.train import checkpoint as ckpt
from msgfm.train.manifest import COMPLETE, read_manifest, verify

STEP2, STEP4 = ckpt.tag_for(2), ckpt.tag_for(4)
OPTIM1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


@pytest.fixture
def run(monkeypatch, tmp_path) -> Path:
    """A run folder with two checkpoints (steps 2 and 4) written by 2 ranks; returns its checkpoints folder."""
    group = ThreadGroup(2)
    monkeypatch.setattr(ckpt, "_comm", lambda: group)
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        results = group.run(lambda s=step: ckpt.save(FakeEngine(group), root, s, {"msgfm": {"step": s}},
                                                     {"step": s}, keep_last=2))
        assert all(isinstance(r, Path) for r in results), results
    return root


def resume_choice(monkeypatch, root: Path) -> list:
    """What each of 2 ranks picks to resume from."""
    group = ThreadGroup(2)
    monkeypatch.setattr(ckpt, "_comm", lambda: group)
    return group.run(lambda: ckpt.find_resumable(root))


def test_manifest_lists_every_file_with_size_and_checksum(run):
    meta = read_manifest(run / STEP4)
    assert meta["step"] == 4 and meta["world_size"] == 2 and meta["checksum"] == "crc32"
    on_disk = sorted(p.name for p in (run / STEP4).iterdir() if p.name != COMPLETE)
    assert sorted(meta["files"]) == on_disk
    for name, entry in meta["files"].items():
        assert entry["size"] == (run / STEP4 / name).stat().st_size
        assert len(entry["crc32"]) == 8
    assert verify(run / STEP4).ok


@pytest.mark.parametrize("damage, why", [
    ("truncate", "bytes, the manifest says"),
    ("delete", "missing"),
    ("flip", "CRC-32"),
])
def test_damaged_newest_is_set_aside_and_the_previous_one_resumes(run, monkeypatch, capsys, damage, why):
    target = run / STEP4 / OPTIM1
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        target.unlink()
    else:  # same size, one byte changed: only a checksum sees it
        target.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    assert resume_choice(monkeypatch, run) == [run / STEP2, run / STEP2]  # both ranks agree
    lines = [line for line in capsys.readouterr().out.splitlines() if "damaged" in line]
    assert len(lines) == 1 and OPTIM1 in lines[0] and why in lines[0] and f".rejected-{STEP4}" in lines[0]
    assert not (run / STEP4).exists() and (run / f".rejected-{STEP4}").is_dir()  # kept aside, not deleted
    assert [p.name for p in ckpt.complete_checkpoints(run)] == [STEP2]


def test_a_flip_seen_by_one_rank_only_is_agreed_on(run, monkeypatch):
    """Checksums are shared out between the ranks: rank 1 alone reads the odd-numbered files."""
    names = sorted(read_manifest(run / STEP4)["files"])
    odd = names[1]
    path = run / STEP4 / odd
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert not verify(run / STEP4, rank=1, world_size=2).ok and verify(run / STEP4, rank=0, world_size=2).ok
    assert resume_choice(monkeypatch, run) == [run / STEP2, run / STEP2]


def test_torn_marker_and_old_markers(run, monkeypatch, capsys):
    (run / STEP4 / COMPLETE).write_text('{"step": 4, "wor')  # a marker torn by a crash of the disk
    meta = json.loads((run / STEP2 / COMPLETE).read_text())
    (run / STEP2 / COMPLETE).write_text(json.dumps({k: meta[k] for k in ("step", "world_size", "tag")}))
    assert resume_choice(monkeypatch, run) == [run / STEP2, run / STEP2]
    out = capsys.readouterr().out
    assert "COMPLETE: unreadable" in out and "cannot be verified; loading it anyway" in out


def test_nothing_verifies_is_an_error_not_a_fresh_start(run, monkeypatch):
    for tag in (STEP2, STEP4):
        (run / tag / OPTIM1).unlink()
    for _attempt in range(2):  # and again at the next relaunch: the run is not silently started over
        results = resume_choice(monkeypatch, run)
        assert all(isinstance(r, ckpt.CheckpointError) for r in results), results
        assert "no checkpoint" in str(results[0]) and "\n" not in str(results[0])
        assert f".rejected-{STEP2}" in str(results[0]) and "--output-dir" in str(results[0])
    assert (run / f".rejected-{STEP2}").is_dir() and (run / f".rejected-{STEP4}").is_dir()


def test_no_checkpoint_means_a_fresh_start(monkeypatch, tmp_path):
    assert resume_choice(monkeypatch, tmp_path / "checkpoints") == [None, None]


def test_verify_command_tables_and_exit_codes(run, capsys):
    assert msgfm_main(["verify", str(run.parent)]) == 0
    out = capsys.readouterr().out
    assert f"{run / STEP4}: OK (newest" in out and f"{run / STEP2}: OK" in out and OPTIM1 in out
    (run / STEP2 / OPTIM1).write_bytes(b"torn")  # an older one damaged: reported, not fatal
    assert msgfm_main(["verify", str(run.parent)]) == 0
    assert "DAMAGED" in capsys.readouterr().out
    assert msgfm_main(["verify", str(run / STEP2)]) == 1
    assert msgfm_main(["verify", "--sizes-only", str(run)]) == 0


def test_verify_command_fails_on_a_damaged_newest_checkpoint(run):
    (run / STEP4 / OPTIM1).write_bytes(b"torn")
    proc = subprocess.run([sys.executable, "-m", "msgfm.cli", "verify", str(run.parent)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"{run / STEP4}: DAMAGED" in proc.stdout and "4 bytes, the manifest says" in proc.stdout
    assert "the newest checkpoint is damaged" in proc.stdout


def test_pretrained_weights_come_from_the_newest_checkpoint_that_verifies(run, capsys):
    model_file = run / STEP4 / ckpt.MODEL_STATES
    model_file.write_bytes(model_file.read_bytes()[:100])
    state = ckpt.load_model_state_dict(run.parent)
    assert torch.equal(state["w"], torch.arange(8.0))
    assert ckpt.load_client_state(run.parent)["msgfm"] == {"step": 2}
    assert "trying the previous one" in capsys.readouterr().out
    with pytest.raises(ckpt.CheckpointError, match=f"{STEP4} is damaged, mp_rank_00_model_states.pt: 100 bytes"):
        ckpt.load_model_state_dict(run / STEP4)


def test_save_records_manifest_with_the_real_engine(single_rank_dist, tmp_path):
    """DeepSpeed's own files (model states, expert shards, ZeRO partitions) all land in the manifest."""
    from test_checkpoint import make_trainer
    from test_train_support import write_tiny_run

    tiny = write_tiny_run(tmp_path, samples_per_group=12)
    trainer = make_trainer(tiny, tmp_path / "out", "train.max_steps=1")
    path = ckpt.save(trainer.engine, tmp_path / "out" / "checkpoints", 1, {"msgfm": {"step": 1}}, {"step": 1}, 2)
    files = read_manifest(path)["files"]
    assert sorted(files) == sorted(p.name for p in path.iterdir() if p.name != COMPLETE)
    assert {ckpt.MODEL_STATES, "rank00000_client.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(files)
    assert any(ckpt.EXPERT_FILE_RE.match(name) for name in files)
    assert verify(path).ok


@pytest.mark.slow
def test_torn_newest_checkpoint_falls_back_and_the_run_continues_bit_exactly(single_rank_dist, tmp_path):
    from test_checkpoint import make_trainer, optimizer_tensors
    from test_train_support import write_tiny_run

    tiny = write_tiny_run(tmp_path, samples_per_group=12)
    out = tmp_path / "out"
    a = make_trainer(tiny, out, "train.max_steps=4")  # checkpoints at steps 2 and 4
    a.fit()
    root = out / "checkpoints"
    optim = root / STEP4 / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:4096])  # the newest optimizer partition torn
    b = make_trainer(tiny, out, "train.max_steps=4")
    path = ckpt.find_resumable(root)
    assert path == root / STEP2 and (root / f".rejected-{STEP4}").is_dir()
    b.resume(path)
    assert b.step == 2
    b.fit()
    params_a = dict(a.engine.module.named_parameters())
    for name, param in b.engine.module.named_parameters():
        assert torch.equal(param, params_a[name]), name
    assert all(torch.equal(x, y) for x, y in zip(optimizer_tensors(a.engine), optimizer_tensors(b.engine)))
    assert verify(root / STEP4).ok  # saved again, whole
