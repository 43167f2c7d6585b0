"""The heterogeneous-batch scheduler: order, epochs, ranks, determinism, resume, batch sizes."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_support import tiny_config
from torch.utils.data import DataLoader, Dataset

from msgfm.config import load_config
from msgfm.data.scheduler import (
    CorruptSampleError,
    CorruptTracker,
    GroupOrder,
    HeterogeneousScheduler,
    StepRangeBatchSampler,
    due_positions,
    resolve_group_batches,
    split_train_val,
)
from msgfm.errors import UserError


class _IndexDataset(Dataset):
    """Sample i is the number i (as image and id); the augmentation seed is kept as a tensor."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, item):
        index, seed = item
        return {"images": {"x": torch.tensor([index, seed % 1000])}, "valid": {"x": torch.ones(2, dtype=bool)},
                "id": str(index)}


def _collate(samples):
    return {"images": {"x": torch.stack([s["images"]["x"] for s in samples])},
            "valid": {"x": torch.stack([s["valid"]["x"] for s in samples])},
            "ids": [s["id"] for s in samples], "corrupt": []}


def _scheduler(sizes: dict[str, int], batches: dict[str, int], *, rank=0, world=1, seed=0, workers=0,
               epoch="every_group_once"):
    names, loaders, samplers = [], [], []
    for position, (name, size) in enumerate(sizes.items()):
        order = GroupOrder(indices=np.arange(size), batch_size=batches[name], rank=rank, world_size=world,
                           seed=seed, group_position=position)
        sampler = StepRangeBatchSampler(order)
        loaders.append(DataLoader(_IndexDataset(size), batch_sampler=sampler, collate_fn=_collate,
                                  num_workers=workers, persistent_workers=workers > 0))
        names.append(name)
        samplers.append(sampler)
    return HeterogeneousScheduler(names, loaders, samplers, CorruptTracker(0.01, sizes), seed, epoch=epoch)


def _ids(step_batches):
    return [(name, tuple(b["ids"])) for name, b in step_batches]


SIZES = {"big": 40, "small": 9, "mid": 17}
BATCHES = {"big": 4, "small": 2, "mid": 3}


def test_every_group_is_seen_exactly_once_per_epoch_spread_evenly():
    sched = _scheduler(SIZES, BATCHES)  # 10, 4 and 5 batches per epoch
    assert len(sched) == 10 and sched.passes_per_epoch == {"big": 1.0, "small": 1.0, "mid": 1.0}
    for epoch in range(2):
        steps = list(sched)
        assert len(steps) == 10 and sched.epoch == epoch + 1
        for name, size, batch in (("big", 40, 4), ("small", 9, 2), ("mid", 17, 3)):
            ids = [i for step in steps for n, b in step if n == name for i in b["ids"]]
            assert len(ids) == len(set(ids)) == size // batch * batch  # every full batch once, no repeat
            due = [k for k, step in enumerate(steps) if name in [n for n, _ in step]]
            gaps = [b - a for a, b in zip(due, due[1:])]
            spacing = 10 / (size // batch)
            # evenly spread: gaps of floor or ceil of the spacing, the first batch within the first gap
            assert set(gaps) <= {math.floor(spacing), math.ceil(spacing)} and due[0] < math.ceil(spacing), (name, due)
        for step in steps:  # config order within a step, the largest group in every one
            names = [n for n, _ in step]
            assert names[0] == "big" and names == sorted(names, key=["big", "small", "mid"].index)
    assert sched.group_epochs == {"big": 2, "small": 2, "mid": 2}


def test_every_rank_runs_the_same_sequence_of_forwards():
    sizes, batches = {"a": 38, "b": 13, "c": 7}, {"a": 3, "b": 2, "c": 2}  # 4, 2 and 1 batches per rank
    runs = [_scheduler(sizes, batches, rank=r, world=3) for r in range(3)]
    sequences = [[[(n, len(b["ids"])) for n, b in step] for _ in range(2) for step in run] for run in runs]
    assert sequences[0] == sequences[1] == sequences[2]
    assert [n for n, _ in sequences[0][1]] == ["a", "b"] and [n for n, _ in sequences[0][2]] == ["a", "c"]
    assert [runs[0].due_groups(s) for s in range(4)] == [[n for n, _ in step] for step in sequences[0][:4]]


def test_due_positions_are_distinct_and_centred():
    assert due_positions(3, 3).tolist() == [0, 1, 2]
    assert due_positions(2, 10).tolist() == [2, 7]
    assert due_positions(1, 7).tolist() == [3]
    for nb in range(1, 30):
        assert len(set(due_positions(nb, 29).tolist())) == nb
    with pytest.raises(ValueError):
        due_positions(4, 3)


def test_largest_group_reading_has_every_group_in_every_step():
    sched = _scheduler(SIZES, BATCHES, epoch="largest_group_once")
    assert sched.passes_per_epoch == {"big": 1.0, "small": 2.5, "mid": 2.0}
    steps = list(sched)
    assert len(steps) == len(sched) == 10  # the largest group: 40 // 4
    for step in steps:
        assert [name for name, _ in step] == ["big", "small", "mid"]
        assert [len(b["ids"]) for _, b in step] == [4, 2, 3]
        assert set(step[0][1]) == {"images", "valid", "ids"}  # the corrupt side channel is stripped
    big = [i for step in steps for i in step[0][1]["ids"]]
    assert sorted(big, key=int) == [str(i) for i in range(40)]  # one full pass over the largest group
    assert sched.epoch == 1 and sched.group_epochs == {"big": 1, "small": 10 // 4, "mid": 10 // 5}


def test_small_groups_reshuffle_and_restart():
    sched = _scheduler(SIZES, BATCHES, epoch="largest_group_once")
    small = [b["ids"] for step in sched for name, b in step if name == "small"]
    passes = [sum(small[k:k + 4], []) for k in (0, 4)]  # 9 // 2 = 4 batches per pass, 1 dropped
    assert all(len(set(p)) == 8 for p in passes)  # no repeat within a pass
    assert passes[0] != passes[1]  # reshuffled


def test_two_ranks_read_disjoint_samples_with_equal_steps_and_batch_sizes():
    sizes = {"a": 23, "b": 11}
    batches = {"a": 3, "b": 2}
    runs = [list(_scheduler(sizes, batches, rank=r, world=2)) for r in (0, 1)]
    assert len(runs[0]) == len(runs[1]) == 3  # 23 // 2 = 11 per rank -> 3 batches of 3
    for s0, s1 in zip(*runs):
        assert [len(b["ids"]) for _, b in s0] == [len(b["ids"]) for _, b in s1]
    for group in ("a", "b"):
        per_rank = [{i for step in run[:2] for n, b in step if n == group for i in b["ids"]} for run in runs]
        assert per_rank[0] and not per_rank[0] & per_rank[1]


def test_same_seed_same_batches_other_seed_other_batches():
    a, b, c = (_ids_of(_scheduler(SIZES, BATCHES, seed=s)) for s in (5, 5, 6))
    assert a == b and a != c


def _ids_of(sched, epochs=1):
    return [_ids(step) for _ in range(epochs) for step in sched]


@pytest.mark.parametrize("workers,epoch", [(0, "every_group_once"), (1, "every_group_once"),
                                           (0, "largest_group_once")])
def test_state_dict_resumes_exactly_mid_epoch(workers, epoch):
    reference = _scheduler(SIZES, BATCHES, epoch=epoch)
    full = _ids_of(reference, epochs=2)
    interrupted = _scheduler(SIZES, BATCHES, workers=workers, epoch=epoch)
    seen = []
    for step in interrupted:
        seen.append(_ids(step))
        if len(seen) == 6:
            break
    state = interrupted.state_dict()
    resumed = _scheduler(SIZES, BATCHES, workers=workers, epoch=epoch)
    resumed.load_state_dict(state)
    assert resumed.epoch == 0 and resumed.step == 6
    seen += _ids_of(resumed, epochs=2)  # the rest of epoch 0, then epoch 1
    assert seen == full


def test_augmentation_seeds_are_part_of_the_deterministic_order():
    a = [b["images"]["x"][:, 1].tolist() for step in _scheduler(SIZES, BATCHES, seed=1) for _, b in step]
    b = [b["images"]["x"][:, 1].tolist() for step in _scheduler(SIZES, BATCHES, seed=1) for _, b in step]
    assert a == b and len({tuple(x) for x in a}) > 10


def test_group_without_a_full_batch_is_an_error():
    with pytest.raises(ValueError, match="'small'.*4 training samples per rank < batch 5"):
        _scheduler({"big": 40, "small": 9}, {"big": 4, "small": 5}, world=2)


def test_train_val_split_is_seeded_and_disjoint():
    train, val = split_train_val(100, 0.1, seed=0, group_position=0)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    assert np.array_equal(val, split_train_val(100, 0.1, seed=0, group_position=0)[1])
    assert not np.array_equal(val, split_train_val(100, 0.1, seed=1, group_position=0)[1])
    assert len(split_train_val(100, 0.0, 0, 0)[1]) == 0


def test_corrupt_tracker_allows_a_fraction_then_stops():
    tracker = CorruptTracker(0.1, {"g": 20})
    batch = {"ids": ["a", "b"], "corrupt": [("f.h5", 3, "OSError: bad")]}
    tracker.update("g", dict(batch))  # 1 of max(3 read, 20) allowed: 2
    tracker.update("g", dict(batch))
    assert tracker.corrupt["g"] == 2 and tracker.read["g"] == 6
    with pytest.raises(CorruptSampleError, match=r"'g': 3 corrupt.*sample 3 of f\.h5"):
        tracker.update("g", dict(batch))


def test_paper_batch_sizes_and_lrs_pass_through():
    cfg = load_config("msgfm_swinb_192")
    resolved = resolve_group_batches(cfg, {"rgb": 10, "sen12ms": 10, "mdas": 10})
    assert resolved == {"rgb": (128, 1e-4), "sen12ms": (32, 0.25e-4), "mdas": (12, 1e-5)}


def test_auto_batch_sizes_are_proportional_with_linear_scaled_lrs(tmp_path: Path):
    groups = [{"name": n, "sensors": [s], "shards": [f"{n}/*.h5"], "batch_size_per_gpu": "auto"}
              for n, s in (("a", "rgb"), ("b", "s2"), ("c", "sar"))]
    cfg = tiny_config(groups, tmp_path, overrides=["data.total_batch_size_per_gpu=64",
                                                   "data.reference_lr=1e-4", "data.reference_batch_size=128"])
    resolved = resolve_group_batches(cfg, {"a": 7000, "b": 2900, "c": 10})
    sizes = {k: v[0] for k, v in resolved.items()}
    assert sum(sizes.values()) == 64 and sizes["c"] >= 1
    assert sizes["a"] > 2 * sizes["b"] > sizes["c"]
    assert abs(sizes["a"] - 64 * 7000 / 9910) <= 1.01
    for batch, lr in resolved.values():
        assert lr == pytest.approx(1e-4 * batch / 128)


def test_auto_mixed_with_fixed_groups_shares_the_rest(tmp_path: Path):
    groups = [{"name": "a", "sensors": ["rgb"], "shards": ["a/*.h5"], "batch_size_per_gpu": 10, "lr": 1e-3},
              {"name": "b", "sensors": ["s2"], "shards": ["b/*.h5"], "batch_size_per_gpu": "auto"},
              {"name": "c", "sensors": ["sar"], "shards": ["c/*.h5"], "batch_size_per_gpu": "auto"}]
    cfg = tiny_config(groups, tmp_path, overrides=["data.total_batch_size_per_gpu=16", "data.reference_lr=2e-4"])
    resolved = resolve_group_batches(cfg, {"a": 5, "b": 100, "c": 100})
    assert resolved["a"] == (10, 1e-3)
    assert resolved["b"][0] == resolved["c"][0] == 3
    # set once, from the reference group (not a group's own lr scaled a second time)
    assert resolved["c"][1] == pytest.approx(2e-4 * 3 / cfg.data.reference_batch_size)
    too_small = tiny_config(groups, tmp_path, overrides=["data.total_batch_size_per_gpu=11"])
    with pytest.raises(ValueError, match="total_batch_size_per_gpu"):
        resolve_group_batches(too_small, {"a": 5, "b": 100, "c": 100})


def test_auto_batch_size_with_its_own_lr_is_refused(tmp_path: Path):
    groups = [{"name": "c", "sensors": ["sar"], "shards": ["c/*.h5"], "batch_size_per_gpu": "auto", "lr": 2e-4}]
    with pytest.raises(UserError, match=r"data.groups\[c\].lr.*reference group"):
        tiny_config(groups, tmp_path, overrides=["data.total_batch_size_per_gpu=16"])
