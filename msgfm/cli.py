"""The ``msgfm`` command. Each subcommand lives beside the code it drives and
registers itself through an ``add_parser(subparsers)`` function; this file only
lists them, so adding a command never means editing someone else's module."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from msgfm.errors import user_message

# The exit status of a process stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT = 130

# subcommand -> module holding its add_parser(subparsers)
COMMANDS = {
    "convert": "msgfm.data.convert",
    "stats": "msgfm.data.stats",
    "inspect": "msgfm.data.inspect",
    "prepare-sample": "msgfm.data.sample",
    "doctor": "msgfm.doctor",
    "verify": "msgfm.runfolder.verify",
    "track-sync": "msgfm.runfolder.track_sync",
    "export": "msgfm.export",
    "predict": "msgfm.predict",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msgfm", description="msGFM tools: convert rasters to HDF5 shards, "
                                     "compute band statistics, inspect shards, build the sample data; verify a "
                                     "run's checkpoints, replay its tracking into MLflow; export a trained model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.verbose:
            raise
        kept = getattr(args, "on_interrupt", None) or "nothing it had not finished was kept"
        print(f"msgfm {args.command}: interrupted (Ctrl-C); {kept}", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Exception as err:
        # errors the user caused: one clear line, no traceback (-v shows it); bugs keep theirs
        message = user_message(err)
        if message is None or args.verbose:
            raise
        print(f"msgfm {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
