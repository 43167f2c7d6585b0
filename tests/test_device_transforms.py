"""Batched normalization and augmentation on the device (run here on the CPU): on the same
random draws it gives what the per-sample host path gives, for every dtype, both sensors of
a pair, crops that shrink and enlarge, flips, nodata and NaN, mixed shards; the pipeline
yields raw batches that become today's batches; memory stays flat."""
from __future__ import annotations

import gc
import random
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from test_train_support import tiny_config

from msgfm.data.device_transforms import RawSensorBatch, collate_raw, device_batch
from msgfm.data.pipeline import build_pretrain_data
from msgfm.data.plan import plan_data
from msgfm.data.stats import write_stats
from msgfm.data.synthetic import random_arrays, write_shard
from msgfm.data.transforms import SampleTransform, SensorNormalizer


def _raw_samples(tf: SampleTransform, raws: list[dict[str, np.ndarray]], norms: list[dict[str, SensorNormalizer]],
                 seeds: list[int]) -> list[dict]:
    """What GroupDataset hands the collate function: arrays, the drawn box, normalizers."""
    return [{"raw": raw, "box": tf.draw(raw, random.Random(seed)), "normalizers": norm, "size": tf.img_size,
             "id": str(seed)} for raw, norm, seed in zip(raws, norms, seeds)]


def _host(tf: SampleTransform, raws, norms, seeds) -> tuple[dict, dict]:
    """The per-sample host path on the same seeds, stacked."""
    outs = [tf(raw, norm, random.Random(seed)) for raw, norm, seed in zip(raws, norms, seeds)]
    sensors = list(raws[0])
    return ({s: torch.stack([o[0][s] for o in outs]) for s in sensors},
            {s: torch.stack([o[1][s] for o in outs]) for s in sensors})


def _assert_same(device: dict, host_images: dict, host_valid: dict, exact: set[str]) -> None:
    for sensor, expected in host_images.items():
        assert torch.equal(device["valid"][sensor], host_valid[sensor]), sensor
        if sensor in exact:  # 8-bit data: the host's fixed-point kernel, reproduced bit for bit
            assert torch.equal(device["images"][sensor], expected), sensor
        else:  # float32 rounding of sampling positions and sums: a few units in the last place
            torch.testing.assert_close(device["images"][sensor], expected, rtol=1e-5, atol=1e-5)


def _pair(rng: np.random.Generator, stored: int, dtype, nodata=None) -> dict[str, np.ndarray]:
    """Sensor "x" (the dtype under test, 3 bands) and its float32 partner "d" of one sample."""
    shape = (3, stored, stored)
    if np.dtype(dtype).kind == "f":
        x = rng.normal(100, 50, shape).astype(dtype)
    else:
        x = rng.integers(0, 256 if dtype == np.uint8 else 10000, shape).astype(dtype)
    d = rng.normal(10, 3, (1, stored, stored)).astype(np.float32)
    if nodata is not None:
        top, left = rng.integers(0, stored - 8, 2)
        x[:, top:top + 6, left:left + 7] = nodata
        d[:, top:top + 6, left:left + 7] = -1.0
    if np.dtype(dtype).kind == "f":
        x[1, stored // 3, 2:stored // 2] = np.nan
        x[0, stored // 2, 3] = np.inf
    return {"x": x, "d": d}


# stored side vs output side 32: shrink (antialiased), enlarge, same size, and shrink by up to
# 4x (more taps; the 8-bit sums then need float64)
SIZES = [48, 20, 32, 100]


@pytest.mark.parametrize("stored", SIZES)
@pytest.mark.parametrize("dtype,nodata", [(np.uint8, None), (np.uint8, 0), (np.uint16, None), (np.uint16, 0),
                                          (np.float32, None), (np.float32, -9999.0), (np.float16, -9999.0)])
def test_device_path_equals_host_path_on_the_same_draws(dtype, nodata, stored):
    rng = np.random.default_rng(stored)
    tf = SampleTransform(img_size=32, train=True, crop_scale=(0.3, 1.0), vflip=True)
    norm = {"x": SensorNormalizer.from_stats([100.0, 90.0, 80.0], [50.0, 40.0, 30.0], scale=1.5, offset=-2.0,
                                             nodata=nodata),
            "d": SensorNormalizer.from_stats([10.0], [3.0], nodata=-1.0 if nodata is not None else None)}
    seeds = list(range(24))
    raws = [_pair(rng, stored, dtype, nodata) for _ in seeds]
    norms = [norm] * len(seeds)
    samples = _raw_samples(tf, raws, norms, seeds)
    boxes = [s["box"] for s in samples]
    assert any(b.hflip for b in boxes) and any(b.vflip for b in boxes) and not all(b.hflip for b in boxes)
    assert len({b.pixels(stored, stored)[2:] for b in boxes}) > 10  # crops of many sizes

    out = device_batch(collate_raw(samples), "cpu")
    host_images, host_valid = _host(tf, raws, norms, seeds)
    exact = {"x"} if dtype == np.uint8 and nodata is None else set()
    _assert_same(out, host_images, host_valid, exact)
    assert out["ids"] == [str(s) for s in seeds]
    if nodata is not None or np.dtype(dtype).kind == "f":  # the masks were exercised, not all True
        assert not out["valid"]["x"].all() and not (out["images"]["x"][~out["valid"]["x"]] != 0).any()
    if nodata is not None:
        assert not out["valid"]["d"].all()


def test_a_batch_mixing_shards_of_different_kinds_matches_the_host_path():
    """One batch from shards that differ in size (padded), dtype (promoted), scale, offset and
    nodata: 8-bit samples without nodata keep their 8-bit resize, the others the float one."""
    rng = np.random.default_rng(0)
    tf = SampleTransform(img_size=24, train=True, crop_scale=(0.3, 1.0), vflip=True)
    kinds = [(np.uint8, 40, None, 1.0, 0.0), (np.uint8, 28, 0, 1.0, 0.0), (np.uint16, 36, 0, 0.01, 0.5),
             (np.uint8, 20, None, 1.0, 0.0)]
    raws, norms, seeds = [], [], []
    for seed in range(16):
        dtype, stored, nodata, scale, offset = kinds[seed % len(kinds)]
        raws.append({"x": _pair(rng, stored, dtype, nodata)["x"]})
        norms.append({"x": SensorNormalizer.from_stats([60.0, 70.0, 80.0], [30.0, 20.0, 25.0], scale=scale,
                                                       offset=offset, nodata=nodata)})
        seeds.append(seed)
    batch = collate_raw(_raw_samples(tf, raws, norms, seeds))
    raw = batch["sensors"]["x"]
    assert raw.raw_BCHW.shape == (16, 3, 40, 40) and raw.raw_BCHW.dtype == torch.uint16
    assert 0 < int(raw.quantize_B.sum()) < 16
    out = device_batch(batch, "cpu")
    host_images, host_valid = _host(tf, raws, norms, seeds)
    for b in range(16):
        assert torch.equal(out["valid"]["x"][b], host_valid["x"][b])
        if raw.quantize_B[b]:
            assert torch.equal(out["images"]["x"][b], host_images["x"][b])
        else:
            torch.testing.assert_close(out["images"]["x"][b], host_images["x"][b], rtol=1e-5, atol=1e-5)


def test_validation_centre_crop_matches_the_host_path():
    rng = np.random.default_rng(1)
    tf = SampleTransform(img_size=32, train=False)
    raws = [{"x": rng.integers(0, 256, (3, 40, 52), dtype=np.uint8),
             "d": rng.normal(0, 1, (1, 40, 52)).astype(np.float32)} for _ in range(4)]
    norms = [{"x": SensorNormalizer.from_stats([0.0] * 3, [1.0] * 3), "d": SensorNormalizer.from_stats([0.0], [1.0])}]
    batch = collate_raw(_raw_samples(tf, raws, norms * 4, [0, 1, 2, 3]))
    assert not batch["flip_B2"].any() and (batch["sensors"]["x"].crop_B4 == torch.tensor([0, 6, 40, 40])).all()
    host_images, host_valid = _host(tf, raws, norms * 4, [0, 1, 2, 3])
    _assert_same(device_batch(batch, "cpu"), host_images, host_valid, exact={"x"})


def test_output_dtype_and_structure():
    rng = np.random.default_rng(2)
    tf = SampleTransform(img_size=16, train=True)
    raws = [_pair(rng, 24, np.uint16, 0) for _ in range(3)]
    norms = [{"x": SensorNormalizer.from_stats([1.0] * 3, [2.0] * 3, nodata=0), "d": SensorNormalizer.from_stats(
        [0.0], [1.0], nodata=-1.0)}] * 3
    batch = collate_raw(_raw_samples(tf, raws, norms, [0, 1, 2]))
    full = device_batch(batch, "cpu")
    half = device_batch(batch, "cpu", torch.bfloat16)
    assert set(half) == {"images", "valid", "ids"}
    for sensor, channels in (("x", 3), ("d", 1)):
        assert half["images"][sensor].dtype == torch.bfloat16 and half["valid"][sensor].dtype == torch.bool
        assert half["images"][sensor].shape == half["valid"][sensor].shape == (3, channels, 16, 16)
        assert torch.equal(half["images"][sensor], full["images"][sensor].to(torch.bfloat16))
    assert batch["sensors"]["x"].raw_BCHW.dtype == torch.uint16  # what crosses the process boundary: stored bytes


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """rgb 2 x 10 samples of 40 px; sen12ms sar + s2 2 x 6 of 40 px, s2 with nodata 0 and a scale."""
    root = tmp_path_factory.mktemp("data")
    for i in range(2):
        write_shard(root / "rgb" / f"r{i}.h5", "rgb", random_arrays(["rgb"], 10, 40, i))
        pair = random_arrays(["sar", "s2"], 6, 40, 10 + i)
        pair["s2"][:, :, :5, :7] = 0
        pair["sar"][0, 1, 5, 5] = np.nan
        write_shard(root / "sen12ms" / f"p{i}.h5", "sen12ms", pair, nodata={"s2": 0}, scale={"s2": 1e-4})
    write_stats(sorted((root / "rgb").glob("*.h5")), progress=False)
    write_stats(sorted((root / "sen12ms").glob("*.h5")), progress=False)
    return root


def test_pipeline_batches_keep_their_draws_and_become_todays_batches(root):
    """The pipeline's raw batches, through device_batch, equal the per-sample host path run on
    the scheduler's own (index, augmentation seed) items: a run's crops and flips are unchanged."""
    groups = [{"name": "rgb", "sensors": ["rgb"], "shards": ["rgb/*.h5"], "batch_size_per_gpu": 3, "lr": 1e-3,
               "num_workers": 0},
              {"name": "sen12ms", "sensors": ["sar", "s2"], "shards": ["sen12ms/*.h5"], "batch_size_per_gpu": 2,
               "lr": 1e-3, "num_workers": 0}]
    cfg = tiny_config(groups, root)
    data = build_pretrain_data(cfg, plan_data(cfg, root), 0, 1, seed=5)
    datasets = {name: loader.dataset for name, loader in zip(data.train.names, data.train.loaders)}
    steps = list(data.train)
    assert len(steps) == 6
    items = {name: {step: sampler._batch(step) for step in range(len(steps)) if sampler.is_due(step)}
             for name, sampler in zip(data.train.names, data.train.samplers)}  # (index, augmentation seed)
    for step, step_batches in enumerate(steps):
        assert [name for name, _ in step_batches] == [name for name in data.train.names if step in items[name]]
        for name, raw_batch in step_batches:
            assert set(raw_batch) == {"sensors", "flip_B2", "size", "ids"}
            assert all(isinstance(r, RawSensorBatch) for r in raw_batch["sensors"].values())
            batch = device_batch(raw_batch, "cpu")
            ds = datasets[name]
            raws, norms, seeds = [], [], []
            for index, seed in items[name][step]:
                raws.append(ds.read_raw(index)[0])
                norms.append(ds.normalizers[ds.locate(index)[0]])
                seeds.append(seed)
            host_images, host_valid = _host(ds.transform, raws, norms, seeds)
            _assert_same(batch, host_images, host_valid, exact={"rgb"})
            assert all(x.shape[-2:] == (32, 32) for x in batch["images"].values())
    val = next(iter(data.val["sen12ms"]))
    assert device_batch(val, "cpu")["images"]["s2"].shape == (2, 12, 32, 32)


def test_reader_fills_batch_arrays_and_falls_back_for_shards_of_different_sizes(tmp_path):
    """Uniform shards: the samples are read into one array per sensor that the raw batch uses
    as is. Shards of two sizes in one group: per-sample arrays, padded, same result as the host."""
    from msgfm.data.dataset import GroupDataset
    from msgfm.data.stats import load_stats

    small = write_shard(tmp_path / "g" / "a.h5", "g", random_arrays(["s2"], 4, 24, 0), nodata={"s2": 0})
    large = write_shard(tmp_path / "g" / "b.h5", "g", random_arrays(["s2"], 4, 40, 1), nodata={"s2": 0},
                        compression="gzip")
    stats = load_stats(write_stats([small, large], progress=False))
    tf = SampleTransform(img_size=32, train=True)
    uniform = GroupDataset([large], ["s2"], stats, tf, name="g")
    samples = uniform.__getitems__([(2, 7), (0, 8), (3, 9)])
    raw = collate_raw(samples)["sensors"]["s2"].raw_BCHW
    assert np.shares_memory(raw.numpy(), samples[0]["raw"]["s2"])
    assert np.array_equal(raw[1].numpy(), uniform.read_raw(0)[0]["s2"])  # gzip: read through HDF5 filters

    mixed = GroupDataset([small, large], ["s2"], stats, tf, name="g")
    items = [(1, 3), (6, 4), (0, 5), (5, 6)]
    samples = mixed.__getitems__(items)
    assert "batch_arrays" not in samples[0]
    batch = collate_raw(samples)
    assert batch["sensors"]["s2"].raw_BCHW.shape == (4, 12, 40, 40)
    raws = [mixed.read_raw(i)[0] for i, _ in items]
    norms = [mixed.normalizers[mixed.locate(i)[0]] for i, _ in items]
    host_images, host_valid = _host(tf, raws, norms, [seed for _, seed in items])
    _assert_same(device_batch(batch, "cpu"), host_images, host_valid, exact=set())


def test_memory_stays_flat_over_repeated_batches():
    """Nothing accumulates between calls: after a warm-up the process does not grow by the
    ~12 MiB every call allocates for its outputs and temporaries."""
    rng = np.random.default_rng(3)
    tf = SampleTransform(img_size=64, train=True)
    raws = [_pair(rng, 64, np.float32, -9999.0) for _ in range(8)]
    norms = [{"x": SensorNormalizer.from_stats([100.0] * 3, [50.0] * 3, nodata=-9999.0),
              "d": SensorNormalizer.from_stats([10.0], [3.0], nodata=-1.0)}] * 8
    batch = collate_raw(_raw_samples(tf, raws, norms, list(range(8))))
    process = psutil.Process()
    for _ in range(5):
        device_batch(batch, "cpu")
    gc.collect()
    before = process.memory_info().rss
    for _ in range(40):  # a leak of one call's outputs each time would add >= 40 x 0.6 MiB
        device_batch(batch, "cpu")
    gc.collect()
    grown_mib = (process.memory_info().rss - before) / 2**20
    assert grown_mib < 16, f"RSS grew by {grown_mib:.1f} MiB over 40 batches"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_what_the_cpu_gives():
    rng = np.random.default_rng(4)
    tf = SampleTransform(img_size=32, train=True, crop_scale=(0.3, 1.0), vflip=True)
    for dtype, nodata in ((np.uint8, None), (np.uint16, 0), (np.float32, -9999.0)):
        raws = [_pair(rng, 48, dtype, nodata) for _ in range(16)]
        norms = [{"x": SensorNormalizer.from_stats([100.0] * 3, [50.0] * 3, nodata=nodata),
                  "d": SensorNormalizer.from_stats([10.0], [3.0], nodata=-1.0 if nodata is not None else None)}] * 16
        batch = collate_raw(_raw_samples(tf, raws, norms, list(range(16))))
        cpu = device_batch(batch, "cpu")
        gpu = device_batch({**batch, "sensors": {s: r.pin_memory() for s, r in batch["sensors"].items()}}, "cuda")
        for sensor in cpu["images"]:
            assert torch.equal(gpu["valid"][sensor].cpu(), cpu["valid"][sensor])
            torch.testing.assert_close(gpu["images"][sensor].cpu(), cpu["images"][sensor], rtol=1e-5, atol=1e-5)
