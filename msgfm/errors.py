"""Errors meant for users: the launchers and ``msgfm`` print their message as one line.

Anything a user can cause and fix (a config typo, a missing file, a corrupt shard, a wrong band
count, an impossible parallel layout) raises a :class:`UserError` whose message names the file,
key or sensor and says what to do. Everything else is a bug or an environment failure and keeps
its full traceback. ``UserError`` is a ``ValueError`` so callers that caught ``ValueError`` keep
working; :class:`MissingFileError` is also a ``FileNotFoundError``.
"""
from __future__ import annotations


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
