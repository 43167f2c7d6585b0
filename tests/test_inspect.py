"""`msgfm inspect`: layout, sample count, dtypes, attributes, labels and statistics."""
from __future__ import annotations

import argparse

import h5py
import numpy as np

from msgfm.data import inspect as inspect_module
from msgfm.data.format import LabelSpec, SensorArraySpec, ShardWriter, multilabel_spec
from msgfm.data.georef import Georef
from msgfm.data.stats import write_stats
from msgfm.data.synthetic import random_arrays, write_shard


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    inspect_module.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_inspect_prints_layout_attributes_labels_and_stats(tmp_path, capsys):
    path = tmp_path / "ben" / "b0.h5"
    specs = {"sar": SensorArraySpec(dtype="float32", channels=2, height=8, width=8),
             "s2": SensorArraySpec(dtype="uint16", channels=12, height=8, width=8, nodata=0, scale=1e-4)}
    arrays = random_arrays(["sar", "s2"], 3, 8, 0)
    labels = [multilabel_spec(["forest", "water", "urban"])]
    assert isinstance(labels[0], LabelSpec)
    with ShardWriter(path, "bigearthnet", specs, compression="lzf", labels=labels, source="test") as writer:
        for i in range(3):
            writer.append({s: a[i] for s, a in arrays.items()}, f"patch_{i}",
                          labels={"multilabel": np.array([1, 0, i % 2], np.uint8)},
                          georef=Georef(crs="EPSG:32633", transform=(10, 0, 399960 + 80 * i, 0, -10, 5300040)))
    assert _run(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for needle in ("group 'bigearthnet'", "3 samples", "/s2: (3, 12, 8, 8) uint16", "compression lzf",
                   "nodata 0.0, scale 0.0001", "'B01'", "/ids: [patch_0, patch_1, patch_2] (3)",
                   "/labels/multilabel: (3, 3) uint8", "forest", "source=test", "statistics: none at",
                   "msgfm stats", "/crs, /transform: per sample; 1 distinct CRS [EPSG:32633] (1)",
                   "sample 0: crs EPSG:32633, transform (10, 0, 399960, 0, -10, 5300040)"):
        assert needle in out, needle
    write_stats([path], progress=False)
    assert _run(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "this shard included" in out and "B12" in out and "mean" in out


def test_inspect_lists_a_broken_shard_and_fails(tmp_path, capsys):
    path = write_shard(tmp_path / "r.h5", "rgb", random_arrays(["rgb"], 2, 8, 0))
    with h5py.File(path, "r+") as f:
        f.attrs["msgfm_format_version"] = 7
    assert _run(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert "INVALID SHARD" in out and "version 7" in out and "/rgb: (2, 3, 8, 8) uint8" in out


def test_inspect_sample_shows_where_it_lies(tmp_path, capsys):
    path = tmp_path / "g.h5"
    with ShardWriter(path, "rgb", {"rgb": SensorArraySpec(dtype="uint8", channels=3, height=8, width=8)}) as writer:
        for i in range(2):
            writer.append({"rgb": np.zeros((3, 8, 8), np.uint8)}, f"tile_{i}", lat=40.0 + i, lon=-105.0,
                          georef=Georef(crs="EPSG:4326", transform=(0.001, 0, -105 + i, 0, -0.001, 40 + i)))
    assert _run(["inspect", str(path), "--sample", "1"]) == 0
    out = capsys.readouterr().out
    assert "sample 1: id tile_1" in out and "lat 41.000000, lon -105.000000" in out
    assert "crs EPSG:4326, transform (0.001, 0, -104, 0, -0.001, 41)" in out


def test_inspect_version_1_shard_has_no_georeference(tmp_path, capsys):
    path = write_shard(tmp_path / "v1.h5", "rgb", random_arrays(["rgb"], 2, 8, 0))
    with h5py.File(path, "r+") as f:
        f.attrs["msgfm_format_version"] = 1
    assert _run(["inspect", str(path), "--sample", "0"]) == 0
    out = capsys.readouterr().out
    assert "format version 1" in out and "georeference: none (format v1)" in out
