"""Synthetic shards in the real layout: the one home of fake data for tests, benchmarks and ``msgfm doctor``.

- :func:`write_synthetic_data`: every group of a run config gets one shard of smooth random
  fields (a few random sinusoids per band plus a little noise: learnable, so the loss falls)
  and its band statistics, exactly where ``data.groups[*].shards`` and ``data.stats_file`` look.
- :func:`write_shard` / :func:`random_arrays`: one shard of given arrays, and plausible raw
  values per sensor in their storage dtypes, for reader, statistics and format tests.

Everything is written with the format's :class:`~msgfm.data.format.ShardWriter` (the layout
``msgfm convert`` produces). Raw dataset layouts (GeoTIFF folders) for the converter tests are
written by the scripts in tests/fixtures/.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from msgfm.config import RunConfig
from msgfm.data.format import SensorArraySpec, ShardWriter
from msgfm.data.stats import write_stats
from msgfm.sensors import get_sensor


def _field(rng: np.random.Generator, channels: int, size: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = np.zeros((channels, size, size), np.float32)
    for _ in range(3):
        fy, fx = rng.uniform(0.5, 3.0, 2)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
        out += rng.uniform(0.5, 1.5, (channels, 1, 1)).astype(np.float32) * wave
    return out + 0.05 * rng.standard_normal(out.shape).astype(np.float32)


def write_synthetic_data(cfg: RunConfig, root: str | Path, samples_per_group: int, seed: int = 0) -> Path:
    """Write ``samples_per_group`` samples per group of ``cfg`` under ``root``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    size = cfg.model.img_size
    for group in cfg.data.groups:
        pattern = group.shards[0] if group.shards else f"{group.name}/*.h5"
        shard = root / pattern.replace("*", "part0")
        specs = {s: SensorArraySpec(dtype="float32", channels=get_sensor(s).num_channels, height=size, width=size)
                 for s in group.sensors}
        with ShardWriter(shard, group.name, specs, source="msgfm.data.synthetic") as writer:
            for i in range(samples_per_group):
                base = _field(rng, 1, size)  # shared structure: a pair's sensors see the same place
                images = {s: (base + 0.5 * _field(rng, spec.channels, size)).astype(np.float32)
                          for s, spec in specs.items()}
                writer.append(images, sample_id=f"{group.name}_{i:05d}")
        write_stats([shard], shard.parent / cfg.data.stats_file, progress=False)
    return root


def write_shard(path: Path, group: str, arrays: Mapping[str, np.ndarray], *,
                nodata: Mapping[str, float] | None = None, scale: Mapping[str, float] | None = None,
                offset: Mapping[str, float] | None = None, compression: str | None = None,
                ids: Sequence[str] | None = None) -> Path:
    """One shard holding ``arrays[sensor]`` of shape (N, C, H, W)."""
    nodata, scale, offset = dict(nodata or {}), dict(scale or {}), dict(offset or {})
    num = len(next(iter(arrays.values())))
    specs = {s: SensorArraySpec(dtype=a.dtype.name, channels=a.shape[1], height=a.shape[2], width=a.shape[3],
                                nodata=nodata.get(s), scale=scale.get(s, 1.0), offset=offset.get(s, 0.0))
             for s, a in arrays.items()}
    with ShardWriter(path, group, specs, compression=compression) as writer:
        for i in range(num):
            writer.append({s: a[i] for s, a in arrays.items()},
                          sample_id=ids[i] if ids is not None else f"{group}/{path.stem}/{i}")
    return path


def random_arrays(sensors: Sequence[str], num: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """Plausible raw values per sensor: rgb uint8, s2 uint16, sar float32 dB, dsm float32 metres."""
    rng = np.random.default_rng(seed)
    channels = {"rgb": 3, "s2": 12, "sar": 2, "dsm": 1}
    out = {}
    for s in sensors:
        shape = (num, channels[s], size, size)
        if s == "rgb":
            out[s] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif s == "s2":
            out[s] = rng.integers(0, 10000, shape, dtype=np.uint16)
        elif s == "sar":
            out[s] = rng.normal(-12, 4, shape).astype(np.float32)
        else:
            out[s] = rng.normal(100, 30, shape).astype(np.float32)
    return out
