"""What every launcher shares: DeepSpeed's arguments, dotted overrides, ``-v``, one-line user errors."""
from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence

from msgfm.errors import user_message

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


def run_reporting_user_errors(name: str, job: Callable[[], int], verbose: bool = False) -> int:
    """Run ``job``; an error the user caused (msgfm.errors.UserError, a path that is missing or not writable)
    ends as one line ``NAME: error: ...`` and exit 2; anything else keeps its traceback. ``verbose``: debug
    logging and a traceback for user errors too."""
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    try:
        return job()
    except Exception as err:
        message = user_message(err)
        if message is None or verbose:
            raise
        print(f"{name}: error: {message}", file=sys.stderr, flush=True)
        return 2
