"""Tiny synthetic pretraining data in the real shard layout, for tests and benchmarks.

Every configured group gets one shard of smooth random fields (a few random
sinusoids per band plus a little noise: learnable, so the loss falls) written
with the format's :class:`~msgfm.data.format.ShardWriter`, and the band
statistics with :func:`~msgfm.data.stats.write_stats`, exactly where a run
config's ``data.groups[*].shards`` and ``data.stats_file`` look for them.
"""
from __future__ import annotations

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
        with ShardWriter(shard, group.name, specs, source="msgfm.train.synthetic") as writer:
            for i in range(samples_per_group):
                base = _field(rng, 1, size)  # shared structure: a pair's sensors see the same place
                images = {s: (base + 0.5 * _field(rng, spec.channels, size)).astype(np.float32)
                          for s, spec in specs.items()}
                writer.append(images, sample_id=f"{group.name}_{i:05d}")
        write_stats([shard], shard.parent / cfg.data.stats_file, progress=False)
    return root
