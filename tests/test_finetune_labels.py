"""Fine-tuning labels are checked by shard and sample id: when the data is opened (dtype, the first
and last sample, every multilabel vector) and on every batch (one min/max), before the loss or a
metric can crash on them (issue 14, point 3)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from msgfm.config.finetune import load_finetune_config
from msgfm.data.format import LabelSpec, SensorArraySpec, ShardWriter, multilabel_spec, segmentation_spec
from msgfm.data.stats import load_stats, write_stats
from msgfm.errors import UserError
from msgfm.finetune.data import CheckedBatches, EpochBatches, LabelCheck, TaskDataset, make_loader

SIZE = 16


def write_label_shard(path: Path, labels: list[np.ndarray], spec: LabelSpec) -> Path:
    """A shard of rgb samples (one per label array) with ``labels/<spec.name>``; ids s0, s1, ..."""
    rng = np.random.default_rng(0)
    rgb = SensorArraySpec(dtype="uint8", channels=3, height=SIZE, width=SIZE)
    with ShardWriter(path, "task", {"rgb": rgb}, labels=[spec]) as writer:
        for i, label in enumerate(labels):
            writer.append({"rgb": rng.integers(0, 255, (3, SIZE, SIZE), dtype=np.uint8)}, f"s{i}",
                          labels={spec.name: label})
    write_stats([path], progress=False)
    return path


def segmentation_masks(count: int, bad: dict[int, int] | None = None) -> list[np.ndarray]:
    """Two-class masks with unlabelled (255) pixels; ``bad[i] = v`` puts class ``v`` into mask ``i``."""
    masks = []
    for i in range(count):
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[:, SIZE // 2:] = 1
        mask[0, :] = 255
        if bad and i in bad:
            mask[3, 4] = bad[i]
        masks.append(mask)
    return masks


def segmentation_task(classes: int = 2):
    return load_finetune_config("ft_vaihingen_tiny", ["task.sensors=[rgb]", f"task.num_classes={classes}",
                                                      "task.exclude_from_mean=[]"]).task


def multilabel_task():
    return load_finetune_config("ft_ben_tiny", ["task.sensors=[rgb]", "task.num_classes=3"]).task


def dataset(path: Path, task) -> TaskDataset:
    return TaskDataset([path], task, load_stats(path.parent / "stats.json"), train=False)


def test_good_labels_with_ignore_index_pass_both_checks(tmp_path):
    path = write_label_shard(tmp_path / "seg.h5", segmentation_masks(4), segmentation_spec(["a", "b"], SIZE, SIZE))
    data = dataset(path, segmentation_task())
    batches = list(CheckedBatches(make_loader(data, 2, train=False, rank=0, world=1, seed=0, epoch=0,
                                              num_workers=0, pin_memory=False), data))
    assert len(batches) == 2 and int(batches[0]["target"].max()) == 255  # the ignore index went through


def test_segmentation_class_out_of_range_is_refused_when_opened(tmp_path):
    path = write_label_shard(tmp_path / "seg.h5", segmentation_masks(3, bad={2: 7}),
                             segmentation_spec(["a", "b"], SIZE, SIZE))
    with pytest.raises(UserError, match=r"seg.h5: labels/segmentation of sample 's2' holds class 7, but "
                                        r"task.num_classes is 2: classes 0..1, and task.ignore_index 255"):
        dataset(path, segmentation_task())
    assert len(dataset(path, segmentation_task(classes=8))) == 3  # with 8 classes, 7 is a class


def test_a_bad_sample_in_the_middle_is_caught_by_the_batch_check(tmp_path):
    # the open check reads the first and last mask only: sample s2 of 5 is found when its batch is drawn
    path = write_label_shard(tmp_path / "seg.h5", segmentation_masks(5, bad={2: 9}),
                             segmentation_spec(["a", "b"], SIZE, SIZE))
    data = dataset(path, segmentation_task())
    batches = EpochBatches(data, "vaihingen", 5, rank=0, world=1, seed=0, num_workers=0, pin_memory=False)
    with pytest.raises(UserError, match=r"seg.h5: labels/segmentation of sample 's2' holds class 9"):
        list(batches)
    loader = make_loader(data, 2, train=False, rank=0, world=1, seed=0, epoch=0, num_workers=0, pin_memory=False)
    with pytest.raises(UserError, match="'s2' holds class 9"):
        list(CheckedBatches(loader, data))


def test_multilabel_values_other_than_0_1_are_refused_with_the_sample(tmp_path):
    vectors = [np.array([0, 1, 0], np.uint8), np.array([1, 2, 7], np.uint8), np.array([0, 0, 1], np.uint8)]
    path = write_label_shard(tmp_path / "ml.h5", vectors, multilabel_spec(["x", "y", "z"]))
    with pytest.raises(UserError, match=r"ml.h5: labels/multilabel of sample 's1' holds value 2, but multilabel "
                                        r"labels are 0/1 per class"):
        dataset(path, multilabel_task())


def test_float_labels_are_refused_by_dtype(tmp_path):
    spec = LabelSpec(name="segmentation", shape=(SIZE, SIZE), dtype="float32")
    path = write_label_shard(tmp_path / "seg.h5", [m.astype(np.float32) for m in segmentation_masks(2)], spec)
    with pytest.raises(UserError, match=r"seg.h5: labels/segmentation is float32; segmentation labels must be "
                                        r"integers"):
        dataset(path, segmentation_task())


def test_batch_check_on_tensors():
    seg = LabelCheck(segmentation_task())
    target = torch.zeros(3, 4, 4, dtype=torch.int64)
    target[1, 0, 0] = 255
    seg.check_batch(target, ["a", "b", "c"])  # ignore index: fine
    target[2, 1, 1] = -1
    with pytest.raises(UserError, match="sample 'c' holds class -1"):
        seg.check_batch(target, ["a", "b", "c"], lambda sample_id: Path(f"/data/{sample_id}.h5"))
    multi = LabelCheck(multilabel_task())
    multi.check_batch(torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), ["a", "b"])
    with pytest.raises(UserError, match="sample 'b' holds value 0.5"):
        multi.check_batch(torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.5, 0.0]]), ["a", "b"])
