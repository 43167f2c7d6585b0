"""Converters for the downstream datasets, in the ``msgfm convert`` style.

Each module has an ``add_parser(subparsers)`` that registers its kinds, like the
pretraining converters in msgfm/data/convert/. BigEarthNet needs none of its own:
``msgfm convert bigearthnet`` already writes the 19-class labels.

    KIND                 MODULE
    vaihingen            msgfm.finetune.datasets.vaihingen
    sen12mscr            msgfm.finetune.datasets.sen12mscr
    spacenet             msgfm.finetune.datasets.spacenet   (also registers spacenet-buildings)
"""
from __future__ import annotations

import argparse
import importlib

MODULES = ("msgfm.finetune.datasets.vaihingen", "msgfm.finetune.datasets.sen12mscr",
           "msgfm.finetune.datasets.spacenet")


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register every downstream converter kind under an existing ``convert`` sub-parser set."""
    for module in MODULES:
        importlib.import_module(module).add_parser(subparsers)


def run(argv: list[str]) -> int:
    """Run one downstream converter, e.g. ``run(["vaihingen", ROOT, "-o", OUT])``."""
    parser = argparse.ArgumentParser(prog="msgfm convert")
    add_parsers(parser.add_subparsers(dest="kind", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
