"""What every converter shares: the driver that loads items in worker processes and
writes shards, the skip report, tiling windows and the common command-line options.

A converter lists its *items* (a patch folder, an image file, a tile window), gives a
picklable ``load(item) -> LoadResult`` and the shard layout; :func:`run_conversion`
does the rest (:func:`run_splits_from_args` once per official split, one folder each):
loads items in ``--workers`` processes (in input order, so the output is the same for
any number of workers), writes shards of ``--samples-per-shard``
samples through :class:`~msgfm.data.format.ShardWriter` (temporary name, renamed when
complete, so re-running is safe), and reports what it skipped and why, on screen and
in ``<prefix>.skipped.json`` beside the shards.

Legend: C channels, H x W pixels.
"""
from __future__ import annotations

import argparse
import errno
import fnmatch
import json
import logging
import multiprocessing
import os
import re
import signal
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from msgfm.data.format import (
    LabelSpec,
    SensorArraySpec,
    ShardWriter,
    remove_own_partials,
    remove_stale_partials,
)
from msgfm.data.georef import Georef
from msgfm.errors import UserError, check_output_folder
from msgfm.sensors import add_sensors_arg, get_sensor, list_sensors, register_sensor

log = logging.getLogger(__name__)

# Errors that mean "this input is unusable", reported and skipped; anything else is a bug and propagates.
# (rasterio's RasterioIOError and PIL's UnidentifiedImageError are OSErrors.)
_SKIPPABLE = (OSError, ValueError, KeyError)


class SkipItem(Exception):
    """Raised by a loader for an input it leaves out on purpose; the message is the reason."""


@dataclass
class Sample:
    """One sample ready for a shard: ``images[sensor]`` is (C, H, W) in the sensor's stored dtype.

    ``georef``: CRS and transform of the sample's grid (every sensor's, after resampling onto it).
    """

    sample_id: str
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray] | None = None
    lat: float | None = None
    lon: float | None = None
    time: str | None = None
    georef: Georef | None = None


@dataclass
class LoadResult:
    """What loading one item gave: samples, and (id, reason) for the parts it skipped."""

    samples: list[Sample] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ConversionReport:
    shards: list[Path]
    num_samples: int
    skipped: list[tuple[str, str]]
    report_path: Path

    def summary(self) -> str:
        reasons = Counter(_reason_kind(reason) for _, reason in self.skipped)
        lines = [f"wrote {self.num_samples} samples in {len(self.shards)} shard(s); skipped {len(self.skipped)}"]
        lines += [f"  {count} x {reason}" for reason, count in reasons.most_common()]
        if self.skipped:
            lines.append(f"  details: {self.report_path}")
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    # Reasons read "what: details"; group by what, and merge those that differ in a measured
    # number only ("nodata fraction 0.42 > ..." and "nodata fraction 0.61 > ...").
    return re.sub(r"\d+\.\d+", "#", reason.split(":")[0])


def _load_safely(load: Callable[[Any], LoadResult], item: Any) -> tuple[Any, LoadResult]:
    try:
        return item, load(item)
    except SkipItem as err:
        return item, LoadResult(skipped=[(str(item), str(err))])
    except _SKIPPABLE as err:
        return item, LoadResult(skipped=[(str(item), f"unreadable: {type(err).__name__}: {err}")])


def run_conversion(*, items: Sequence[Any], load: Callable[[Any], LoadResult], output_dir: str | Path,
                   prefix: str, group: str, sensors: Mapping[str, SensorArraySpec],
                   labels: Sequence[LabelSpec] | None = None, compression: str | None = None,
                   samples_per_shard: int = 1000, workers: int = 1, source: str = "",
                   description: str = "converting",
                   skipped_before: Sequence[tuple[str, str]] = ()) -> ConversionReport:
    """Load every item (in ``workers`` processes), write shards ``<output_dir>/<prefix>-NNNNN.h5``.

    ``skipped_before`` lists (item, reason) the converter left out while listing its inputs
    (e.g. an S2 patch without S1 partner); they go into the same report.
    """
    if samples_per_shard < 1:
        raise UserError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if not items:
        reasons = "; ".join(f"{item}: {reason}" for item, reason in list(skipped_before)[:3])
        raise UserError(f"nothing to convert for {description}"
                        + (f": {len(skipped_before)} inputs left out, e.g. {reasons}" if reasons else ""))
    output_dir = check_output_folder(output_dir, "--output")
    stale = remove_stale_partials(output_dir)
    if stale:
        print(f"removed {len(stale)} unfinished shard file(s) that an interrupted conversion left in {output_dir}: "
              f"{[p.name for p in stale]}")
    shards: list[Path] = []
    skipped: list[tuple[str, str]] = list(skipped_before)
    writer: ShardWriter | None = None
    num_samples = 0

    def new_writer() -> ShardWriter:
        return ShardWriter(output_dir / f"{prefix}-{len(shards):05d}.h5", group, sensors, compression=compression,
                           labels=labels, source=source, created_by=f"msgfm convert ({description})")

    results: Iterable[tuple[Any, LoadResult]]
    pool = None
    if workers > 1:
        # the workers ignore Ctrl-C: the main process stops them, and no worker prints a traceback
        pool = multiprocessing.get_context("spawn" if os.name == "nt" else "fork").Pool(
            workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
        results = pool.imap(_LoadCall(load), items, chunksize=1)
    else:
        results = (_load_safely(load, item) for item in items)
    try:
        with tqdm(total=len(items), desc=description, unit="item", dynamic_ncols=True) as bar:
            for _, result in results:
                skipped.extend(result.skipped)
                for sample in result.samples:
                    if writer is None:
                        writer = new_writer()
                    writer.append(sample.images, sample.sample_id, labels=sample.labels, lat=sample.lat,
                                  lon=sample.lon, time=sample.time, georef=sample.georef)
                    num_samples += 1
                    if writer.num_samples == samples_per_shard:
                        shards.append(writer.close())
                        writer = None
                bar.update(1)
                bar.set_postfix(samples=num_samples, skipped=len(skipped))
        if writer is not None:
            shards.append(writer.close())
            writer = None
    finally:
        if writer is not None:
            writer.abort()
        remove_own_partials(output_dir)  # Ctrl-C may land before a new writer is assigned (then writer is None)
        if pool is not None:
            pool.terminate()
    report_path = output_dir / f"{prefix}.skipped.json"
    report = {"group": group, "source": source, "samples_written": num_samples,
              "shards": [p.name for p in shards],
              "skipped": [{"item": item, "reason": reason} for item, reason in skipped]}
    report_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if num_samples == 0:  # leave the shards of an earlier run as they are
        raise UserError(f"no sample could be converted ({len(skipped)} skipped); see {report_path}")
    _remove_stale_shards(output_dir, prefix, keep=len(shards))
    return ConversionReport(shards=shards, num_samples=num_samples, skipped=skipped, report_path=report_path)


class _LoadCall:
    """Picklable wrapper so that worker processes apply the skip rules too, and know the sensors
    registered here (--sensors): a spawned worker (Windows) starts with the built-in ones only."""

    def __init__(self, load: Callable[[Any], LoadResult]) -> None:
        self.load = load
        self.sensors = [get_sensor(name) for name in list_sensors()]

    def __call__(self, item: Any) -> tuple[Any, LoadResult]:
        for spec in self.sensors:
            register_sensor(spec, replace=True)
        return _load_safely(self.load, item)


def _remove_stale_shards(output_dir: Path, prefix: str, keep: int) -> None:
    # A previous run that produced more shards would otherwise leave them behind for the shard globs.
    pattern = re.compile(rf"{re.escape(prefix)}-(\d{{5}})\.h5")
    for path in output_dir.iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match.group(1)) >= keep:
            log.info("removing %s, left over from an earlier conversion with more shards", path)
            path.unlink()


# ---------------------------------------------------------------------------------------------- inputs


def find_inputs(root: Path, suffixes: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files under ``root`` (searched recursively, through symbolic links to folders) whose suffix is one of
    ``suffixes`` (lower case), sorted; and (path, reason) for what was left out: a symbolic link loop (a link
    to itself, or a folder link leading back to a folder searched already) and a broken link to an input."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    searched: set[str] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in searched:
            skipped.append((str(folder), f"symbolic link loop: leads back to {real}, searched already"))
            continue
        searched.add(real)
        with os.scandir(folder) as entries:
            found = sorted(entries, key=lambda e: e.name)
        for entry in found:
            path = Path(entry.path)
            if entry.is_symlink():
                try:
                    os.stat(path)
                except OSError as err:
                    if err.errno == errno.ELOOP:
                        skipped.append((str(path), "symbolic link loop: the link leads back to itself"))
                    elif path.suffix.lower() in suffixes:
                        skipped.append((str(path), f"broken symbolic link: its target {os.readlink(path)} does "
                                                   f"not exist"))
                    continue
            if entry.is_dir():  # follows a link: images in a linked folder are converted too
                stack.append(path)
            elif path.suffix.lower() in suffixes and entry.is_file():
                files.append(path)
    return sorted(files), skipped


def find_in_layout(root: Path, *patterns: str) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files under ``root`` (through linked folders, as :func:`find_inputs`) whose last path parts match
    ``patterns`` (fnmatch, case-sensitive; ``("s1_*", "*_s1_*.tif")``: a file in a folder ``s1_*``),
    sorted, like ``root.glob("**/s1_*/*_s1_*.tif")`` (which does not enter linked folders); and the links
    left out."""
    suffix = Path(patterns[-1]).suffix.lower()
    files, skipped = find_inputs(root, (suffix,))
    def matches(path: Path) -> bool:
        tail = path.relative_to(root).parts[-len(patterns):]
        return len(tail) == len(patterns) and all(map(fnmatch.fnmatchcase, tail, patterns))

    matching = [p for p in files if matches(p)]
    return matching, skipped


# ---------------------------------------------------------------------------------------------- tiling


def tile_offsets(height: int, width: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left (row, col) of every size x size tile that fits, stepping by ``stride``."""
    if size < 1 or stride < 1:
        raise UserError(f"--size and --stride must be >= 1, got {size} and {stride}")
    rows = range(0, height - size + 1, stride) if height >= size else []
    cols = range(0, width - size + 1, stride) if width >= size else []
    return [(r, c) for r in rows for c in cols]


def invalid_mask(array_CHW: np.ndarray, nodata: float | None) -> np.ndarray:
    """(H, W) bool: pixels where any band is nodata, NaN or infinite."""
    invalid_HW = np.zeros(array_CHW.shape[1:], dtype=bool)
    if array_CHW.dtype.kind == "f":
        invalid_HW |= ~np.isfinite(array_CHW).all(axis=0)
    if nodata is not None:
        invalid_HW |= (array_CHW == np.asarray(nodata).astype(array_CHW.dtype)).any(axis=0)
    return invalid_HW


def storage_dtype(dtype: str) -> str:
    """The shard dtype for a raster dtype: native where the format allows it, float32 otherwise."""
    from msgfm.data.format import SENSOR_DTYPES

    name = np.dtype(dtype).name
    return name if name in SENSOR_DTYPES else "float32"


# ---------------------------------------------------------------------------------------------- CLI


def positive_int(text: str) -> int:
    """Argparse type of counts and sizes: a whole number >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_common_args(parser: argparse.ArgumentParser, *, prefix: str) -> None:
    """The options every converter takes (and --sensors, for sensors declared in a YAML file)."""
    parser.add_argument("--output", "-o", required=True, type=Path, help="folder for the shards")
    parser.add_argument("--prefix", default=prefix,
                        help=f"shard file names are PREFIX-00000.h5, ... (default: {prefix})")
    parser.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1),
                        help="processes reading the inputs (default: min(4, CPUs))")
    parser.add_argument("--samples-per-shard", type=positive_int, default=1000,
                        help="samples per shard file (default 1000)")
    parser.add_argument("--compression", choices=["none", "lzf", "gzip"], default="lzf",
                        help="HDF5 compression of the sensor datasets (default lzf: fast; gzip: smaller, slower)")
    add_sensors_arg(parser)
    parser.set_defaults(on_interrupt="the shards finished so far are complete and the unfinished one was removed; "
                                     "run the same command again to convert everything (it rewrites the shards)")


def run_from_args(args: argparse.Namespace, **kwargs: Any) -> ConversionReport:
    """run_conversion with the common options taken from ``args``; prints the report."""
    report = run_conversion(output_dir=args.output, prefix=args.prefix, workers=args.workers,
                            samples_per_shard=args.samples_per_shard,
                            compression=None if args.compression == "none" else args.compression, **kwargs)
    print(report.summary())
    return report


# ---------------------------------------------------------------------------------------------- splits

# Folder of each split under --output: what the fine-tuning configs read (data.train: ["train/*.h5"], ...).
SPLITS = ("train", "val", "test")


def run_splits_from_args(args: argparse.Namespace, *, splits: Mapping[str, Sequence[Any]],
                         load: Callable[[Any], LoadResult] | Mapping[str, Callable[[Any], LoadResult]],
                         skipped_in_split: Mapping[str, Sequence[tuple[str, str]]] | None = None,
                         skipped_outside: Sequence[tuple[str, str]] = (), description: str,
                         **kwargs: Any) -> dict[str, ConversionReport]:
    """Convert each split's items into ``<output>/<split>/``, as run_from_args does for one folder.

    ``load`` is one loader, or one per split (e.g. evaluation tiles without overlap).

    ``skipped_in_split[split]`` lists what the converter left out of a split while listing it
    (reported in that split's folder); ``skipped_outside`` what belongs to no split (e.g. a
    patch in none of the official lists), reported in ``<output>/<prefix>.skipped.json`` with
    the samples and shards per split. A split without items is reported and left empty.
    """
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise UserError(f"unknown split(s) {unknown}; splits are {list(SPLITS)}")
    if not any(splits.values()):
        raise UserError(f"nothing to convert for {description}: no item in any split; "
                        f"{len(skipped_outside)} left out, e.g. {list(skipped_outside)[:3]}")
    output = check_output_folder(args.output, "--output")
    reports: dict[str, ConversionReport] = {}
    summary: dict[str, Any] = {}
    for split in SPLITS:
        items = list(splits.get(split, ()))
        left_out = list((skipped_in_split or {}).get(split, ()))
        if not items:
            print(f"{split}: nothing to convert ({len(left_out)} left out)")
            if (output / split).is_dir():
                _remove_stale_shards(output / split, args.prefix, keep=0)
            summary[split] = {"samples": 0, "shards": [], "skipped": len(left_out)}
            continue
        print(f"{split}: {len(items)} item(s) -> {output / split}")
        args_split = argparse.Namespace(**{**vars(args), "output": output / split})
        split_load = load[split] if isinstance(load, Mapping) else load
        reports[split] = run_from_args(args_split, items=items, load=split_load, skipped_before=left_out,
                                       description=f"{description} {split}", **kwargs)
        summary[split] = {"samples": reports[split].num_samples,
                          "shards": [p.relative_to(output).as_posix() for p in reports[split].shards],
                          "skipped": len(reports[split].skipped)}
    report_path = output / f"{args.prefix}.skipped.json"
    report = {"group": kwargs.get("group", ""), "source": kwargs.get("source", ""),
              "samples_written": sum(s["samples"] for s in summary.values()), "splits": summary,
              "skipped": [{"item": item, "reason": reason} for item, reason in skipped_outside]}
    report_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    reasons = Counter(_reason_kind(reason) for _, reason in skipped_outside)
    print(f"in no split: {len(skipped_outside)} left out" + "".join(f"\n  {n} x {r}" for r, n in reasons.most_common())
          + (f"\n  details: {report_path}" if skipped_outside else ""))
    return reports
