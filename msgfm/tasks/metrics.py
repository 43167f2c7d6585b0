"""Downstream metrics, accumulated over the whole evaluation set.

Every metric here is a ``torchmetrics.Metric``: call ``update`` per batch, ``compute``
once at the end. States are sums or concatenations, so the result is the same
whatever the batch size (no per-batch averages are averaged), and torchmetrics
synchronises them across ranks when ``torch.distributed`` is initialised.

Shapes (legend): B = images in a batch, K = labels / classes, C = bands, H x W = pixels.

Conventions, chosen once here and documented in docs/finetune.md:

- ``MultilabelMeanAP`` (BigEarthNet): average precision as scikit-learn's
  ``average_precision_score`` defines it (step-wise area under the
  precision-recall curve, no interpolation), computed by torchmetrics over all
  stored scores. Micro: all (image, label) pairs pooled. Macro: the mean of the
  per-class APs over the classes that have at least one positive in the
  evaluation set. A class without positives has no defined AP (recall is 0/0);
  scikit-learn and torchmetrics score it 0, which pulls the macro mean down by
  an amount that depends only on which classes a small split happens to
  miss. We report its AP as NaN, leave it out of the macro mean and report how
  many classes were left out. These dataset-level numbers are the headline.
  Beside them, ``mAP_batch_mean_gfm`` is the number GFM's fine-tuning code (the
  paper's [39]) reports for BigEarthNet: the micro AP of each evaluation batch
  (all its image-label pairs pooled), averaged over batches weighted by their
  images. It depends on the evaluation batch size and is not an AP of the set;
  it is there to compare with numbers obtained that way. A batch without any
  positive label has no AP and is left out of that mean.
- ``SegmentationMetrics`` (Vaihingen): one confusion matrix over every labelled
  pixel of the set (``ignore_index`` pixels skipped). IoU_k = TP / (TP + FP + FN);
  a class absent from both prediction and reference has no IoU (NaN) and is
  left out of the mean. Overall accuracy = trace / total.
- ``RestorationMetrics`` (SEN12MS-CR, SpaceNet): each metric is computed per image
  and averaged over the images of the set, the convention of the cloud-removal
  and pan-sharpening literature. SSIM follows Wang et al. / scikit-image with
  ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``: an 11x11
  Gaussian window, and the border where the window leaves the image excluded
  from the mean. PSNR needs an explicit ``data_range``; an exact reconstruction
  has PSNR +inf (as scikit-image). SAM is in degrees; pixels where either
  spectrum is all zero have no angle and are skipped. ERGAS =
  100 / ratio * sqrt(mean_k (RMSE_k / mean_k(reference))^2) with ``ratio`` the
  low-resolution GSD over the high-resolution GSD (4 for WorldView-3 PAN/MS).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.functional.classification import binary_average_precision, multilabel_average_precision
from torchmetrics.functional.image import (
    error_relative_global_dimensionless_synthesis,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from msgfm.errors import UserError

# SSIM window as in scikit-image with gaussian_weights=True: sigma 1.5, truncated at 3.5 sigma -> 11 px.
SSIM_SIGMA = 1.5
SSIM_KERNEL = 2 * int(3.5 * SSIM_SIGMA + 0.5) + 1


class MultilabelMeanAP(Metric):
    """Micro and macro mean average precision of multilabel scores (BigEarthNet).

    ``update(scores_BK, target_BK)`` takes scores of any monotone scale (logits or
    probabilities) and 0/1 targets. ``compute()`` returns ``mAP_micro``,
    ``mAP_macro`` (classes without positives left out, see the module docstring),
    ``AP_per_class`` [K] (NaN where undefined), ``classes_without_positives`` and
    ``mAP_batch_mean_gfm`` (GFM's per-batch average, see the module docstring).
    """

    full_state_update = False
    scores: list[Tensor]  # states registered with add_state (gathered over ranks by torchmetrics)
    targets: list[Tensor]
    batch_ap_sum: Tensor  # sum over batches of (micro AP of the batch x images in it)
    batch_images: Tensor  # images in the batches that had an AP

    def __init__(self, num_labels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_labels < 1:
            raise UserError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")
        self.add_state("batch_ap_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("batch_images", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores_BK: Tensor, target_BK: Tensor) -> None:
        if scores_BK.shape != target_BK.shape or scores_BK.ndim != 2 or scores_BK.shape[1] != self.num_labels:
            raise UserError(f"expected scores and targets of shape [B, {self.num_labels}], got "
                            f"{tuple(scores_BK.shape)} and {tuple(target_BK.shape)}")
        self.scores.append(scores_BK.detach().float())
        self.targets.append(target_BK.detach().long())
        if target_BK.any():  # GFM: torchmetrics' binary AP over the batch's flattened pairs
            batch_ap = binary_average_precision(scores_BK.detach().float().flatten(),
                                                target_BK.detach().long().flatten(), thresholds=None)
            self.batch_ap_sum += batch_ap.double() * scores_BK.shape[0]
            self.batch_images += scores_BK.shape[0]

    def compute(self) -> dict[str, Tensor]:
        scores = _cat(self.scores)
        targets = _cat(self.targets)
        if scores.numel() == 0:
            raise UserError("MultilabelMeanAP.compute() called before any update")
        has_positive = targets.sum(0) > 0
        with warnings.catch_warnings():
            # torchmetrics warns about the classes without positives; we report them ourselves.
            warnings.simplefilter("ignore", UserWarning)
            per_class = multilabel_average_precision(scores, targets, self.num_labels, average="none", thresholds=None)
            micro = multilabel_average_precision(scores, targets, self.num_labels, average="micro", thresholds=None)
        per_class = torch.where(has_positive, per_class, torch.full_like(per_class, float("nan")))
        macro = per_class[has_positive].mean() if has_positive.any() else torch.tensor(float("nan"))
        batch_mean = (self.batch_ap_sum / self.batch_images).float() if self.batch_images > 0 \
            else torch.tensor(float("nan"))
        return {"mAP_micro": micro, "mAP_macro": macro, "AP_per_class": per_class,
                "classes_without_positives": (~has_positive).sum(), "mAP_batch_mean_gfm": batch_mean}


class SegmentationMetrics(Metric):
    """mIoU, per-class IoU and F1, and overall accuracy from one confusion matrix.

    ``update(pred_BHW, target_BHW)`` takes class indices (or logits [B, K, H, W],
    reduced with argmax). ``exclude_from_mean`` lists classes kept in the per-class
    table but left out of mIoU / mF1 (some Vaihingen protocols drop clutter).
    """

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int | None = None,
                 exclude_from_mean: tuple[int, ...] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise UserError(f"num_classes must be >= 2, got {num_classes}")
        bad = [k for k in exclude_from_mean if not 0 <= k < num_classes]
        if bad:
            raise UserError(f"exclude_from_mean {bad} are not classes 0..{num_classes - 1}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.exclude_from_mean = tuple(exclude_from_mean)
        self.confusion = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False)

    def update(self, pred: Tensor, target_BHW: Tensor) -> None:
        if pred.ndim == target_BHW.ndim + 1:
            pred = pred.argmax(1)
        if pred.shape != target_BHW.shape:
            raise UserError(f"prediction {tuple(pred.shape)} and target {tuple(target_BHW.shape)} differ in shape")
        target = target_BHW.long()
        valid = torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None else target != self.ignore_index
        out_of_range = valid & ((target < 0) | (target >= self.num_classes))
        if out_of_range.any():
            raise UserError(f"target holds labels {sorted(target[out_of_range].unique().tolist())} outside "
                            f"0..{self.num_classes - 1} (ignore_index={self.ignore_index})")
        self.confusion.update(pred.long().flatten(), target.flatten())

    def compute(self) -> dict[str, Tensor]:
        cm = self.confusion.compute().double()  # [K_true, K_pred]
        tp = cm.diag()
        fp = cm.sum(0) - tp
        fn = cm.sum(1) - tp
        iou = tp / (tp + fp + fn)  # 0/0 -> NaN: class absent everywhere
        f1 = 2 * tp / (2 * tp + fp + fn)
        in_mean = torch.ones(self.num_classes, dtype=torch.bool)
        in_mean[list(self.exclude_from_mean)] = False
        in_mean &= ~torch.isnan(iou)
        total = cm.sum()
        return {"mIoU": iou[in_mean].mean(), "mF1": f1[in_mean].mean(), "OA": tp.sum() / total,
                "IoU_per_class": iou, "F1_per_class": f1, "confusion_matrix": cm.long()}

    def reset(self) -> None:
        super().reset()
        self.confusion.reset()


class RestorationMetrics(Metric):
    """Per-image MAE, RMSE, PSNR, SSIM, SAM (degrees) and ERGAS, averaged over the set.

    ``update(pred_BCHW, target_BCHW)`` takes images in the units ``data_range``
    refers to (reflectance in [0, 1] for SEN12MS-CR). ``ergas_ratio`` (low-res GSD
    / high-res GSD) enables ERGAS, which only means something for pan-sharpening.
    """

    full_state_update = False
    NAMES = ("MAE", "RMSE", "PSNR", "SSIM", "SAM", "ERGAS")

    def __init__(self, data_range: float, ergas_ratio: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not data_range > 0:
            raise UserError(f"data_range must be > 0 (the span of valid pixel values), got {data_range}")
        if ergas_ratio is not None and not ergas_ratio > 0:
            raise UserError(f"ergas_ratio must be > 0 (low-res GSD / high-res GSD), got {ergas_ratio}")
        self.data_range = float(data_range)
        self.ergas_ratio = ergas_ratio
        for name in self.NAMES:
            self.add_state(f"sum_{name}", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"count_{name}", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred_BCHW: Tensor, target_BCHW: Tensor) -> None:
        if pred_BCHW.shape != target_BCHW.shape or pred_BCHW.ndim != 4:
            raise UserError(f"expected prediction and target of one shape [B, C, H, W], got "
                            f"{tuple(pred_BCHW.shape)} and {tuple(target_BCHW.shape)}")
        pred, target = pred_BCHW.detach().double(), target_BCHW.detach().double()
        per_image = {
            "MAE": (pred - target).abs().flatten(1).mean(1),
            "RMSE": (pred - target).pow(2).flatten(1).mean(1).sqrt(),
            "PSNR": peak_signal_noise_ratio(pred, target, data_range=self.data_range, dim=(1, 2, 3),
                                            reduction="none"),
            "SSIM": ssim_per_image(pred, target, self.data_range),
            "SAM": sam_per_image(pred, target),
        }
        if self.ergas_ratio is not None:
            per_image["ERGAS"] = error_relative_global_dimensionless_synthesis(
                pred, target, ratio=self.ergas_ratio, reduction="none")
        for name, values in per_image.items():
            keep = ~torch.isnan(values)  # SAM of an image whose every pixel is all-zero
            setattr(self, f"sum_{name}", getattr(self, f"sum_{name}") + values[keep].sum())
            setattr(self, f"count_{name}", getattr(self, f"count_{name}") + keep.sum())

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for name in self.NAMES:
            count = getattr(self, f"count_{name}")
            if count > 0:
                out[name] = getattr(self, f"sum_{name}") / count
        if not out:
            raise UserError("RestorationMetrics.compute() called before any update")
        return out


def ssim_per_image(pred_BCHW: Tensor, target_BCHW: Tensor, data_range: float) -> Tensor:
    """SSIM of each image [B], as scikit-image computes it with Gaussian weights (sigma 1.5).

    torchmetrics averages its SSIM map over the reflect-padded border too; the
    reference implementation excludes the band where the 11x11 window leaves the
    image, so we take torchmetrics' full map and crop that band before averaging.
    """
    pad = (SSIM_KERNEL - 1) // 2
    if min(pred_BCHW.shape[-2:]) < SSIM_KERNEL:
        raise UserError(f"SSIM needs images of at least {SSIM_KERNEL}x{SSIM_KERNEL} pixels, got "
                        f"{tuple(pred_BCHW.shape[-2:])}")
    _, ssim_map_BCHW = structural_similarity_index_measure(
        pred_BCHW, target_BCHW, gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL,
        data_range=data_range, reduction="none", return_full_image=True)
    return ssim_map_BCHW[..., pad:-pad, pad:-pad].flatten(1).mean(1)


def sam_per_image(pred_BCHW: Tensor, target_BCHW: Tensor) -> Tensor:
    """Mean spectral angle in degrees of each image [B]; NaN for an image with no valid pixel."""
    dot_BHW = (pred_BCHW * target_BCHW).sum(1)
    norms_BHW = pred_BCHW.norm(dim=1) * target_BCHW.norm(dim=1)
    valid_BHW = norms_BHW > 0
    cosine = torch.where(valid_BHW, dot_BHW / norms_BHW.clamp_min(torch.finfo(norms_BHW.dtype).tiny), 1.0)
    angle_BHW = torch.rad2deg(torch.acos(cosine.clamp(-1.0, 1.0)))
    count = valid_BHW.flatten(1).sum(1)
    total = torch.where(valid_BHW, angle_BHW, 0.0).flatten(1).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def _cat(items: list[Tensor] | Tensor) -> Tensor:
    # After a distributed sync torchmetrics has already concatenated the list into one tensor.
    if isinstance(items, Tensor):
        return items
    return torch.cat(items) if items else torch.empty(0)


def scalars(result: dict[str, Tensor]) -> dict[str, float]:
    """The scalar entries of a metric result, as floats (for logging); per-class tensors are dropped."""
    return {k: float(v) for k, v in result.items() if isinstance(v, Tensor) and v.numel() == 1}
