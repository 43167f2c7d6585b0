"""`msgfm inspect`: layout, sample count, dtypes, attributes, labels and statistics."""
from __future__ import annotations

import argparse

import h5py
import numpy as np

from msgfm.data.synthetic import random_arrays, write_shard
from msgfm.data import inspect as inspect_module
from msgfm.data.format import LabelSpec, SensorArraySpec, ShardWriter, multilabel_spec
from msgfm.data.stats import write_stats


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
                          labels={"multilabel": np.array([1, 0, i % 2], np.uint8)})
    assert _run(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for needle in ("group 'bigearthnet'", "3 samples", "/s2: (3, 12, 8, 8) uint16", "compression lzf",
                   "nodata 0.0, scale 0.0001", "'B01'", "/ids: [patch_0, patch_1, patch_2] (3)",
                   "/labels/multilabel: (3, 3) uint8", "forest", "source=test", "statistics: none at",
                   "msgfm stats"):
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
