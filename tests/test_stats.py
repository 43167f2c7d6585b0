"""Band statistics: float64 reference, nodata/NaN/Inf handling, subsets, provenance, CLI."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from msgfm.data import stats as stats_module
from msgfm.data.stats import MissingStatsError, expand_shard_args, load_stats, write_stats
from msgfm.data.synthetic import random_arrays, write_shard


def _reference(raw_NCHW: np.ndarray, nodata=None, scale=1.0, offset=0.0):
    """Per-band mean/std of the valid pixels in physical units, in float64 (numpy, no streaming)."""
    x = np.moveaxis(raw_NCHW, 1, 0).reshape(raw_NCHW.shape[1], -1)
    valid = np.isfinite(x) if x.dtype.kind == "f" else np.ones(x.shape, bool)
    if nodata is not None:
        valid &= x != nodata
    phys = x.astype(np.float64) * scale + offset
    mean = np.array([phys[c][valid[c]].mean() for c in range(len(x))])
    std = np.array([phys[c][valid[c]].std() for c in range(len(x))])
    return mean, std, valid.sum(1)


@pytest.fixture
def pair_shards(tmp_path: Path) -> tuple[list[Path], dict[str, np.ndarray]]:
    """Two sar+s2 shards; s2 has nodata=0 pixels and a scale, sar has NaN, +-Inf and an offset."""
    arrays = [random_arrays(["sar", "s2"], 7, 12, seed) for seed in (1, 2)]
    for a in arrays:
        a["s2"][:, :, :3, :3] = 0  # nodata corner
        a["sar"][0, 0, 0, :4] = [np.nan, np.inf, -np.inf, np.nan]
        a["sar"][:, 1] += 1000.0  # large mean, small spread: catches sum-of-squares cancellation
    paths = [write_shard(tmp_path / "pairs" / f"p{i}.h5", "sen12ms", a, nodata={"s2": 0},
                         scale={"s2": 1e-4}, offset={"sar": 3.0}) for i, a in enumerate(arrays)]
    merged = {s: np.concatenate([a[s] for a in arrays]) for s in ("sar", "s2")}
    return paths, merged


def test_stats_match_float64_reference_with_nodata_and_nan(pair_shards):
    paths, merged = pair_shards
    out = write_stats(paths, progress=False)
    assert out == paths[0].parent / "stats.json"  # beside the shards
    stats = load_stats(out)
    for sensor, kwargs in (("s2", {"nodata": 0, "scale": 1e-4}), ("sar", {"offset": 3.0})):
        mean, std, count = _reference(merged[sensor], **kwargs)
        got = stats.sensor(sensor)
        np.testing.assert_allclose(got.mean, mean, rtol=1e-10)
        np.testing.assert_allclose(got.std, std, rtol=1e-9)
        assert list(got.valid_pixels) == count.tolist()
    assert stats.sensor("sar").valid_pixels[0] == merged["sar"][:, 0].size - 8  # NaN and Inf (4 per shard) left out
    assert stats.num_samples == 14 and stats.units == "physical"


def test_subset_is_seeded_and_matches_reference_over_its_samples(pair_shards):
    paths, merged = pair_shards
    a = load_stats(write_stats(paths, paths[0].parent / "a.json", max_samples=5, seed=3, progress=False))
    b = load_stats(write_stats(paths, paths[0].parent / "b.json", max_samples=5, seed=3, progress=False))
    c = load_stats(write_stats(paths, paths[0].parent / "c.json", max_samples=5, seed=4, progress=False))
    assert a.num_samples == 5 and a.max_samples == 5
    assert a.sensor("s2").mean == b.sensor("s2").mean
    assert a.sensor("s2").mean != c.sensor("s2").mean
    # the documented selection: a seeded choice without replacement over all samples in shard order
    chosen = np.sort(np.random.default_rng(3).choice(14, size=5, replace=False))
    mean, std, _ = _reference(merged["s2"][chosen], nodata=0, scale=1e-4)
    np.testing.assert_allclose(a.sensor("s2").mean, mean, rtol=1e-10)
    np.testing.assert_allclose(a.sensor("s2").std, std, rtol=1e-9)


def test_provenance_records_files_and_detects_changes(pair_shards, tmp_path):
    paths, _ = pair_shards
    stats = load_stats(write_stats(paths, progress=False))
    doc = json.loads(stats.path.read_text())
    assert [f["path"] for f in doc["files"]] == ["p0.h5", "p1.h5"]
    assert doc["files"][0]["size"] == paths[0].stat().st_size and doc["files"][0]["num_samples"] == 7
    assert stats.source_changes(paths) == []
    extra = write_shard(paths[0].parent / "p2.h5", "sen12ms", random_arrays(["sar", "s2"], 2, 12, 9))
    changes = stats.source_changes([*paths, extra])
    assert changes == ["not in the statistics: p2.h5"]
    assert stats.source_changes(paths[:1]) == ["in the statistics but not used: p1.h5"]


def test_missing_stats_say_which_command_to_run(tmp_path):
    with pytest.raises(MissingStatsError, match=r"msgfm stats .*rgb/\*\.h5"):
        load_stats(tmp_path / "rgb" / "stats.json")


def test_mixed_sensor_sets_are_refused(tmp_path):
    a = write_shard(tmp_path / "a.h5", "rgb", random_arrays(["rgb"], 2, 8, 0))
    b = write_shard(tmp_path / "b.h5", "mdas", random_arrays(["dsm", "rgb"], 2, 8, 0))
    with pytest.raises(ValueError, match="different sensors"):
        write_stats([a, b], progress=False)


def _cli(argv: list[str]) -> int:
    """`msgfm stats ...` through its own parser (the other subcommands are not needed here)."""
    parser = argparse.ArgumentParser()
    stats_module.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError):
        return 2


def test_cli_writes_stats_from_a_glob(tmp_path, capsys):
    for i in range(2):
        write_shard(tmp_path / "rgb" / f"r{i}.h5", "rgb", random_arrays(["rgb"], 3, 8, i))
    assert _cli(["stats", str(tmp_path / "rgb" / "*.h5"), "--quiet"]) == 0
    assert (tmp_path / "rgb" / "stats.json").is_file()
    assert "rgb" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        expand_shard_args([str(tmp_path / "none" / "*.h5")])


def test_integer_histograms_merge_shards_of_different_scale_and_offset(tmp_path):
    """int16 DSMs in decimetres and in centimetres + 5 m: one set of statistics in metres."""
    rng = np.random.default_rng(0)
    a = rng.integers(-500, 3000, (4, 1, 9, 9), dtype=np.int16)
    b = rng.integers(-500, 30000, (3, 1, 9, 9), dtype=np.int16)
    a[0, 0, 0, :3] = -32768  # nodata
    paths = [write_shard(tmp_path / "a.h5", "dsm", {"dsm": a}, nodata={"dsm": -32768}, scale={"dsm": 0.1}),
             write_shard(tmp_path / "b.h5", "dsm", {"dsm": b}, nodata={"dsm": -32768}, scale={"dsm": 0.01},
                         offset={"dsm": 5.0})]
    got = load_stats(write_stats(paths, progress=False)).sensor("dsm")
    physical = np.concatenate([a[a != -32768] * 0.1, b.ravel() * 0.01 + 5.0])
    np.testing.assert_allclose(got.mean, [physical.mean()], rtol=1e-12)
    np.testing.assert_allclose(got.std, [physical.std()], rtol=1e-12)
    assert got.valid_pixels == (physical.size,)
