"""Downstream metrics against independent implementations (scikit-learn, scikit-image, numpy)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import average_precision_score

from msgfm.tasks.metrics import MultilabelMeanAP, RestorationMetrics, SegmentationMetrics, scalars


def _sklearn_ap(target: np.ndarray, scores: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No positive class found in y_true"
        return average_precision_score(target, scores, average=None)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_map_matches_sklearn_and_ignores_batching(batch_size):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(64, 19)).astype(np.float32)
    target = (rng.random((64, 19)) < 0.3).astype(np.int64)
    target[:, 0] = 1  # every image positive
    metric = MultilabelMeanAP(19)
    for i in range(0, 64, batch_size):
        metric.update(torch.from_numpy(scores[i:i + batch_size]), torch.from_numpy(target[i:i + batch_size]))
    out = metric.compute()
    assert out["classes_without_positives"] == 0
    np.testing.assert_allclose(out["AP_per_class"].numpy(), _sklearn_ap(target, scores), atol=1e-6)
    assert float(out["mAP_macro"]) == pytest.approx(average_precision_score(target, scores, average="macro"), abs=1e-6)
    assert float(out["mAP_micro"]) == pytest.approx(average_precision_score(target, scores, average="micro"), abs=1e-6)


@pytest.mark.filterwarnings("ignore:No positive class found")
def test_map_class_without_positives_is_left_out_of_macro():
    rng = np.random.default_rng(1)
    scores = rng.random((40, 6)).astype(np.float32)
    target = (rng.random((40, 6)) < 0.4).astype(np.int64)
    target[:, 2] = 0
    target[:, 4] = 0
    metric = MultilabelMeanAP(6)
    metric.update(torch.from_numpy(scores), torch.from_numpy(target))
    out = metric.compute()
    sk = _sklearn_ap(target, scores)
    has_pos = target.sum(0) > 0
    assert int(out["classes_without_positives"]) == 2
    assert torch.isnan(out["AP_per_class"][[2, 4]]).all()
    np.testing.assert_allclose(out["AP_per_class"].numpy()[has_pos], sk[has_pos], atol=1e-6)
    assert float(out["mAP_macro"]) == pytest.approx(sk[has_pos].mean(), abs=1e-6)
    # sklearn scores such a class 0 and keeps it in the macro mean; we differ on purpose (documented)
    assert float(out["mAP_macro"]) > average_precision_score(target, scores, average="macro")
    # micro pools every (image, label) pair; a class without positives only adds negatives
    assert float(out["mAP_micro"]) == pytest.approx(average_precision_score(target, scores, average="micro"), abs=1e-6)


@pytest.mark.parametrize("batch_sizes", [(64,), (16, 16, 16, 16), (30, 30, 4)])
def test_gfm_batch_mean_map_is_the_image_weighted_mean_of_each_batchs_micro_ap(batch_sizes):
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(64, 19)).astype(np.float32)
    target = (rng.random((64, 19)) < 0.2).astype(np.int64)
    scores += 1.5 * target * rng.random((64, 1)).astype(np.float32)  # images that are easy and hard to score
    metric = MultilabelMeanAP(19)
    per_batch, start = [], 0
    for size in batch_sizes:
        rows = slice(start, start + size)
        metric.update(torch.from_numpy(scores[rows]), torch.from_numpy(target[rows]))
        per_batch.append((average_precision_score(target[rows].ravel(), scores[rows].ravel()), size))
        start += size
    out = metric.compute()
    expected = sum(ap * n for ap, n in per_batch) / sum(n for _, n in per_batch)
    assert float(out["mAP_batch_mean_gfm"]) == pytest.approx(expected, abs=1e-6)
    # the headline stays the dataset-level AP, whatever the batching
    assert float(out["mAP_micro"]) == pytest.approx(average_precision_score(target, scores, average="micro"), abs=1e-6)
    if len(batch_sizes) > 1:  # and the per-batch average is another number
        assert abs(float(out["mAP_batch_mean_gfm"]) - float(out["mAP_micro"])) > 1e-4


def test_gfm_batch_mean_map_leaves_out_batches_without_positives():
    target = torch.tensor([[1, 0], [0, 1], [0, 0], [0, 0]])
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.5, 0.5], [0.4, 0.6]])
    metric = MultilabelMeanAP(2)
    metric.update(scores[:2], target[:2])
    metric.update(scores[2:], target[2:])  # no positive label: no AP, left out
    expected = average_precision_score(target[:2].numpy().ravel(), scores[:2].numpy().ravel())
    assert float(metric.compute()["mAP_batch_mean_gfm"]) == pytest.approx(expected, abs=1e-6)


def test_map_ties_and_perfect_scores():
    target = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    metric = MultilabelMeanAP(2)
    metric.update(target.float(), target)
    assert float(metric.compute()["mAP_macro"]) == pytest.approx(1.0)
    metric.reset()
    scores = torch.full((4, 2), 0.5)  # all tied: AP = prevalence
    metric.update(scores, target)
    expected = average_precision_score(target.numpy(), scores.numpy(), average=None)
    np.testing.assert_allclose(metric.compute()["AP_per_class"].numpy(), expected, atol=1e-6)


def test_map_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\[B, 19\]"):
        MultilabelMeanAP(19).update(torch.rand(4, 18), torch.zeros(4, 18))


def _numpy_confusion(pred: np.ndarray, target: np.ndarray, k: int, ignore: int | None) -> np.ndarray:
    cm = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if ignore is not None and t == ignore:
            continue
        cm[t, p] += 1
    return cm


@pytest.mark.parametrize("ignore_index", [None, 255])
def test_segmentation_metrics_match_numpy_confusion_matrix(ignore_index):
    rng = np.random.default_rng(2)
    k = 6
    target = rng.integers(0, k, size=(5, 17, 19))
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, k, size=target.shape))
    target[:, :3] = 5  # class 5 only in the reference at first
    pred[pred == 5] = 0  # ...and never predicted: IoU 0
    if ignore_index is not None:
        target[:, -2:] = ignore_index
    metric = SegmentationMetrics(k, ignore_index=ignore_index)
    for i in range(5):
        metric.update(torch.from_numpy(pred[i:i + 1]), torch.from_numpy(target[i:i + 1]))
    out = metric.compute()
    cm = _numpy_confusion(pred, target, k, ignore_index)
    np.testing.assert_array_equal(out["confusion_matrix"].numpy(), cm)
    iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    np.testing.assert_allclose(out["IoU_per_class"].numpy(), iou, atol=1e-12)
    assert out["IoU_per_class"][5] == 0
    assert float(out["mIoU"]) == pytest.approx(iou.mean())
    assert float(out["OA"]) == pytest.approx(np.trace(cm) / cm.sum())


def test_segmentation_absent_class_and_exclusion_and_logits():
    target = torch.tensor([[[0, 0], [1, 1]]])
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0, 0, :] = 1  # row 0 -> class 0
    logits[0, 1, 1, 0] = 1  # (1, 0) -> class 1
    logits[0, 0, 1, 1] = 1  # (1, 1) -> class 0 (wrong)
    metric = SegmentationMetrics(3)
    metric.update(logits, target)
    out = metric.compute()
    assert torch.isnan(out["IoU_per_class"][2])  # never in reference nor prediction
    assert float(out["mIoU"]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert float(out["OA"]) == pytest.approx(3 / 4)
    excluded = SegmentationMetrics(3, exclude_from_mean=(1,))
    excluded.update(logits, target)
    assert float(excluded.compute()["mIoU"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="outside 0..2"):
        SegmentationMetrics(3).update(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 7))


def _numpy_sam_degrees(pred: np.ndarray, target: np.ndarray) -> float:
    dot = (pred * target).sum(0)
    norms = np.linalg.norm(pred, axis=0) * np.linalg.norm(target, axis=0)
    valid = norms > 0
    return float(np.degrees(np.arccos(np.clip(dot[valid] / norms[valid], -1, 1))).mean())


def _numpy_ergas(pred: np.ndarray, target: np.ndarray, ratio: float) -> float:
    rmse = np.sqrt(((pred - target) ** 2).reshape(len(pred), -1).mean(1))
    mean = target.reshape(len(target), -1).mean(1)
    return float(100.0 / ratio * np.sqrt(np.mean((rmse / mean) ** 2)))


def _reference_restoration(pred: np.ndarray, target: np.ndarray, data_range: float, ratio: float) -> dict:
    per_image = {"MAE": [], "PSNR": [], "SSIM": [], "SAM": [], "ERGAS": []}
    for p, t in zip(pred, target):
        per_image["MAE"].append(np.abs(p - t).mean())
        with np.errstate(divide="ignore"):
            per_image["PSNR"].append(peak_signal_noise_ratio(t, p, data_range=data_range))
        per_image["SSIM"].append(structural_similarity(t, p, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                                       use_sample_covariance=False, channel_axis=0))
        per_image["SAM"].append(_numpy_sam_degrees(p, t))
        per_image["ERGAS"].append(_numpy_ergas(p, t, ratio))
    return {k: float(np.mean(v)) for k, v in per_image.items()}


@pytest.mark.parametrize("data_range", [1.0, 10000.0])
def test_restoration_metrics_match_skimage_and_formulas(data_range):
    rng = np.random.default_rng(3)
    target = rng.random((6, 4, 32, 29)) * data_range
    pred = np.clip(target + rng.normal(scale=0.05 * data_range, size=target.shape), 0, data_range)
    pred[1] = 0.3 * data_range  # a constant prediction
    metric = RestorationMetrics(data_range=data_range, ergas_ratio=4)
    for i in range(0, 6, 4):  # uneven batches: 4 then 2
        metric.update(torch.from_numpy(pred[i:i + 4]), torch.from_numpy(target[i:i + 4]))
    out = scalars(metric.compute())
    ref = _reference_restoration(pred, target, data_range, ratio=4)
    for name, value in ref.items():
        assert out[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


@pytest.mark.filterwarnings("ignore:divide by zero")
def test_restoration_constant_and_identical_images():
    target = np.full((2, 3, 24, 24), 0.25)
    target[1] = 0.7
    pred = target.copy()
    pred[1, :, :12] = 0.1  # a step edge against a constant reference
    metric = RestorationMetrics(data_range=1.0)
    metric.update(torch.from_numpy(pred[1:]), torch.from_numpy(target[1:]))
    out = scalars(metric.compute())
    ref = _reference_restoration(pred[1:], target[1:], 1.0, ratio=1)
    for name in ("MAE", "PSNR", "SSIM", "SAM"):
        assert out[name] == pytest.approx(ref[name], rel=1e-6, abs=1e-9), name
    assert "ERGAS" not in out  # only with ergas_ratio
    identical = RestorationMetrics(data_range=1.0)
    identical.update(torch.from_numpy(target[:1]), torch.from_numpy(target[:1]))
    out = scalars(identical.compute())
    assert out["MAE"] == 0 and out["SAM"] == pytest.approx(0, abs=1e-5) and out["SSIM"] == pytest.approx(1.0)
    assert math.isinf(out["PSNR"]) and math.isinf(peak_signal_noise_ratio(target[0], target[0], data_range=1.0))


def test_sam_skips_zero_spectra():
    target = torch.ones(1, 3, 11, 11)
    pred = torch.ones(1, 3, 11, 11)
    pred[0, :, 0, 0] = 0  # no angle here
    pred[0, 0, 5, 5] = 2  # one pixel off: angle acos(4 / (sqrt(6) sqrt(3)))
    angle = math.degrees(math.acos(4 / math.sqrt(18)))
    metric = RestorationMetrics(data_range=2.0)
    metric.update(pred, target)
    assert float(metric.compute()["SAM"]) == pytest.approx(angle / (11 * 11 - 1), rel=1e-5)


def test_restoration_rejects_bad_arguments():
    with pytest.raises(ValueError, match="data_range"):
        RestorationMetrics(data_range=0)
    with pytest.raises(ValueError, match="same shape|one shape"):
        RestorationMetrics(data_range=1).update(torch.rand(1, 3, 16, 16), torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match="at least 11x11"):
        RestorationMetrics(data_range=1).update(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
