"""The group reader and the pipeline: normalization, sensor subsets, corrupt samples,
start-up errors, worker processes, ranks and exact resume end to end."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_train_support import tiny_config

from msgfm.data.dataset import GroupDataset
from msgfm.data.device_transforms import collate_raw, device_batch
from msgfm.data.pipeline import build_pretrain_data
from msgfm.data.plan import DataValidationError, plan_data, validate_data
from msgfm.data.scheduler import CorruptSampleError
from msgfm.data.stats import load_stats, write_stats
from msgfm.data.synthetic import random_arrays, write_shard
from msgfm.data.transforms import SampleTransform

SIZE = 32  # stored side = model side: validation transform is then the identity crop


def _group(name, sensors, shards, batch=2, workers=0):
    return {"name": name, "sensors": sensors, "shards": shards, "batch_size_per_gpu": batch, "lr": 1e-3,
            "num_workers": workers}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """rgb: 2 shards x 10; sen12ms: sar+s2, 2 shards x 6, s2 nodata 0 with a scale; stats beside both."""
    root = tmp_path_factory.mktemp("data")
    for i in range(2):
        write_shard(root / "rgb" / f"r{i}.h5", "rgb", random_arrays(["rgb"], 10, SIZE, i))
        pair = random_arrays(["sar", "s2"], 6, SIZE, 10 + i)
        pair["s2"][:, :, :4, :4] = 0
        pair["sar"][0, 1, 5, 5] = np.nan
        write_shard(root / "sen12ms" / f"p{i}.h5", "sen12ms", pair, nodata={"s2": 0}, scale={"s2": 1e-4},
                    offset={"sar": 2.0})
    write_stats(sorted((root / "rgb").glob("*.h5")), progress=False)
    write_stats(sorted((root / "sen12ms").glob("*.h5")), progress=False)
    return root


def _dataset(root: Path, folder: str, sensors, train=False, **kwargs) -> GroupDataset:
    stats = load_stats(root / folder / "stats.json")
    return GroupDataset(sorted((root / folder).glob("*.h5")), sensors, stats,
                        SampleTransform(img_size=SIZE, train=train), name=folder, **kwargs)


def _augmented(ds: GroupDataset, item) -> dict:
    """One sample the way training gets it: read (and its box drawn) by the reader, then
    normalized, cropped and flipped by device_batch, here on the CPU."""
    batch = device_batch(collate_raw([ds[item]]), "cpu")
    return {"images": {s: x[0] for s, x in batch["images"].items()},
            "valid": {s: v[0] for s, v in batch["valid"].items()}, "id": batch["ids"][0]}


def test_reader_normalizes_with_the_recorded_statistics(root):
    ds = _dataset(root, "sen12ms", ["sar", "s2"])
    stats = ds.stats
    assert len(ds) == 12
    sample = _augmented(ds, 7)  # second shard, local index 1
    with h5py.File(root / "sen12ms" / "p1.h5") as f:
        raw_s2, raw_sar = f["s2"][1].astype(np.float64), f["sar"][1].astype(np.float64)
        assert sample["id"] == f["ids"].asstr()[1]
    mean, std = (np.array(v)[:, None, None] for v in (stats.sensor("s2").mean, stats.sensor("s2").std))
    expected = (raw_s2 * 1e-4 - mean) / std
    nodata = raw_s2 == 0
    np.testing.assert_allclose(sample["images"]["s2"].numpy()[~nodata], expected[~nodata], rtol=1e-4, atol=1e-4)
    assert np.array_equal(sample["valid"]["s2"].numpy(), ~nodata)
    assert (sample["images"]["s2"].numpy()[nodata] == 0).all()
    mean, std = (np.array(v)[:, None, None] for v in (stats.sensor("sar").mean, stats.sensor("sar").std))
    np.testing.assert_allclose(sample["images"]["sar"].numpy(), (raw_sar + 2.0 - mean) / std, rtol=1e-4, atol=1e-4)
    nan_sample = _augmented(ds, 6)
    assert not nan_sample["valid"]["sar"][1, 5, 5] and nan_sample["images"]["sar"][1, 5, 5] == 0
    assert torch.isfinite(nan_sample["images"]["sar"]).all()


def test_reader_reads_a_subset_of_the_sensors(root):
    only_s2 = _dataset(root, "sen12ms", ["s2"])
    both = _dataset(root, "sen12ms", ["sar", "s2"])
    sample = _augmented(only_s2, 3)
    assert list(sample["images"]) == ["s2"] and list(sample["valid"]) == ["s2"]
    assert torch.equal(sample["images"]["s2"], _augmented(both, 3)["images"]["s2"])


def test_open_files_are_capped_per_process(root, monkeypatch):
    import msgfm.data.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "MAX_OPEN_FILES", 1)
    ds = _dataset(root, "rgb", ["rgb"])
    reference = [_dataset(root, "rgb", ["rgb"])[i]["raw"]["rgb"] for i in (0, 15, 1, 16)]
    for index, expected in zip((0, 15, 1, 16), reference):  # alternate between the two shards
        assert np.array_equal(ds[index]["raw"]["rgb"], expected)
        assert len(ds._files) == 1


def _corrupt_chunks(path: Path, sensor: str, indices) -> None:
    """Overwrite the compressed bytes of some samples' chunks with zeros (inflate then fails)."""
    with h5py.File(path, "r") as f:
        spans = [f[sensor].id.get_chunk_info_by_coord((i, 0, 0, 0)) for i in indices]
    with open(path, "r+b") as raw:
        for info in spans:
            raw.seek(info.byte_offset)
            raw.write(b"\0" * info.size)


@pytest.fixture
def corrupt_root(tmp_path) -> Path:
    path = write_shard(tmp_path / "rgb" / "r0.h5", "rgb", random_arrays(["rgb"], 20, 16, 0), compression="gzip")
    write_stats([path], progress=False)
    return tmp_path


# corrupting a shard changes its mtime: the stale-statistics warning is expected there
@pytest.mark.filterwarnings("ignore:.*other files than the shards")
def test_corrupt_sample_is_replaced_logged_and_counted(corrupt_root):
    shard = corrupt_root / "rgb" / "r0.h5"
    _corrupt_chunks(shard, "rgb", [5])
    ds = GroupDataset([shard], ["rgb"], load_stats(corrupt_root / "rgb" / "stats.json"),
                      SampleTransform(img_size=16, train=True), name="rgb")
    samples = ds.__getitems__([(5, 11), (6, 12)])
    assert len(samples) == 2 and samples[0]["id"] not in ("rgb/r0/5", samples[1]["id"])
    (path, index, error), = samples[0]["corrupt"]
    assert path == str(shard) and index == 5 and "Error" in error

    cfg = tiny_config([_group("rgb", ["rgb"], ["rgb/*.h5"], batch=4)], corrupt_root, img_size=32,
                      overrides=["data.val_fraction=0", "data.max_corrupt_fraction=0.1"])
    data = build_pretrain_data(cfg, plan_data(cfg, corrupt_root), 0, 1, seed=0)
    sizes = [len(b["ids"]) for step in data.train for _, b in step]
    assert sizes == [4] * 5  # the batch size never shrinks
    assert data.train.corrupt_counts == {"rgb": 1} and data.train.samples_read == {"rgb": 21}


@pytest.mark.filterwarnings("ignore:.*other files than the shards")
def test_too_many_corrupt_samples_stop_the_run(corrupt_root):
    shard = corrupt_root / "rgb" / "r0.h5"
    _corrupt_chunks(shard, "rgb", [3, 4, 5, 8, 9, 10])
    cfg = tiny_config([_group("rgb", ["rgb"], ["rgb/*.h5"], batch=4)], corrupt_root,
                      overrides=["data.val_fraction=0", "data.max_corrupt_fraction=0.1"])
    data = build_pretrain_data(cfg, plan_data(cfg, corrupt_root), 0, 1, seed=0)
    with pytest.raises(CorruptSampleError, match=r"'rgb': \d+ corrupt samples.*r0\.h5.*max_corrupt_fraction"):
        for _ in data.train:
            pass


def test_startup_reports_every_problem_with_file_and_sensor(root, tmp_path):
    bad = tmp_path / "bad"
    (bad / "garbage").mkdir(parents=True)
    (bad / "garbage" / "g.h5").write_bytes(b"definitely not hdf5" * 100)
    good = write_shard(bad / "truncated" / "t.h5", "rgb", random_arrays(["rgb"], 8, 16, 0))
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    write_shard(bad / "nosensor" / "n.h5", "rgb", random_arrays(["rgb"], 2, 16, 0))
    chan = write_shard(bad / "channels" / "c.h5", "rgb", random_arrays(["rgb"], 2, 16, 0))
    with h5py.File(chan, "r+") as f:
        attrs = dict(f["rgb"].attrs)
        del f["rgb"]
        f.create_dataset("rgb", data=np.zeros((2, 4, 16, 16), np.uint8), chunks=(1, 4, 16, 16))
        f["rgb"].attrs.update(attrs)
    length = write_shard(bad / "length" / "l.h5", "mdas", random_arrays(["dsm", "rgb"], 3, 16, 0))
    with h5py.File(length, "r+") as f:
        f["dsm"].resize(2, axis=0)
    write_shard(bad / "nostats" / "s.h5", "rgb", random_arrays(["rgb"], 2, 16, 0))
    groups = [_group("nomatch", ["rgb"], ["missing/*.h5"]), _group("garbage", ["rgb"], ["garbage/*.h5"]),
              _group("truncated", ["rgb"], ["truncated/*.h5"]), _group("nosensor", ["dsm", "rgb"], ["nosensor/*.h5"]),
              _group("channels", ["rgb"], ["channels/*.h5"]), _group("length", ["dsm", "rgb"], ["length/*.h5"]),
              _group("nostats", ["rgb"], ["nostats/*.h5"]), _group("empty", ["rgb"], [])]
    with pytest.raises(DataValidationError) as err:
        validate_data(tiny_config(groups, bad), bad)
    lines = str(err.value).splitlines()[1:]
    expected = {
        "nomatch": [f"{bad}/missing/*.h5", f"data root {bad}", "msgfm convert"],
        "garbage": [f"{bad}/garbage/g.h5", "corrupt or truncated"],
        "truncated": [f"{bad}/truncated/t.h5", "corrupt or truncated"],
        "nosensor": [f"{bad}/nosensor/n.h5", "['dsm']"],
        "channels": [f"{bad}/channels/c.h5", "sensor 'rgb' has 4 channels"],
        "length": [f"{bad}/length/l.h5", "differ in length"],
        "nostats": [f"{bad}/nostats/stats.json", f"msgfm stats '{bad}/nostats/*.h5'"],
        "empty": ["no shard globs"],
    }
    for group, needles in expected.items():
        mine = [line for line in lines if f"group '{group}'" in line]
        assert mine, f"no problem reported for group {group}: {lines}"
        assert any(all(n in line for n in needles) for line in mine), (group, mine)


def test_startup_warns_when_shards_differ_from_the_statistics(root, tmp_path):
    folder = tmp_path / "rgb"
    write_shard(folder / "a.h5", "rgb", random_arrays(["rgb"], 4, SIZE, 0))
    write_stats([folder / "a.h5"], progress=False)
    write_shard(folder / "b.h5", "rgb", random_arrays(["rgb"], 4, SIZE, 1))
    cfg = tiny_config([_group("rgb", ["rgb"], ["rgb/*.h5"])], tmp_path)
    with pytest.warns(UserWarning, match="other files than the shards in use.*not in the statistics: b.h5"):
        summary = validate_data(cfg, tmp_path)
    assert summary["rgb"].num_samples == 8


def _pipeline(root: Path, workers: int, rank=0, world=1, seed=0):
    cfg = tiny_config([_group("rgb", ["rgb"], ["rgb/*.h5"], batch=3, workers=workers),
                       _group("sen12ms", ["sar", "s2"], ["sen12ms/*.h5"], batch=2, workers=workers)], root)
    return build_pretrain_data(cfg, plan_data(cfg, root), rank, world, seed)


def _flatten(step_batches):
    batches = [(name, device_batch(b, "cpu")) for name, b in step_batches]
    return [(name, b["ids"], {s: x.clone() for s, x in b["images"].items()},
             {s: v.clone() for s, v in b["valid"].items()}) for name, b in batches]


def _same(a, b) -> bool:
    """Two lists of steps (as made by _flatten) hold the same ids, images and masks."""
    return len(a) == len(b) and all(
        x[0] == y[0] and x[1] == y[1] and all(torch.equal(x[2][s], y[2][s]) for s in x[2])
        and all(torch.equal(x[3][s], y[3][s]) for s in x[3])
        for step_a, step_b in zip(a, b) for x, y in zip(step_a, step_b))


def test_worker_processes_give_the_same_batches_and_open_files_lazily(root):
    in_process = [_flatten(step) for step in _pipeline(root, workers=0).train]
    data = _pipeline(root, workers=1)
    rgb_ds, pair_ds = (loader.dataset for loader in data.train.loaders)
    rgb_ds.read_raw(0)  # the parent holds an open handle when the rgb worker forks: it must not use it
    assert rgb_ds._files and rgb_ds._pid == os.getpid()
    with_workers = [_flatten(step) for step in data.train]
    assert len(with_workers) == len(in_process) == 6  # rgb: 18 train samples // 3
    assert _same(in_process, with_workers)
    assert pair_ds._files == {}  # the main process never opened these shards: the worker did
    assert len([_flatten(step) for step in data.train]) == 6 and data.train.epoch == 2  # persistent workers
    val = [b for b in data.val["sen12ms"]]
    assert len(val) == 1 and len(val[0]["ids"]) == 2 and "corrupt" not in val[0]
    assert data.stats["sen12ms"]["sensors"]["s2"]["bands"][0] == "B01" and data.stats["rgb"]["files"]


def test_ranks_get_disjoint_samples_and_equal_batches(root):
    runs = [[_flatten(step) for step in _pipeline(root, 0, rank=r, world=2).train] for r in (0, 1)]
    assert len(runs[0]) == len(runs[1]) == 3  # rgb: 18 // 2 // 3
    for s0, s1 in zip(*runs):
        assert [len(g[1]) for g in s0] == [len(g[1]) for g in s1]
    ids = [{i for step in run for g in step if g[0] == "rgb" for i in g[1]} for run in runs]
    assert len(ids[0]) == 9 and not ids[0] & ids[1]


def test_resume_mid_epoch_reproduces_images_exactly(root):
    uninterrupted = _pipeline(root, 0, seed=3).train
    full = [_flatten(step) for _ in range(2) for step in uninterrupted]
    data = _pipeline(root, 0, seed=3)
    seen = []
    for step in data.train:
        seen.append(_flatten(step))
        if len(seen) == 4:
            break
    resumed = _pipeline(root, 0, seed=3)
    resumed.train.load_state_dict(data.train.state_dict())
    seen += [_flatten(step) for _ in range(2) for step in resumed.train]  # rest of epoch 0, then epoch 1
    assert _same(seen, full)


@pytest.mark.realdata
def test_real_landsat_tiles_with_nodata_normalize_to_zero_mean_unit_std(realdata, tmp_path):
    """Real Landsat RGB (nodata 255 outside the scene) tiled to 64 px: over the valid pixels of
    all tiles the normalized bands have mean 0 and std 1, and nodata is masked and zeroed."""
    import rasterio

    with rasterio.open(realdata / "landsat_rmnp_rgb_dem" / "rmnp-rgb.tif") as src:
        scene, nodata = src.read(), src.nodata
    tiles = np.stack([scene[:, y:y + 64, x:x + 64] for y in range(0, scene.shape[1] - 63, 64)
                      for x in range(0, scene.shape[2] - 63, 64)])
    assert (tiles == nodata).any()
    shard = write_shard(tmp_path / "landsat" / "l0.h5", "rgb", {"rgb": tiles}, nodata={"rgb": nodata})
    stats = load_stats(write_stats([shard], progress=False))
    ds = GroupDataset([shard], ["rgb"], stats, SampleTransform(img_size=64, train=False), name="landsat")
    samples = [_augmented(ds, i) for i in range(len(ds))]
    images = torch.stack([s["images"]["rgb"] for s in samples])
    valid = torch.stack([s["valid"]["rgb"] for s in samples])
    assert torch.equal(valid, torch.from_numpy(tiles != nodata))
    assert (images[~valid] == 0).all()
    for band in range(3):
        values = images[:, band][valid[:, band]].double()
        assert abs(values.mean().item()) < 1e-4 and abs(values.std(unbiased=False).item() - 1) < 1e-4
    train = GroupDataset([shard], ["rgb"], stats, SampleTransform(img_size=96, train=True), name="landsat")
    for i in range(len(train)):
        sample = _augmented(train, (i, i))
        assert (sample["images"]["rgb"][~sample["valid"]["rgb"]] == 0).all()
        assert torch.isfinite(sample["images"]["rgb"]).all()
