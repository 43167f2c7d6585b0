"""``msgfm inspect SHARD``: what a shard holds, read from its metadata.

Prints the layout (datasets, shapes, dtypes, chunks, compression), the sample count, the
per-sensor attributes, ids/coordinates, the georeference (CRS and transform, format v2),
labels, and the band statistics when a stats file is found beside the shard.
``--sample I`` adds where sample I lies (id, time, lat/lon, CRS, transform). A shard that
fails validation is still listed (raw HDF5 tree) after the validation error, so a damaged
file can be looked at.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np

from msgfm.data.format import ShardError, ShardInfo, read_shard_info
from msgfm.data.georef import CRS_DATASET, read_georef
from msgfm.data.stats import DEFAULT_STATS_NAME, MissingStatsError, default_stats_path, load_stats
from msgfm.errors import UserError
from msgfm.sensors import add_sensors_arg

_MAX_LISTED = 8  # ids and class names shown before "..."


def _short(values: list, total: int | None = None, limit: int = _MAX_LISTED) -> str:
    """The first ``limit`` values and how many there are (``total`` when only a head was read)."""
    total = len(values) if total is None else total
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if total > limit else ''}] ({total})"


def _layout(info: ShardInfo) -> list[str]:
    lines = []
    with h5py.File(info.path, "r") as f:
        for name, s in info.sensors.items():
            ds = f[name]
            lines.append(f"  /{name}: {s.shape} {s.dtype}, chunks {ds.chunks}, compression {s.compression}")
            lines.append(f"      bands {list(s.bands)}")
            lines.append(f"      wavelengths_nm {[None if np.isnan(w) else w for w in s.wavelengths_nm]}")
            lines.append(f"      gsd_m {s.gsd_m}, nodata {s.nodata}, scale {s.scale}, offset {s.offset}")
        if info.has_ids:
            lines.append(f"  /ids: {_short(list(f['ids'].asstr()[:_MAX_LISTED]), info.num_samples)}")
        for name in ("lat", "lon", "time"):
            if name in f:
                lines.append(f"  /{name}: {f[name].shape} {f[name].dtype}")
        lines += _georef_lines(info, f)
    for name, label in info.labels.items():
        lines.append(f"  /labels/{name}: {label.shape} {label.dtype}")
        for key, value in label.attrs.items():
            lines.append(f"      {key} {_short(value) if isinstance(value, list) else value}")
    return lines


def _georef_lines(info: ShardInfo, f: h5py.File) -> list[str]:
    if not info.has_georef:
        why = "format v1" if info.format_version == 1 else "the source had no CRS"
        return [f"  georeference: none ({why})"]
    crs_values = sorted(set(f[CRS_DATASET].asstr()[:]) - {""})
    first = read_georef(f, 0)
    return [f"  /crs, /transform: per sample; {len(crs_values)} distinct CRS {_short(crs_values, limit=3)}",
            f"      sample 0: {first.describe() if first else 'unknown'}"]


def describe_sample(path: str | Path, index: int) -> str:
    """Where sample ``index`` of a shard lies: id, time, lat/lon and georeference."""
    info = read_shard_info(path, check_data=False)
    if not 0 <= index < info.num_samples:
        raise UserError(f"{path}: --sample {index} is out of range; the shard holds {info.num_samples} samples "
                        f"(0 to {info.num_samples - 1})")
    with h5py.File(info.path, "r") as f:
        sample_id = f["ids"].asstr()[index] if info.has_ids else "(no ids)"
        lines = [f"sample {index}: id {sample_id}"]
        if info.has_time:
            lines.append(f"  time {f['time'].asstr()[index] or '(unknown)'}")
        if info.has_latlon:
            lines.append(f"  lat {f['lat'][index]:.6f}, lon {f['lon'][index]:.6f}")
        georef = read_georef(f, index)
        lines.append(f"  {georef.describe()}" if georef else "  georeference: none")
        if georef and len(georef.crs) > 60:
            lines.append(f"  crs (WKT) {georef.crs}")
    return "\n".join(lines)


def _raw_tree(path: Path) -> list[str]:
    lines: list[str] = []
    try:
        with h5py.File(path, "r") as f:
            lines += [f"  @{k} = {v!r}" for k, v in f.attrs.items()]
            f.visititems(lambda name, obj: lines.append(
                f"  /{name}: {obj.shape} {obj.dtype}" if isinstance(obj, h5py.Dataset) else f"  /{name}/"))
    except OSError as err:
        lines.append(f"  (not readable as HDF5: {err})")
    return lines


def _stats_lines(info: ShardInfo, stats_path: Path | None) -> list[str]:
    path = stats_path or default_stats_path([info.path], DEFAULT_STATS_NAME)
    try:
        stats = load_stats(path)
    except MissingStatsError:
        return [f"statistics: none at {path} (run `msgfm stats` on this group's shards)"]
    except ValueError as err:
        return [f"statistics: {err}"]
    listed = any((stats.path.parent / f.path).resolve() == info.path.resolve() for f in stats.files)
    lines = [f"statistics: {stats.path} ({stats.units} units, {stats.num_samples} samples, "
             f"{len(stats.files)} files, this shard {'included' if listed else 'NOT included'})"]
    for name in info.sensors:
        if name not in stats.sensors:
            lines.append(f"  {name}: no statistics")
            continue
        s = stats.sensors[name]
        for band, mean, std in zip(s.bands, s.mean, s.std):
            lines.append(f"  {name:>8} {band:>10}  mean {mean:12.5g}  std {std:12.5g}")
    return lines


def describe_shard(path: str | Path, stats_path: str | Path | None = None) -> str:
    """A human-readable description of a valid shard (raises ShardError for an invalid one)."""
    info = read_shard_info(path, check_data=False)
    size = info.path.stat().st_size
    lines = [f"{info.path} ({size / 2**20:.1f} MiB)" if size >= 2**20 else f"{info.path} ({size / 2**10:.1f} KiB)",
             f"format version {info.format_version}, group '{info.group}', sensors {list(info.sensors)}, "
             f"{info.num_samples} samples",
             "attributes: " + ", ".join(f"{k}={v}" for k, v in info.attrs.items()
                                        if k not in ("group", "sensors", "msgfm_format_version")),
             "layout:", *_layout(info)]
    if not info.labels:
        lines.append("labels: none")
    lines += _stats_lines(info, Path(stats_path) if stats_path else None)
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    status = 0
    for path in args.shards:
        try:
            print(describe_shard(path, args.stats))
        except ShardError as err:
            print(f"INVALID SHARD: {err}\nraw HDF5 content of {path}:\n" + "\n".join(_raw_tree(Path(path))))
            status = 1
        else:
            if args.sample is not None:
                print(describe_sample(path, args.sample))
        print()
    return status


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``msgfm inspect``."""
    p = subparsers.add_parser("inspect", help="print a shard's layout, attributes, labels and statistics",
                              description="Describe msgfm HDF5 shards from their metadata.")
    p.add_argument("shards", nargs="+", type=Path, metavar="SHARD")
    p.add_argument("--stats", type=Path, default=None,
                   help=f"stats JSON (default: {DEFAULT_STATS_NAME} beside the shard)")
    p.add_argument("--sample", type=int, default=None, metavar="I",
                   help="also show where sample I lies: id, time, lat/lon, CRS and transform")
    add_sensors_arg(p)
    p.set_defaults(func=_run)
