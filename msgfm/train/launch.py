"""What every launcher shares: DeepSpeed's arguments, dotted overrides, ``-v``, one-line user errors."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from msgfm.errors import user_message
from msgfm.train.checkpoint import find_latest

OVERRIDE_RE = re.compile(r"^[A-Za-z_][\w.\-]*=")  # dotted.key=value


def parse_launcher_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Add the arguments the deepspeed launcher and torchrun pass; parse ``argv``.

    ``dotted.key=value`` overrides may stand anywhere on the command line, before, between or after the
    options (``args.overrides``, in the order given); anything else argparse does not know is an error."""
    import deepspeed

    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks for user errors too")
    parser = deepspeed.add_config_arguments(parser)
    parser.usage = f"{parser.format_usage().removeprefix('usage: ').rstrip()} [dotted.key=value ...]"
    args, rest = parser.parse_known_args(argv)
    unknown = [item for item in rest if not OVERRIDE_RE.match(item)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides look like dotted.key=value)")
    args.overrides = rest
    if not args.deepspeed_config:
        parser.error("--deepspeed_config is required (e.g. ds_configs/v100x8.json or ds_configs/cpu.json)")
    return args


# The exit status of a process stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT = 130


def run_reporting_user_errors(name: str, job: Callable[[], int], verbose: bool = False,
                              output_dir: str | Path | None = None) -> int:
    """Run ``job``; an error the user caused (msgfm.errors.UserError, a path that is missing or not writable)
    ends as one line ``NAME: error: ...`` and exit 2; anything else keeps its traceback. ``verbose``: debug
    logging and a traceback for user errors too. Ctrl-C ends with exit 130 and one line (rank 0) saying
    which checkpoint of ``output_dir`` a relaunch resumes from.

    Ctrl-C reaches every rank of a launch; a rank blocked in a collective only sees it after a peer has
    left, as a communication error: any exception after a Ctrl-C counts as the interruption."""
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    with _ctrl_c_seen() as seen:
        try:
            return job()
        except KeyboardInterrupt:
            if verbose:
                raise
        except Exception as err:
            if not seen() or verbose:
                message = user_message(err)
                if message is None or verbose:
                    raise
                print(f"{name}: error: {message}", file=sys.stderr, flush=True)
                return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{name}: interrupted (Ctrl-C); {interrupted_line(output_dir)}", file=sys.stderr, flush=True)
    return INTERRUPTED_EXIT


@contextlib.contextmanager
def _ctrl_c_seen() -> Iterator[Callable[[], bool]]:
    """Record SIGINT (then raise KeyboardInterrupt as Python does); yields "was Ctrl-C pressed?"."""
    pressed = threading.Event()

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        pressed.set()
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield pressed.is_set
        return
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield pressed.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupted_line(output_dir: str | Path | None) -> str:
    """What an interrupted run kept, and how to go on: the newest complete checkpoint, or none."""
    if output_dir is None:
        return "nothing was saved"
    latest = find_latest(Path(output_dir) / "checkpoints")
    if latest is None:
        return (f"no checkpoint was saved in {output_dir} yet; the same command starts the run again from the "
                f"beginning")
    return (f"the newest complete checkpoint is {latest} (an unfinished save is removed at the next start); run "
            f"the same command again to resume from it")
