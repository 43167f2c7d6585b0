"""Checkpoints that survive a kill at any moment, exact resume, and weights for fine-tuning.

Layout under ``<output>/checkpoints``::

    step00000040/                 one complete DeepSpeed checkpoint (expert shards included)
        mp_rank_00_model_states.pt, layer_*_expert_*_..., *_optim_states.pt   (DeepSpeed)
        rank00000_client.pt ...   per-rank state: RNGs, data scheduler position
        COMPLETE                  JSON written by rank 0 once every rank has finished
    latest                        the tag of the newest complete checkpoint

Publishing is what makes it atomic: all ranks write into ``.tmp-step00000040``,
barrier, then rank 0 writes ``COMPLETE``, renames the folder to its tag (one
rename) and replaces ``latest`` (write a temporary file, ``os.replace``).
A kill before the rename leaves only a ``.tmp-*`` folder that nothing points
to (it is removed at the next start); a kill between the rename and the
``latest`` update leaves ``latest`` on the previous complete checkpoint, and
:func:`find_latest` also checks the ``COMPLETE`` marker itself.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import deepspeed.comm as dist
import numpy as np
import torch

from msgfm.errors import MissingFileError, UserError

TAG_RE = re.compile(r"^step(\d{8})$")
COMPLETE = "COMPLETE"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}_client.pt"


# ---------------------------------------------------------------------------------------------
# RNG state of one rank


def rng_state() -> dict[str, Any]:
    """Every generator a training step draws from on this rank (masks, cross choice, MoE RTS)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def host_rng_state() -> tuple[Any, Any, torch.Tensor]:
    """The host-side generators only (python, numpy, torch CPU): cheap enough for every step."""
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def set_host_rng_state(state: tuple[Any, Any, torch.Tensor]) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def is_complete(path: Path) -> bool:
    return TAG_RE.match(path.name) is not None and (path / COMPLETE).is_file()


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``latest`` if it is sound, else a scan)."""
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


# ---------------------------------------------------------------------------------------------
# Saving and loading through a DeepSpeed engine


def _barrier() -> None:
    dist.barrier()


def save(engine: Any, root: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
         keep_last: int) -> Path:
    """Save a complete checkpoint for ``step`` on every rank; returns its folder. Collective."""
    rank = dist.get_rank()
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    final = root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, root / tmp_tag / rank_file(rank))
    _barrier()  # every rank's files are on disk
    if rank == 0:
        meta = {"step": step, "world_size": dist.get_world_size(), "tag": tag}
        (root / tmp_tag / COMPLETE).write_text(json.dumps(meta))
        if final.exists():  # re-saving a step after a resume: replace it
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        pointer_tmp = root / f".{LATEST}.tmp"
        pointer_tmp.write_text(tag)
        os.replace(pointer_tmp, root / LATEST)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(engine: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model, optimizer and loss scale from ``path``; returns (client_state, this rank's state)."""
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
# Weights for fine-tuning, without a process group


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder, or a run's ``checkpoints`` folder / output folder (-> its newest checkpoint)."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "mp_rank_00_model_states.pt").is_file():
            return candidate
        if candidate.is_dir() and (latest := find_latest(candidate)) is not None:
            return latest
    raise MissingFileError(f"no msgfm/DeepSpeed checkpoint at {path}: expected a folder holding "
                           f"mp_rank_00_model_states.pt, or a run folder with checkpoints/latest")


EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


def load_model_state_dict(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The whole model's state dict (dense weights and every expert) from a checkpoint written by any
    number of ranks and any expert-parallel size. Expert keys carry global expert ids, i.e. they load
    into a model built with ``expert_parallel_size=1`` (all experts local)."""
    path = resolve_checkpoint_dir(ckpt_dir)
    main = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    state = dict(main["module"])
    for file in sorted(path.iterdir()):
        if EXPERT_FILE_RE.match(file.name):
            state.update(torch.load(file, map_location="cpu", weights_only=False))
    return state


def load_client_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """The run-level client state (config, normalization statistics, step) of a checkpoint."""
    path = resolve_checkpoint_dir(ckpt_dir)
    main = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: main[k] for k in ("msgfm",) if k in main}
