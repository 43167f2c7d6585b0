"""Errors meant for users: the launchers and ``msgfm`` print their message as one line.

Anything a user can cause and fix (a config typo, a missing file, a corrupt shard, a wrong band
count, an impossible parallel layout) raises a :class:`UserError` whose message names the file,
key or sensor and says what to do. Everything else is a bug or an environment failure and keeps
its full traceback. ``UserError`` is a ``ValueError`` so callers that caught ``ValueError`` keep
working; :class:`MissingFileError` is also a ``FileNotFoundError``.
"""
from __future__ import annotations

import os
from pathlib import Path


class UserError(ValueError):
    """Something the user can fix; the message says what and how."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or a command should have written) does not exist."""


# Operating-system errors about a path the user named: reported as one line like UserError.
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def user_message(err: BaseException) -> str | None:
    """The one line to show for an error the user caused, or None for a bug (keep its traceback)."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError) and err.errno == 28:  # ENOSPC, whatever raised it
        return f"no space left on device{f' writing {err.filename}' if err.filename else ''}: free some space"
    if isinstance(err, PATH_ERRORS) and err.filename is not None:
        reason = (err.strerror or type(err).__name__).lower()
        return f"{reason}: {err.filename}"
    return None


def check_output_folder(path: str | Path, option: str, *, create: bool = True) -> Path:
    """``path`` as a folder this process can write (created with its parents when ``create``), or a
    UserError naming ``option`` (e.g. ``--output-dir``): a file in the way, a file among its parents,
    a folder without write permission."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder; give a folder (it is created if missing)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a link to nowhere (or a loop) cannot hold a folder
            raise UserError(f"{option} {path}: {existing} is a broken or looping symbolic link; remove it or "
                            f"give another folder")
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {path}: {existing} is a file, so no folder can be created under it; give "
                        f"another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: permission denied: {existing} is not writable by this user; give a "
                        f"folder you can write, or change its permissions")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"{option} {path}: cannot create it ({err.strerror or err}); give another "
                            f"folder") from None
    return path
