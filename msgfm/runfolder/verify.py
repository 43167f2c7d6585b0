"""``msgfm verify RUN_DIR``: check every checkpoint of a run folder against its manifest.

One table per checkpoint, newest first: each file with its size and CRC-32 and whether it
matches what ``COMPLETE`` recorded when the checkpoint was published. Checkpoints set aside by
a resume (``.rejected-*``) and unfinished saves (``.tmp-*``) are listed too. Exits 1 when the
newest checkpoint is damaged or there is none (a relaunch would fall back to an older one, or
start afresh), 0 otherwise; an older damaged checkpoint is reported but does not fail.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from msgfm.errors import MissingFileError


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def checkpoint_folders(path: Path) -> tuple[Path, list[Path]]:
    """(checkpoint root, folders to report: complete newest first, then set aside, then unfinished)."""
    from msgfm.train.checkpoint import complete_checkpoints, rejected_checkpoints
    from msgfm.train.manifest import COMPLETE

    if (path / COMPLETE).is_file() or (path / "mp_rank_00_model_states.pt").is_file():
        return path.parent, [path]
    for root in (path / "checkpoints", path):
        if root.is_dir() and any(p.name.startswith(("step", ".rejected-", ".tmp-")) for p in root.iterdir()):
            partial = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(".tmp-"))
            return root, [*reversed(complete_checkpoints(root)), *rejected_checkpoints(root), *partial]
    if not path.is_dir():
        raise MissingFileError(f"{path}: no such folder; pass a run folder (--output-dir of a run), its "
                               f"checkpoints folder or one checkpoint folder")
    return path, []


def table(folder: Path, sizes_only: bool) -> tuple[str, list[str]]:
    """(status: ok / damaged / unverifiable, the lines of the folder's table)."""
    from msgfm.train.manifest import CHECKSUM, ManifestError, check_file, file_checksum, read_manifest

    if not (folder / "COMPLETE").exists() and (folder / "mp_rank_00_model_states.pt").is_file():
        return "unverifiable", ["  no COMPLETE: a DeepSpeed checkpoint folder msgfm did not publish; cannot be "
                                "verified"]
    try:
        meta = read_manifest(folder)
    except ManifestError as err:
        return "damaged", [f"  COMPLETE: {err.why}"]
    files: dict[str, Any] | None = meta.get("files")
    if files is None:
        return "unverifiable", ["  COMPLETE lists no files (written before manifests): cannot be verified; "
                                "a relaunch loads it with a warning"]
    width = max([len(n) for n in files] + [4])
    lines = [f"  {'file':<{width}}  {'size':>10}  {'crc32':>8}  status (against the manifest)"]
    damaged = False
    for name in sorted(files):
        path = folder / name
        problem = check_file(folder, name, files[name], checksum=not sizes_only)
        damaged |= problem is not None
        size = _size(path.stat().st_size) if path.is_file() else "-"
        crc = "-" if sizes_only or not path.is_file() else files[name][CHECKSUM]
        if problem is not None and crc != "-":  # show what is on disk now
            try:
                crc = file_checksum(path)[1]
            except OSError:
                crc = "?"
        lines.append(f"  {name:<{width}}  {size:>10}  {crc:>8}  {'ok' if problem is None else problem.why}")
    return ("damaged" if damaged else "ok"), lines


def verify_run(path: Path, sizes_only: bool = False) -> int:
    """Print the tables for ``path``; returns the exit code."""
    root, folders = checkpoint_folders(path)
    if not folders:
        print(f"no checkpoint in {root}")
        return 1
    newest_status = None
    for folder in folders:
        if folder.name.startswith(".tmp-"):
            print(f"{folder}: unfinished save (nothing points to it; removed at the next start)\n")
            continue
        status, lines = table(folder, sizes_only)
        role = "set aside by a resume, never loaded" if folder.name.startswith(".rejected-") else None
        if role is None and newest_status is None:
            newest_status, role = status, "newest: a relaunch resumes from it" if status != "damaged" else "newest"
        print(f"{folder}: {status.upper()}" + (f" ({role})" if role else ""))
        print("\n".join(lines) + "\n")
    checked = "sizes" if sizes_only else "sizes and CRC-32"
    if newest_status == "damaged":
        print(f"the newest checkpoint is damaged ({checked} checked): a relaunch sets it aside and resumes from "
              f"the newest one that verifies")
        return 1
    if newest_status is None:
        print(f"no complete checkpoint in {root}")
        return 1
    print(f"the newest checkpoint is {'usable' if newest_status == 'ok' else 'unverifiable'} ({checked} checked)")
    return 0


def _run(args: argparse.Namespace) -> int:
    return verify_run(args.run_dir, sizes_only=args.sizes_only)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``msgfm verify``."""
    p = subparsers.add_parser("verify", help="check a run folder's checkpoints against their manifests",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                   help="a run folder (--output-dir), its checkpoints folder, or one checkpoint folder")
    p.add_argument("--sizes-only", action="store_true", help="check file sizes only, not the CRC-32 (fast)")
    p.set_defaults(func=_run)
