"""Per-band statistics of a set of shards: ``msgfm stats SHARDS...``.

Mean and standard deviation (population, ddof=0) of every band of every sensor, in
physical units (``raw * scale + offset``, the shard's attributes), over the valid pixels
only: nodata values (compared on the raw value), NaN and +-Inf are left out. The readers
normalize in the same units, so shards written with different scale/offset share one set
of statistics. Integer data (uint8, uint16, int16) is counted in exact per-band histograms
of the raw values; float data streams in blocks through float64 moments; both merge with
Chan's parallel update (no sum-of-squares cancellation, no whole-dataset array).

The result goes to ``stats.json`` in the common parent folder of the shards (beside them)
with the list of files it came from (path relative to the JSON, size, mtime, samples), so
a reader can warn when the shards changed since. Training copies it into checkpoints.
Missing statistics are an error that says which command to run; there is no default.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shlex
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from msgfm.data.format import ShardInfo, read_shard_info
from msgfm.errors import MissingFileError, UserError
from msgfm.sensors import add_sensors_arg

log = logging.getLogger(__name__)

STATS_VERSION = 1
DEFAULT_STATS_NAME = "stats.json"
# Upper bound of one float64 working block; sized so a block of 12-band S2 samples stays small.
_BLOCK_BYTES = 16 * 2**20


class MissingStatsError(MissingFileError):
    """No statistics file for a set of shards; the message gives the command that makes one."""


@dataclass(frozen=True, kw_only=True)
class SensorStats:
    """Per-band statistics of one sensor, in physical units."""

    name: str
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    valid_pixels: tuple[int, ...]  # pixels that entered each band's statistics


@dataclass(frozen=True, kw_only=True)
class SourceFile:
    """A shard the statistics were computed from."""

    path: str  # relative to the stats file's folder
    size: int
    mtime: float
    num_samples: int


@dataclass(frozen=True, kw_only=True)
class Stats:
    """A loaded ``stats.json``."""

    path: Path
    sensors: dict[str, SensorStats]
    files: tuple[SourceFile, ...]
    num_samples: int  # samples that entered the statistics
    max_samples: int | None
    seed: int
    units: str = "physical"

    def sensor(self, name: str) -> SensorStats:
        try:
            return self.sensors[name]
        except KeyError:
            raise MissingStatsError(f"{self.path} has no statistics for sensor '{name}' (it has "
                                    f"{sorted(self.sensors)}); run `msgfm stats` on shards that hold "
                                    f"'{name}'") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what checkpoints and MLflow record)."""
        return {"path": str(self.path), "units": self.units, "num_samples": self.num_samples,
                "max_samples": self.max_samples, "seed": self.seed,
                "sensors": {n: {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}
                            for n, s in self.sensors.items()},
                "files": [asdict(f) for f in self.files]}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], path: str | Path) -> Stats:
        """The inverse of :meth:`to_dict` (statistics a checkpoint or a run folder recorded); ``path``
        names where ``doc`` was read, for messages."""
        try:
            sensors = {n: SensorStats(name=n, bands=tuple(s["bands"]), mean=tuple(float(v) for v in s["mean"]),
                                      std=tuple(float(v) for v in s["std"]),
                                      valid_pixels=tuple(int(v) for v in s.get("valid_pixels", ())))
                       for n, s in doc["sensors"].items()}
            files = tuple(SourceFile(**f) for f in doc.get("files", []))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path}: the recorded statistics are incomplete ({err!r})") from None
        for name, s in sensors.items():
            if len(s.mean) != len(s.bands) or len(s.std) != len(s.bands) or min(s.std, default=1.0) <= 0:
                raise UserError(f"{path}: recorded statistics of sensor '{name}' need one mean and one std > 0 "
                                f"per band {list(s.bands)}")
        return cls(path=Path(path), sensors=sensors, files=files, num_samples=int(doc.get("num_samples", 0)),
                   max_samples=doc.get("max_samples"), seed=int(doc.get("seed", 0)),
                   units=doc.get("units", "physical"))

    def source_changes(self, shard_paths: Sequence[str | Path]) -> list[str]:
        """How ``shard_paths`` differ from the files the statistics came from (empty: none)."""
        recorded = {f.path: f for f in self.files}
        current = {os.path.relpath(Path(p).resolve(), self.path.parent.resolve()): Path(p) for p in shard_paths}
        changes = [f"not in the statistics: {rel}" for rel in sorted(set(current) - set(recorded))]
        changes += [f"in the statistics but not used: {rel}" for rel in sorted(set(recorded) - set(current))]
        for rel in sorted(set(current) & set(recorded)):
            st = current[rel].stat()
            if st.st_size != recorded[rel].size or abs(st.st_mtime - recorded[rel].mtime) > 1e-3:
                changes.append(f"changed since the statistics (size or mtime): {rel}")
        return changes


# ------------------------------------------------------------------------------------------ computing


class _BandMoments:
    """Streaming per-band count, mean and M2 (sum of squared deviations), float64."""

    def __init__(self, channels: int) -> None:
        self.count = np.zeros(channels, np.int64)
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)

    def add(self, x_CP: np.ndarray, valid_CP: np.ndarray) -> None:
        """Merge a block: x [C, P] physical values (float64), valid [C, P] bool."""
        count = valid_CP.sum(axis=1)
        mean = np.where(valid_CP, x_CP, 0.0).sum(axis=1) / np.maximum(count, 1)
        dev = np.where(valid_CP, x_CP - mean[:, None], 0.0)
        self.merge(count, mean, np.einsum("cp,cp->c", dev, dev))

    def merge(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        """Chan et al.'s pairwise update with another set's per-band count, mean and M2."""
        total = self.count + count
        delta = mean - self.mean
        ratio = np.divide(count, total, out=np.zeros_like(self.mean), where=total > 0)
        self.mean = self.mean + delta * ratio
        self.m2 = self.m2 + m2 + delta**2 * self.count * ratio
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / np.maximum(self.count, 1))


class _SensorAccumulator:
    """Statistics of one sensor. Integer data of at most 16 bits goes into exact per-band
    histograms of the raw values (one np.bincount per band and block: fast, and nodata is
    one bin to drop), converted to physical moments at the end; float data is streamed
    through :class:`_BandMoments` with NaN/Inf/nodata masked."""

    def __init__(self, channels: int) -> None:
        self.moments = _BandMoments(channels)
        # (dtype, nodata, scale, offset) -> [C, 2**bits] counts: shards may differ in scale/offset
        self.histograms: dict[tuple[str, float | None, float, float], np.ndarray] = {}

    def add(self, raw_BCHW: np.ndarray, nodata: float | None, scale: float, offset: float) -> None:
        dtype = raw_BCHW.dtype
        channels = raw_BCHW.shape[1]
        if dtype.kind in "ui" and dtype.itemsize <= 2:
            key = (dtype.str, nodata, scale, offset)
            if key not in self.histograms:
                self.histograms[key] = np.zeros((channels, 2 ** (8 * dtype.itemsize)), np.int64)
            hist = self.histograms[key]
            shift = -int(np.iinfo(dtype).min)  # int16 -> bins 0..65535
            for c in range(channels):
                values = raw_BCHW[:, c].ravel()
                hist[c] += np.bincount(values.astype(np.int32) + shift if shift else values, minlength=hist.shape[1])
            return
        valid_BCHW = np.isfinite(raw_BCHW)
        if nodata is not None:
            valid_BCHW &= raw_BCHW != nodata
        x_BCHW = raw_BCHW.astype(np.float64) * scale + offset
        # [B,C,H,W] -> [C, B*H*W]
        self.moments.add(x_BCHW.transpose(1, 0, 2, 3).reshape(channels, -1),
                         valid_BCHW.transpose(1, 0, 2, 3).reshape(channels, -1))

    def finish(self) -> _BandMoments:
        for (dtype, nodata, scale, offset), hist in self.histograms.items():
            raw_values = np.arange(hist.shape[1]) + np.iinfo(np.dtype(dtype)).min
            counts = hist.copy()
            if nodata is not None and float(nodata).is_integer() and raw_values[0] <= nodata <= raw_values[-1]:
                counts[:, int(nodata) - raw_values[0]] = 0
            physical = raw_values * scale + offset
            count = counts.sum(axis=1)
            mean = (counts * physical).sum(axis=1) / np.maximum(count, 1)
            m2 = (counts * (physical[None, :] - mean[:, None]) ** 2).sum(axis=1)
            self.moments.merge(count, mean, m2)
        self.histograms.clear()
        return self.moments


def _selection(infos: Sequence[ShardInfo], max_samples: int | None, seed: int) -> list[np.ndarray]:
    """Sample indices to read from each shard: all, or a seeded subset of ``max_samples``."""
    counts = [info.num_samples for info in infos]
    total = sum(counts)
    if max_samples is None or max_samples >= total:
        return [np.arange(n) for n in counts]
    if max_samples < 1:
        raise UserError(f"--max-samples must be >= 1, got {max_samples}")
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=max_samples, replace=False))
    starts = np.cumsum([0] + counts)
    return [chosen[(chosen >= lo) & (chosen < hi)] - lo for lo, hi in zip(starts[:-1], starts[1:])]


def _blocks(indices: np.ndarray, block: int) -> Iterator[slice | np.ndarray]:
    """Consecutive runs of at most ``block`` indices (contiguous runs read as one slice)."""
    for start in range(0, len(indices), block):
        chunk = indices[start:start + block]
        if len(chunk) and chunk[-1] - chunk[0] == len(chunk) - 1:
            yield slice(int(chunk[0]), int(chunk[-1]) + 1)
        else:
            yield chunk


def _accumulate(path: Path, info: ShardInfo, indices: np.ndarray, accumulators: dict[str, _SensorAccumulator],
                progress: tqdm) -> None:
    with h5py.File(path, "r") as f:
        for name, sensor in info.sensors.items():
            _, channels, height, width = sensor.shape
            block = max(1, _BLOCK_BYTES // (channels * height * width * 8))
            for sel in _blocks(indices, block):
                raw_BCHW = f[name][sel] if isinstance(sel, slice) else np.stack([f[name][int(i)] for i in sel])
                accumulators[name].add(raw_BCHW, sensor.nodata, sensor.scale, sensor.offset)
                if name == next(iter(info.sensors)):
                    progress.update(raw_BCHW.shape[0])


def default_stats_path(shard_paths: Sequence[str | Path], name: str = DEFAULT_STATS_NAME) -> Path:
    """``name`` in the deepest folder that holds all the shards."""
    parents = [str(Path(p).resolve().parent) for p in shard_paths]
    return Path(os.path.commonpath(parents)) / name


def write_stats(shard_paths: Sequence[str | Path], output: str | Path | None = None,
                max_samples: int | None = None, seed: int = 0, *, progress: bool = True) -> Path:
    """Compute per-band statistics of the shards' sensors and write them as JSON.

    ``output`` defaults to ``stats.json`` beside the shards (:func:`default_stats_path`);
    ``max_samples`` picks a seeded random subset of all samples. Returns the JSON's path.
    Every shard must hold the same sensors (one data group per statistics file).
    """
    paths = [Path(p) for p in shard_paths]
    if not paths:
        raise UserError("no shards given; pass shard files or a glob such as 'data/rgb/*.h5'")
    infos = [read_shard_info(p, check_data=False) for p in paths]
    sensor_sets = {tuple(info.sensors) for info in infos}
    if len(sensor_sets) > 1:
        detail = "; ".join(f"{p}: {list(i.sensors)}" for p, i in zip(paths, infos))
        raise UserError(f"the shards hold different sensors ({detail}); compute statistics per data group")
    first = infos[0]
    accumulators = {name: _SensorAccumulator(s.channels) for name, s in first.sensors.items()}
    selection = _selection(infos, max_samples, seed)
    total = int(sum(len(s) for s in selection))
    with tqdm(total=total, unit="sample", desc="stats", disable=not progress) as bar:
        for path, info, indices in zip(paths, infos, selection):
            if len(indices):
                _accumulate(path, info, indices, accumulators, bar)

    out = Path(output) if output is not None else default_stats_path(paths)
    sensors = {}
    for name, accumulator in accumulators.items():
        acc = accumulator.finish()
        bands = first.sensors[name].bands
        mean, std = acc.mean.copy(), acc.std
        for c, band in enumerate(bands):
            if acc.count[c] == 0:
                warnings.warn(f"stats: sensor '{name}' band '{band}' has no valid pixel in the {total} samples "
                              f"read (all nodata/NaN); recording mean 0, std 1", stacklevel=2)
                mean[c], std[c] = 0.0, 1.0
            elif std[c] == 0:
                warnings.warn(f"stats: sensor '{name}' band '{band}' is constant ({mean[c]}); recording std 1 "
                              f"so that normalization leaves it at 0", stacklevel=2)
                std[c] = 1.0
        sensors[name] = {"bands": list(bands), "mean": mean.tolist(), "std": std.tolist(),
                         "valid_pixels": acc.count.tolist()}
    files = []
    for path, info in zip(paths, infos):
        st = path.stat()
        files.append({"path": os.path.relpath(path.resolve(), out.parent.resolve()), "size": st.st_size,
                      "mtime": st.st_mtime, "num_samples": info.num_samples})
    doc = {"msgfm_stats_version": STATS_VERSION, "units": "physical", "num_samples": total,
           "max_samples": max_samples, "seed": seed, "groups": sorted({i.group for i in infos}),
           "sensors": sensors, "files": files}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------- loading


def load_stats(path: str | Path, *, hint: str | None = None) -> Stats:
    """Read a stats JSON written by :func:`write_stats`.

    ``hint`` names the shards (quoted globs, as typed in a shell) for the error message when
    the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        target = hint or shlex.quote(f"{path.parent}/*.h5")
        raise MissingStatsError(f"no band statistics at {path}; compute them with `msgfm stats {target}` "
                                f"(msgfm never falls back to default statistics)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable stats JSON ({err}); run `msgfm stats` again") from None
    if doc.get("msgfm_stats_version") != STATS_VERSION:
        raise UserError(f"{path}: stats version {doc.get('msgfm_stats_version')!r}, this msgfm reads "
                        f"{STATS_VERSION}; run `msgfm stats` again")
    sensors = {}
    for name, s in doc["sensors"].items():
        mean, std = np.asarray(s["mean"], np.float64), np.asarray(s["std"], np.float64)
        if mean.shape != std.shape or mean.shape != (len(s["bands"]),):
            raise UserError(f"{path}: sensor '{name}' needs one mean and one std per band {s['bands']}")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise UserError(f"{path}: sensor '{name}' has non-finite means or non-positive stds; "
                            f"run `msgfm stats` again")
        sensors[name] = SensorStats(name=name, bands=tuple(s["bands"]), mean=tuple(mean.tolist()),
                                    std=tuple(std.tolist()), valid_pixels=tuple(s.get("valid_pixels", ())))
    files = tuple(SourceFile(**f) for f in doc.get("files", []))
    return Stats(path=path, sensors=sensors, files=files, num_samples=int(doc.get("num_samples", 0)),
                 max_samples=doc.get("max_samples"), seed=int(doc.get("seed", 0)), units=doc.get("units", "physical"))


# ----------------------------------------------------------------------------------------------- CLI


def expand_shard_args(patterns: Sequence[str]) -> list[Path]:
    """Files and (quoted) globs -> sorted unique shard paths; a pattern matching nothing is an error."""
    paths: dict[Path, None] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise MissingFileError(f"no shard matches '{pattern}'")
        paths.update(dict.fromkeys(Path(m) for m in matches))
    return list(paths)


def _run(args: argparse.Namespace) -> int:
    paths = expand_shard_args(args.shards)
    out = write_stats(paths, args.output, args.max_samples, args.seed, progress=not args.quiet)
    stats = load_stats(out)
    print(f"wrote {out}: {stats.num_samples} samples from {len(stats.files)} shards")
    for name, s in stats.sensors.items():
        for band, mean, std in zip(s.bands, s.mean, s.std):
            print(f"  {name:>8} {band:>10}  mean {mean:12.5g}  std {std:12.5g}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``msgfm stats``."""
    p = subparsers.add_parser("stats", help="per-band mean/std of shards, written beside them",
                              description="Compute per-band mean and std (physical units, valid pixels only) "
                                          "of every sensor in the given shards of one data group.")
    p.add_argument("shards", nargs="+", metavar="SHARDS", help="shard files or quoted globs ('data/rgb/*.h5')")
    p.add_argument("--output", type=Path, default=None,
                   help=f"stats JSON (default: {DEFAULT_STATS_NAME} in the shards' common folder)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="use a seeded random subset of this many samples (tens of thousands give stable "
                        "statistics; every sample of a large group takes long)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sensors_arg(p)
    p.set_defaults(func=_run)
