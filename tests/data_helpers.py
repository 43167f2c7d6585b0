"""Tiny seeded shards for the reader, statistics and scheduler tests, written with the real
ShardWriter (the on-disk layout users get from `msgfm convert`)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from msgfm.config import RunConfig, load_config
from msgfm.data.format import SensorArraySpec, ShardWriter


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


def tiny_config(groups: Sequence[Mapping], root: Path, *, img_size: int = 32, overrides: Sequence[str] = ()
                ) -> RunConfig:
    """demo_cpu shrunk to ``img_size`` with the given data groups (dicts as in the YAML)."""
    import yaml

    groups_yaml = yaml.safe_dump([dict(g) for g in groups], default_flow_style=True).strip()
    return load_config("demo_cpu", overrides=[f"model.img_size={img_size}", f"data.root={root}",
                                              "masking.mask_patch_size=16", f"data.groups={groups_yaml}",
                                              "data.pin_memory=false", *overrides])
