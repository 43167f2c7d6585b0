"""What a checkpoint holds, file by file: the manifest inside ``COMPLETE`` and its verification.

``COMPLETE`` (JSON) names every file of a checkpoint with its size and checksum::

    {"step": 16, "world_size": 2, "tag": "step00000016", "format": 2, "checksum": "crc32",
     "files": {"mp_rank_00_model_states.pt": {"size": 27627165, "crc32": "9a3c01f2", "rank": 0}, ...}}

The checksum is CRC-32 (``zlib.crc32``, streamed): it is in the standard library (a
checkpoint written on one machine verifies on any other, no extra package), runs at about
2 GiB/s on one core (the disk is usually slower), and finds every truncation and torn or
zeroed block. It guards against accidents, not against someone forging a file: that is
what loading weights as data (msgfm/train/safe_load.py) is for.

``COMPLETE`` files written before manifests existed hold no ``files``: such a checkpoint
is *unverifiable*; it is still loaded, with a warning.

Nothing here needs torch or a process group (``msgfm verify`` uses it directly).
"""
from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msgfm.errors import UserError

COMPLETE = "COMPLETE"
MANIFEST_FORMAT = 2
CHECKSUM = "crc32"
_CHUNK = 8 << 20  # bytes per read while checksumming


class ManifestError(UserError):
    """A checkpoint's ``COMPLETE`` marker cannot be read."""

    def __init__(self, marker: Path, why: str) -> None:
        super().__init__(f"{marker}: {why}")
        self.why = why


def file_checksum(path: Path, fsync: bool = False) -> tuple[int, str]:
    """(size, CRC-32 as 8 hex digits) of ``path``, read in chunks; ``fsync`` also flushes it to disk."""
    crc = 0
    size = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        if fsync:
            os.fsync(f.fileno())
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, f"{crc:08x}"


def describe_files(folder: Path, names: list[str], rank: int, fsync: bool = True) -> dict[str, dict[str, Any]]:
    """Manifest entries for files under ``folder`` (relative posix names) written by ``rank``."""
    entries = {}
    for name in names:
        size, crc = file_checksum(folder / name, fsync=fsync)
        entries[name] = {"size": size, CHECKSUM: crc, "rank": rank}
    return entries


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it (the caller fsyncs the folder)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def all_files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` (relative posix paths, sorted), ``COMPLETE`` excluded."""
    found = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(name for name in found if name != COMPLETE)


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """The parsed ``COMPLETE`` of a checkpoint; :class:`ManifestError` if missing or not valid JSON."""
    marker = ckpt_dir / COMPLETE
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(marker, "missing (the checkpoint was never published)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(marker, f"unreadable ({err})") from None
    if not isinstance(meta, dict):
        raise ManifestError(marker, "not a JSON object")
    files = meta.get("files")
    if files is not None and not (isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get(CHECKSUM), str)
            for v in files.values())):
        raise ManifestError(marker, "malformed file list")
    return meta


@dataclass
class Problem:
    """Why one file of a checkpoint cannot be trusted."""

    file: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}: {self.why}"


@dataclass
class Verdict:
    """The result of verifying one checkpoint (or this rank's share of it)."""

    path: Path
    verifiable: bool = True
    problems: list[Problem] = field(default_factory=list)
    files: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_file(folder: Path, name: str, entry: dict[str, Any], checksum: bool) -> Problem | None:
    """Size (always) and checksum (when ``checksum``) of one file against its manifest entry."""
    path = folder / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return Problem(name, "missing")
    except OSError as err:
        return Problem(name, f"unreadable ({err.strerror or err})")
    if size != entry["size"]:
        return Problem(name, f"{size} bytes, the manifest says {entry['size']} (truncated or overwritten)")
    if checksum:
        try:
            _, crc = file_checksum(path)
        except OSError as err:
            return Problem(name, f"unreadable ({err.strerror or err})")
        if crc != entry[CHECKSUM]:
            return Problem(name, f"CRC-32 {crc}, the manifest says {entry[CHECKSUM]} (content damaged)")
    return None


def verify(ckpt_dir: Path, rank: int = 0, world_size: int = 1, sizes_only: bool = False,
           select: Callable[[str], bool] | None = None) -> Verdict:
    """Check a checkpoint (the files ``select`` accepts, default all) against its manifest.

    Every caller checks that every listed file exists with its size; the checksums are shared out:
    file ``i`` (in sorted order) is read by the caller with ``rank == i % world_size``, so a resume
    reads each byte once in all (the output folder is shared by all ranks, as DeepSpeed assumes).
    """
    verdict = Verdict(ckpt_dir)
    try:
        meta = read_manifest(ckpt_dir)
    except ManifestError as err:
        verdict.problems.append(Problem(COMPLETE, err.why))
        return verdict
    files = meta.get("files")
    if files is None:
        verdict.verifiable = False
        return verdict
    for i, name in enumerate(sorted(n for n in files if select is None or select(n))):
        entry = files[name]
        verdict.files += 1
        verdict.bytes += entry["size"]
        problem = check_file(ckpt_dir, name, entry, checksum=not sizes_only and i % world_size == rank)
        if problem is not None:
            verdict.problems.append(problem)
    return verdict
