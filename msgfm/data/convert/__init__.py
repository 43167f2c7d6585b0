"""``msgfm convert <kind>``: converters from the real on-disk formats to msgfm HDF5 shards.

Each kind lives in its own module with an ``add_parser(subparsers)``; shared machinery
(worker processes, progress, atomic shard writes, the skip report) is in ``common``.
"""
from __future__ import annotations

import argparse
import importlib

# kind -> module providing add_parser(subparsers)
KINDS = {
    "bigearthnet": "msgfm.data.convert.bigearthnet",
    "sen12ms": "msgfm.data.convert.sen12ms",
    "raster-pair": "msgfm.data.convert.raster_pair",
    "imagefolder": "msgfm.data.convert.imagefolder",
    "geotiff": "msgfm.data.convert.geotiff",
    # downstream datasets; spacenet also registers spacenet-buildings
    "vaihingen": "msgfm.data.convert.vaihingen",
    "sen12mscr": "msgfm.data.convert.sen12mscr",
    "spacenet": "msgfm.data.convert.spacenet",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``msgfm convert`` and one sub-command per input kind."""
    parser = subparsers.add_parser("convert", help="convert raw rasters or images to HDF5 shards",
                                   description="Convert a dataset in its published layout to msgfm HDF5 shards "
                                               "(format: docs/data_format.md).")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for module in KINDS.values():
        importlib.import_module(module).add_parser(kinds)


def run(argv: list[str]) -> int:
    """Run ``msgfm convert`` with ``argv`` (e.g. ["bigearthnet", "--s1", ...]) without the other commands."""
    parser = argparse.ArgumentParser(prog="msgfm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *argv])
    return int(args.func(args) or 0)
