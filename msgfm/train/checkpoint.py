"""Checkpoints that survive a kill at any moment, are verified before they are trusted, and exact resume.

Layout under ``<output>/checkpoints``::

    step00000040/                 one complete DeepSpeed checkpoint (expert shards included)
        mp_rank_00_model_states.pt, layer_*_expert_*_..., *_optim_states.pt   (DeepSpeed)
        rank00000_client.pt ...   per-rank state: RNGs, data scheduler position
        config.json               the resolved run config it was written with (config_guard.py)
        COMPLETE                  JSON manifest: every file with its size and CRC-32 (manifest.py)
    latest                        the tag of the newest complete checkpoint
    .rejected-step00000044/       a checkpoint that failed verification, kept for a look (never loaded)

Publishing is what makes it atomic: all ranks write into ``.tmp-step00000040``, each
fsyncs and checksums the files it wrote, the ranks exchange these lists (a collective: no
rank 0 step starts before every rank's files are on disk), then rank 0 writes ``COMPLETE``,
renames the folder to its tag (one rename) and replaces ``latest`` (write a temporary file,
``os.replace``); no rank leaves :func:`save` before that. A kill before the rename leaves only
a ``.tmp-*`` folder that nothing points to (it is removed at the next start); a kill between
the rename and the ``latest`` update leaves ``latest`` on the previous complete checkpoint.

Resuming (:func:`find_resumable`) trusts nothing on sight: the ranks verify the newest
checkpoint against its manifest, agree, and skip (and set aside) one that fails, falling
back to the newest one that verifies. A save that fails (a full disk) stops the run with
one line naming the checkpoint that is kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msgfm.errors import MissingFileError, UserError
from msgfm.train import manifest
from msgfm.train.manifest import COMPLETE, Verdict, verify
from msgfm.train.safe_load import load_weights
from msgfm.train.save_guard import CheckpointError, WriteFailure, disk_full_reason, rank_file, write_rank_files

TAG_RE = re.compile(r"^step(\d{8})$")
LATEST = "latest"
REJECTED_PREFIX = ".rejected-"
CONFIG_FILE = "config.json"  # the resolved run config a checkpoint was written with (msgfm/train/config_guard.py)


def tag_for(step: int) -> str:
    """The folder name of the checkpoint of ``step``."""
    return f"step{step:08d}"


# ---------------------------------------------------------------------------------------------
# RNG state of one rank


def rng_state() -> dict[str, Any]:
    """Every generator a training step draws from on this rank (masks, cross choice, MoE RTS)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def host_rng_state() -> tuple[Any, Any, torch.Tensor]:
    """The host-side generators only (python, numpy, torch CPU): cheap enough for every step."""
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def set_host_rng_state(state: tuple[Any, Any, torch.Tensor]) -> None:
    """Restore what :func:`host_rng_state` returned."""
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def is_complete(path: Path) -> bool:
    """A published checkpoint folder (its name is a tag and it holds ``COMPLETE``); not yet verified."""
    return TAG_RE.match(path.name) is not None and (path / COMPLETE).is_file()


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``latest`` if it is sound, else a scan); not verified."""
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if is_complete(candidate):
            newer = [p for p in complete_checkpoints(root) if p.name > candidate.name]
            return newer[-1] if newer else candidate
    found = complete_checkpoints(root)
    return found[-1] if found else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return sorted(p for p in root.iterdir() if p.is_dir() and is_complete(p))


def prepare_run_folder(output_dir: Path, rank: int) -> None:
    """Rank 0, before training: create the run folder and remove what an interrupted save left behind."""
    if rank != 0:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_partial(output_dir / "checkpoints")
    if removed:
        print(f"removed {len(removed)} partial checkpoint(s) left by an interrupted save: "
              f"{[p.name for p in removed]}", flush=True)


def remove_partial(root: Path) -> list[Path]:
    """Delete ``.tmp-*`` folders a killed save left behind (rank 0, before training)."""
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".tmp-")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale



def rejected_checkpoints(root: Path) -> list[Path]:
    """Checkpoints set aside because they failed verification."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(REJECTED_PREFIX))


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``.rejected-<tag>[-N]``: never loaded again, never deleted."""
    target = path.with_name(REJECTED_PREFIX + path.name)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{REJECTED_PREFIX}{path.name}-{n}")
    os.replace(path, target)
    return target


# ---------------------------------------------------------------------------------------------
# The process group (a function, so that tests can stand in a fake one)


def _comm() -> Any:
    import deepspeed.comm as dist

    return dist


def _first_problem(dist: Any, verdict: Verdict) -> tuple[str | None, bool]:
    """All ranks' findings on one checkpoint: (the first problem of the lowest rank, verifiable everywhere)."""
    mine = (str(verdict.problems[0]) if verdict.problems else None, verdict.verifiable)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    problems = [problem for problem, _ in gathered if problem is not None]
    return (problems[0] if problems else None), all(verifiable for _, verifiable in gathered)


# ---------------------------------------------------------------------------------------------
# Choosing the checkpoint to resume from


def find_resumable(root: Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies on every rank, or None for a fresh run. Collective.

    A checkpoint that fails is set aside (``.rejected-<tag>``) with one line naming the file and
    why, and the previous one is tried. Raises :class:`CheckpointError` when checkpoints were
    written here but none verifies: starting afresh over them would silently lose the run.
    """
    dist = _comm()
    rank, world = dist.get_rank(), dist.get_world_size()
    listing: list[Any] = [None]
    if rank == 0:  # one list for all ranks, newest first
        newest_first = [p.name for p in reversed(complete_checkpoints(root))] if root.is_dir() else []
        listing[0] = (newest_first, bool(rejected_checkpoints(root)))
    dist.broadcast_object_list(listing, src=0)
    names: list[str] = listing[0][0]
    rejected: bool = listing[0][1]
    for name in names:
        path = root / name
        problem, verifiable = _first_problem(dist, verify(path, rank, world))
        if problem is None:
            if not verifiable and rank == 0:
                print(f"msgfm: checkpoint {path} lists no files in {COMPLETE} (written before manifests): it cannot "
                      f"be verified; loading it anyway", flush=True)
            return path
        rejected = True
        if rank == 0:
            aside = set_aside(path)
            print(f"msgfm: checkpoint {path} is damaged, {problem}; set aside as {aside.name}, "
                  f"trying the previous one", flush=True)
        dist.barrier()  # the rename is done before any rank looks again
    if rejected:
        names_aside = ", ".join(p.name for p in rejected_checkpoints(root))
        raise CheckpointError(f"no checkpoint in {root} verifies (set aside: {names_aside}; "
                              f"`msgfm verify {root}` shows why); relaunch with a new --output-dir, or move "
                              f"{root} away to start this run afresh")
    return None


# ---------------------------------------------------------------------------------------------
# Saving through a DeepSpeed engine


def _raise_save_failure(failure: WriteFailure, root: Path, tag: str,
                        own_error: BaseException | None = None) -> None:
    """Stop every rank the same way: one line for a disk or OS problem, the failing rank's traceback else."""
    kept = find_latest(root)
    kept_text = f"the newest complete checkpoint {kept} is kept" if kept else "no complete checkpoint exists yet"
    if failure.disk_full:
        raise CheckpointError(f"{failure.disk_full} while saving checkpoint {tag} into {root} (rank {failure.rank}, "
                              f"{failure.file}); the partial save was removed and {kept_text}. Free space on that "
                              f"disk, then relaunch the same command to resume")
    if failure.user_fixable:
        raise CheckpointError(f"saving checkpoint {tag} into {root} failed on rank {failure.rank} writing "
                              f"{failure.file} ({failure.error}); {kept_text}. Fix that, then relaunch the same "
                              f"command to resume")
    if own_error is not None:
        raise own_error
    raise RuntimeError(f"rank {failure.rank} failed to save checkpoint {tag} ({failure.error}); see its "
                       f"traceback; {kept_text}")


def _publish(root: Path, tmp: Path, final: Path, step: int, world: int, files: dict[str, Any],
             keep_last: int, config: dict[str, Any] | None = None) -> None:
    """Rank 0, once every rank's files are on disk: the config, manifest, rename, ``latest``, pruning."""
    if config is not None:
        manifest.write_durable(tmp / CONFIG_FILE, json.dumps(config, indent=1))
    unclaimed = [name for name in manifest.all_files(tmp) if name not in files]  # e.g. DeepSpeed's recovery scripts
    files.update(manifest.describe_files(tmp, unclaimed, rank=0))
    meta = {"step": step, "world_size": world, "tag": final.name, "format": manifest.MANIFEST_FORMAT,
            "checksum": manifest.CHECKSUM, "files": dict(sorted(files.items()))}
    manifest.write_durable(tmp / COMPLETE, json.dumps(meta, indent=1))
    manifest.fsync_dir(tmp)
    if final.exists():  # re-saving a step after a resume: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    manifest.fsync_dir(root)
    pointer_tmp = root / f".{LATEST}.tmp"
    manifest.write_durable(pointer_tmp, final.name)
    os.replace(pointer_tmp, root / LATEST)  # only after the rename: `latest` never names a missing folder
    manifest.fsync_dir(root)
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save(engine: Any, root: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
         keep_last: int, config: dict[str, Any] | None = None) -> Path:
    """Save a complete, verified checkpoint for ``step`` on every rank; returns its folder. Collective.

    ``config``: the resolved run config, kept beside the weights as ``config.json`` (a relaunch compares
    its own config with it before building anything).

    Raises :class:`CheckpointError` (on every rank) when a rank could not write its files, e.g. a full
    disk: the partial save is removed and the message names the checkpoint that is kept.
    """
    dist = _comm()
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = tag_for(step)
    tmp, final = root / f".tmp-{tag}", root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    files, failure, own_error = write_rank_files(dist, engine, root, tmp, client_state, rank_state)
    # every rank's files are on disk (fsynced) before anyone takes the next step: the exchange is the barrier
    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, (files, failure))
    failures = [f for _, f in reports if f is not None]
    if failures:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _raise_save_failure(failures[0], root, tag, own_error if failures[0].rank == rank else None)
    outcome: list[Any] = [None]
    if rank == 0:
        entries = {name: entry for rank_files, _ in reports for name, entry in rank_files.items()}
        try:
            _publish(root, tmp, final, step, world, entries, keep_last, config)
        except Exception as err:  # tell the other ranks, who wait below, before stopping
            own_error = err
            outcome[0] = WriteFailure(0, COMPLETE, f"{type(err).__name__}: {err}", disk_full_reason(err, root),
                                      isinstance(err, OSError))
            shutil.rmtree(tmp, ignore_errors=True)
    dist.broadcast_object_list(outcome, src=0)  # no rank returns before the checkpoint is published
    if outcome[0] is not None:
        _raise_save_failure(outcome[0], root, tag, own_error if rank == 0 else None)
    return final


def load(engine: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model, optimizer and loss scale from ``path``; returns (client_state, this rank's state).

    ``path`` is a checkpoint of this run's own output folder, verified by :func:`find_resumable`:
    DeepSpeed and the per-rank state files are unpickled in full here (they hold DeepSpeed objects and
    RNG states), which is why weights from elsewhere never come through this function.
    """
    dist = _comm()
    meta = json.loads((path / COMPLETE).read_text())
    world = dist.get_world_size()
    if meta["world_size"] != world:
        raise UserError(f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {world}: "
                        f"exact resume needs the same world size (data position and RNGs are per rank). "
                        f"Relaunch with {meta['world_size']} ranks, or start a new --output-dir")
    load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                     load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rank_state = torch.load(path / rank_file(dist.get_rank()), map_location="cpu", weights_only=False)
    return client_state or {}, rank_state


# ---------------------------------------------------------------------------------------------
# Weights for fine-tuning, without a process group: data only, verified


MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


def _is_model_file(name: str) -> bool:
    return name == MODEL_STATES or EXPERT_FILE_RE.match(name) is not None


def _model_files_verdict(path: Path) -> Verdict:
    """The model files of one checkpoint (what fine-tuning reads) against its manifest."""
    if not (path / COMPLETE).is_file():
        verdict = Verdict(path)
        verdict.verifiable = False
        return verdict
    return verify(path, select=_is_model_file)


_checked: dict[Path, Path] = {}  # one verification (and one message) per folder and process


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder, or a run's ``checkpoints`` folder / output folder (-> its newest checkpoint).

    The model files are verified against the manifest first: a run folder falls back to its newest
    checkpoint that verifies (one line per one skipped), a damaged checkpoint folder is refused.
    """
    path = Path(path)
    if path in _checked:
        return _checked[path]
    for candidate in (path, path / "checkpoints"):
        if (candidate / MODEL_STATES).is_file():
            verdict = _model_files_verdict(candidate)
            if not verdict.ok:
                raise CheckpointError(f"checkpoint {candidate} is damaged, {verdict.problems[0]}; "
                                      f"`msgfm verify {candidate}` lists every file")
            return _remember(path, candidate, verdict)
        if candidate.is_dir() and complete_checkpoints(candidate):
            for newest in reversed(complete_checkpoints(candidate)):
                verdict = _model_files_verdict(newest)
                if verdict.ok:
                    return _remember(path, newest, verdict)
                print(f"msgfm: checkpoint {newest} is damaged, {verdict.problems[0]}; trying the previous one",
                      flush=True)
            raise CheckpointError(f"no checkpoint in {candidate} verifies; `msgfm verify {candidate}` shows why")
    raise MissingFileError(f"no msgfm/DeepSpeed checkpoint at {path}: expected a folder holding "
                           f"{MODEL_STATES}, or a run folder with checkpoints/latest")


def _remember(asked: Path, found: Path, verdict: Verdict) -> Path:
    if not verdict.verifiable:
        print(f"msgfm: checkpoint {found} has no file list to check its files against (a DeepSpeed folder "
              f"without msgfm's manifest, or one written before manifests): loading it unverified", flush=True)
    _checked[asked] = found
    return found


def _model_states(path: Path) -> dict[str, Any]:
    main = load_weights(path / MODEL_STATES, "pretrained weights")
    if not isinstance(main, dict) or "module" not in main:
        raise UserError(f"{path / MODEL_STATES}: not a DeepSpeed model-states file (no 'module' entry)")
    return main


def load_model_state_dict(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The whole model's state dict (dense weights and every expert) from a checkpoint written by any
    number of ranks and any expert-parallel size. Expert keys carry global expert ids, i.e. they load
    into a model built with ``expert_parallel_size=1`` (all experts local). Loaded as data only
    (msgfm/train/safe_load.py): a folder from elsewhere cannot run code."""
    path = resolve_checkpoint_dir(ckpt_dir)
    state = dict(_model_states(path)["module"])
    for file in sorted(path.iterdir()):
        if EXPERT_FILE_RE.match(file.name):
            state.update(load_weights(file, "pretrained expert weights"))
    return state


def load_client_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """The run-level client state (config, normalization statistics, step) of a checkpoint."""
    main = _model_states(resolve_checkpoint_dir(ckpt_dir))
    return {k: main[k] for k in ("msgfm",) if k in main}
