"""How a checkpoint is published, checked on the event log of 2 thread ranks (tests/fake_dist.py).

The engine is a stand-in that writes files the way DeepSpeed's ``save_checkpoint`` does (its
writer, between two barriers, rank 0 copying a script beside them). The checks do not depend on
thread timing: they ask the log what was *guaranteed* to come first. They fail if rank 0 writes
``COMPLETE`` before every rank's files are fsynced, renames before ``COMPLETE``, moves ``latest``
before the rename, or if any rank returns before ``latest`` names the new checkpoint; and, at
every rename and marker write, ``latest`` and every published folder must verify. A save killed
at any of its filesystem steps leaves a checkpoint to resume from. A failed write on one rank (a
full disk) stops both ranks with one line naming the checkpoint kept, and nothing hangs.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from fake_dist import FakeEngine, ThreadGroup

from msgfm.train import checkpoint as ckpt
from msgfm.train import manifest, save_guard
from msgfm.train.manifest import all_files, read_manifest, verify

STEP2, STEP4 = ckpt.tag_for(2), ckpt.tag_for(4)


def check_published(root: Path) -> list[str]:
    """What must hold at every moment: ``latest`` names a folder that verifies, every published folder verifies."""
    problems = []
    if (root / ckpt.LATEST).is_file():
        target = root / (root / ckpt.LATEST).read_text().strip()
        if not target.is_dir():
            problems.append(f"latest names {target.name}, which does not exist")
    for folder in ckpt.complete_checkpoints(root):
        verdict = verify(folder)
        if not verdict.ok or not verdict.verifiable:
            problems.append(f"{folder.name} is published but does not verify: {verdict.problems}")
    return problems


@pytest.fixture
def world(monkeypatch, tmp_path):
    """A 2-rank thread group standing in for deepspeed.comm, with the filesystem steps logged and checked."""
    root = tmp_path / "checkpoints"
    state = {"group": ThreadGroup(2), "violations": [], "kill_at": None, "ops": 0}
    real_replace, real_fsync, real_write = os.replace, os.fsync, manifest.write_durable

    def step(kind: str, detail: object) -> None:
        group = state["group"]
        group.log(kind, detail)
        state["violations"] += [f"after {kind} {detail}: {p}" for p in check_published(root)]
        state["ops"] += 1
        if state["kill_at"] is not None and state["ops"] >= state["kill_at"]:
            raise Killed(f"killed after {kind} {detail}")

    def replace(src, dst):
        real_replace(src, dst)
        step("replace", (Path(src).name, Path(dst).name))

    def write_durable(path, text):
        real_write(path, text)
        step("write_durable", Path(path).name)

    def fsync(fd):
        real_fsync(fd)
        state["group"].log("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name)

    monkeypatch.setattr(ckpt, "_comm", lambda: state["group"])
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(manifest, "write_durable", write_durable)
    state["root"] = root
    return state


class Killed(BaseException):
    """A kill -9 at this point: nothing after it runs (BaseException: no handler in msgfm catches it)."""


def save(state: dict, step: int, keep_last: int = 2, **engine_options) -> list:
    group = state["group"]
    return group.run(lambda: ckpt.save(FakeEngine(group, **engine_options), state["root"], step,
                                       {"msgfm": {"step": step}}, {"step": step}, keep_last))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced files")
def test_publishing_order_on_every_rank(world):
    assert all(isinstance(r, Path) for r in save(world, 2))
    world["group"] = ThreadGroup(2)  # a fresh log for the second save, which also prunes the first
    results = save(world, 4, keep_last=1)
    assert all(isinstance(r, Path) for r in results), results
    group, root = world["group"], world["root"]
    assert world["violations"] == []
    assert (root / ckpt.LATEST).read_text() == STEP4 and [p.name for p in ckpt.complete_checkpoints(root)] == [STEP4]
    files = read_manifest(root / STEP4)["files"]
    assert set(files) == set(all_files(root / STEP4)) == {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rank00000_client.pt", "rank00001_client.pt", "zero_to_fp32.py"}
    assert [files[f"rank0000{r}_client.pt"]["rank"] for r in (0, 1)] == [0, 1]  # each rank described its own

    [complete] = group.find("write_durable", lambda d: d == ckpt.COMPLETE)
    [rename] = group.find("replace", lambda d: d == (f".tmp-{STEP4}", STEP4))
    [latest] = group.find("replace", lambda d: d[1] == ckpt.LATEST)
    for name in files:
        synced = group.find("fsync", lambda d, n=name: d == n)
        assert any(group.happens_before(e, complete) for e in synced), f"{name} not fsynced before COMPLETE"
    assert group.happens_before(complete, rename), "renamed before COMPLETE was written"
    assert group.happens_before(rename, latest), "`latest` moved before the rename"
    for rank in (0, 1):
        [returned] = group.find("returned", rank=rank)
        assert group.happens_before(latest, returned), f"rank {rank} returned before the checkpoint was published"


def test_a_kill_at_any_step_of_a_save_leaves_a_checkpoint_to_resume(world):
    world["group"] = ThreadGroup(1)
    assert isinstance(save(world, 2)[0], Path)
    root = world["root"]
    kill_at = 1
    while True:
        world["group"], world["ops"], world["kill_at"] = ThreadGroup(1), 0, kill_at
        [result] = save(world, 4, keep_last=1)
        world["kill_at"] = None
        world["group"] = ThreadGroup(1)  # the relaunch
        ckpt.remove_partial(root)
        [found] = world["group"].run(lambda: ckpt.find_resumable(root))
        assert isinstance(found, Path) and found.name in (STEP2, STEP4), (kill_at, found)
        assert verify(found).ok and check_published(root) == [], kill_at
        if not isinstance(result, Killed):
            assert found.name == STEP4
            break
        kill_at += 1
    assert kill_at >= 4  # COMPLETE, rename, latest (and pruning) were each a kill point
    assert world["violations"] == []


@pytest.mark.parametrize("serialization", ["legacy", "zip"])
def test_full_disk_on_one_rank_stops_every_rank_with_one_line(world, monkeypatch, serialization):
    assert all(isinstance(r, Path) for r in save(world, 2))
    if serialization == "zip":  # torch's zip writer reports `basic_ios::clear: iostream error`, no errno
        monkeypatch.setattr(save_guard, "free_bytes", lambda folder: 4096)
    world["group"] = ThreadGroup(2)
    results = save(world, 4, full_disk=serialization)
    root = world["root"]
    for err in results:
        assert isinstance(err, ckpt.CheckpointError), results
        message = str(err)
        assert "\n" not in message and "no space left on device" in message
        assert f"{root / STEP2} is kept" in message and "rank 1" in message and "zero_pp_rank_1" in message
    assert not (root / f".tmp-{STEP4}").exists()  # the partial save is removed (space freed)
    assert (root / ckpt.LATEST).read_text() == STEP2 and [p.name for p in ckpt.complete_checkpoints(root)] == [STEP2]


def test_failure_outside_the_writer_does_not_hang_the_other_rank(world):
    assert all(isinstance(r, Path) for r in save(world, 2))
    world["group"] = ThreadGroup(2)
    results = save(world, 4, script_fails=True)
    assert all(isinstance(r, ckpt.CheckpointError) and "no space left on device" in str(r) for r in results), results
    assert (world["root"] / ckpt.LATEST).read_text() == STEP2


def test_an_unexpected_error_keeps_its_traceback_on_its_rank(world, monkeypatch):
    def broken(state_dict, path):
        raise KeyError("bug")

    world["group"] = ThreadGroup(2)
    group = world["group"]

    def run():
        engine = FakeEngine(group)
        if group.get_rank() == 1:
            engine.checkpoint_engine.save = broken
        return ckpt.save(engine, world["root"], 2, {"msgfm": {}}, {}, 2)

    results = group.run(run)
    assert isinstance(results[1], KeyError)  # the failing rank re-raises its own error (a bug: traceback)
    assert isinstance(results[0], RuntimeError) and "rank 1 failed to save" in str(results[0])
    assert ckpt.find_latest(world["root"]) is None
