"""Each rank's part of a checkpoint save: its files on disk, fsynced and checksummed, or why not.

DeepSpeed writes a rank's files through ``engine.checkpoint_engine.save``; :class:`RecordingWrites`
wraps that call to learn which files this rank wrote (they go into the manifest) and to hold a
failed write instead of raising it in the middle of ``save_checkpoint``. A rank that raised there
would never reach DeepSpeed's closing barrier and the other ranks would wait for it until the
process-group timeout (30 minutes); instead every rank finishes the call and the ranks compare
notes (msgfm/train/checkpoint.py). :func:`disk_full_reason` tells a full disk from other failures,
including torch's zip writer's ``basic_ios::clear: iostream error``, which carries no errno.
"""
from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from msgfm.errors import UserError
from msgfm.train.manifest import describe_files

LOW_SPACE_BYTES = 64 << 20  # less free space than this after a failed write: the disk is full


class CheckpointError(UserError):
    """A checkpoint problem the user has to act on (full disk, nothing left to resume from): one line."""


def rank_file(rank: int) -> str:
    """The file holding one rank's own state (RNGs, data position) inside a checkpoint."""
    return f"rank{rank:05d}_client.pt"


def free_bytes(folder: Path) -> int:
    """Free space (for this user) on the disk holding ``folder``; unknown counts as plenty."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return LOW_SPACE_BYTES


FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def disk_full_reason(err: BaseException, folder: Path) -> str | None:
    """"no space left on device" (or "disk quota exceeded") when ``err`` came from a full disk, else None.

    torch's zip writer hides the errno (``basic_ios::clear: iostream error``, ``unexpected pos``):
    then the free space left on the disk of ``folder`` decides.
    """
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in FULL_ERRNOS:
            return FULL_ERRNOS[cause.errno]
        cause = cause.__cause__ or cause.__context__
    return "no space left on device" if free_bytes(folder) < LOW_SPACE_BYTES else None


@dataclass
class WriteFailure:
    """What went wrong on one rank while saving (sent to every rank)."""

    rank: int
    file: str
    error: str
    disk_full: str | None
    user_fixable: bool  # an OS error (disk, permissions): one line, no traceback


class RecordingWrites:
    """Wraps the engine's checkpoint writer: records the files this rank writes, defers a failed write.

    A rank whose write fails must still reach DeepSpeed's closing barrier in ``save_checkpoint``,
    or every other rank waits there until the process-group timeout: so the failure is held, the
    rank's remaining writes are skipped, and the ranks compare notes afterwards.
    """

    def __init__(self, engine: Any, folder: Path) -> None:
        self.writer = engine.checkpoint_engine
        self.folder = folder.resolve()
        self.written: list[str] = []
        self.failed: tuple[str, BaseException] | None = None
        self._own = "save" in vars(self.writer)
        self._save: Callable[[Any, str], Any] = self.writer.save

    def __enter__(self) -> RecordingWrites:
        if getattr(self.writer, "is_decoupled", lambda: False)():
            raise CheckpointError(f"the DeepSpeed checkpoint engine {type(self.writer).__name__} writes in the "
                                  f"background; msgfm needs the default torch checkpoint engine to know when a "
                                  f"checkpoint is on disk: remove the checkpoint engine setting from the ds_config")
        setattr(self.writer, "save", self._record)  # noqa: B010 (an instance attribute shadows the method)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own:
            setattr(self.writer, "save", self._save)  # noqa: B010
        else:
            delattr(self.writer, "save")

    def name(self, path: str | Path) -> str:
        """``path`` relative to the checkpoint folder, as the manifest lists it."""
        resolved = Path(path).resolve()
        return resolved.relative_to(self.folder).as_posix() if resolved.is_relative_to(self.folder) else str(path)

    def _record(self, state_dict: Any, path: str) -> None:
        if self.failed is not None:
            return
        try:
            self._save(state_dict, path)
        except Exception as err:
            self.failed = (self.name(path), err)
            return
        if self.name(path) not in self.written:
            self.written.append(self.name(path))


def write_rank_files(dist: Any, engine: Any, root: Path, tmp: Path, client_state: dict[str, Any],
                     rank_state: dict[str, Any]) -> tuple[dict[str, Any], WriteFailure | None, BaseException | None]:
    """One rank's part of a save: DeepSpeed's files, the rank state, fsync and checksums.

    Returns (manifest entries, failure report, the exception itself)."""
    rank = dist.get_rank()
    with RecordingWrites(engine, tmp) as writes:
        try:
            engine.save_checkpoint(str(root), tag=tmp.name, client_state=client_state, save_latest=False)
        except Exception as err:
            # a write outside the checkpoint engine failed (rank 0 copies DeepSpeed's recovery
            # scripts): the other ranks wait in save_checkpoint's closing barrier, meet them there
            writes.failed = writes.failed or ("(DeepSpeed save_checkpoint)", err)
            dist.barrier()
    if writes.failed is None:
        try:
            torch.save(rank_state, tmp / rank_file(rank))
            writes.written.append(rank_file(rank))
            return describe_files(tmp, writes.written, rank), None, None  # fsync + CRC of what this rank wrote
        except Exception as err:
            writes.failed = (rank_file(rank), err)
    file, error = writes.failed
    failure = WriteFailure(rank, file, f"{type(error).__name__}: {error}", disk_full_reason(error, tmp),
                           isinstance(error, OSError))
    return {}, failure, error
