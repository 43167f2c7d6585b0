"""The four downstream tasks: what goes into the model, the loss, the metric, the inference.

- ``ben`` (multilabel): BCE on logits; :class:`~msgfm.finetune.metrics.MultilabelMeanAP`.
- ``vaihingen`` (segmentation; also the SpaceNet building masks): cross-entropy with
  ``ignore_index``; :class:`~msgfm.finetune.metrics.SegmentationMetrics`; images larger
  than the model's input are predicted by sliding windows whose logits are averaged.
- ``sen12mscr`` / ``spacenet`` (restoration): the model predicts the target sensor's bands
  in its *normalized* units as a residual on a base image (the cloudy bands; for
  pan-sharpening the degraded, re-upsampled MS bands); L1 loss in normalized units (every
  band weighs the same), metrics in physical units after clipping to ``task.clip_range``.
  Pan-sharpening follows Wald's protocol: the stored MS image is the reference, the model
  sees it block-averaged by ``task.resolution_ratio`` and upsampled back (bicubic), next to
  the PAN image averaged onto the same grid by the converter.

Legend: B batch, C channels, H x W pixels, K classes.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from msgfm.data.stats import Stats
from msgfm.finetune.config import TaskConfig
from msgfm.finetune.metrics import MultilabelMeanAP, RestorationMetrics, SegmentationMetrics

Forward = Callable[[dict[str, Tensor], "Tensor | None"], Tensor]


class Task:
    """Shared plumbing; subclasses define the loss, the metric and the prediction."""

    def __init__(self, task: TaskConfig, stats: Stats, img_size: int) -> None:
        self.cfg, self.stats, self.img_size = task, stats, img_size

    def inputs(self, batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None
               ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Model inputs on the device (and the residual base, restoration only)."""
        images = {s: _to(x, device, dtype) for s, x in batch["images"].items()}
        return images, None

    def loss(self, output: Tensor, batch: dict[str, Any], device: torch.device) -> Tensor:
        raise NotImplementedError

    def metric(self):
        raise NotImplementedError

    def predict(self, forward: Forward, batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None
                ) -> Tensor:
        """Evaluation output for the metric (on the CPU, float32)."""
        images, base = self.inputs(batch, device, dtype)
        return forward(images, base).float().cpu()


class MultilabelTask(Task):
    def loss(self, output: Tensor, batch: dict[str, Any], device: torch.device) -> Tensor:
        return F.binary_cross_entropy_with_logits(output.float(), batch["target"].to(device))

    def metric(self) -> MultilabelMeanAP:
        return MultilabelMeanAP(self.cfg.num_classes)

    def update(self, metric: MultilabelMeanAP, prediction: Tensor, batch: dict[str, Any]) -> None:
        metric.update(prediction, batch["target"].long())


class SegmentationTask(Task):
    def loss(self, output: Tensor, batch: dict[str, Any], device: torch.device) -> Tensor:
        return F.cross_entropy(output.float(), batch["target"].to(device), ignore_index=self.cfg.ignore_index)

    def metric(self) -> SegmentationMetrics:
        return SegmentationMetrics(self.cfg.num_classes, ignore_index=self.cfg.ignore_index,
                                   exclude_from_mean=tuple(self.cfg.exclude_from_mean))

    def update(self, metric: SegmentationMetrics, prediction: Tensor, batch: dict[str, Any]) -> None:
        metric.update(prediction.argmax(1), batch["target"])

    def predict(self, forward: Forward, batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None
                ) -> Tensor:
        images, _ = self.inputs(batch, device, dtype)
        window = self.cfg.eval_tile or self.img_size
        return sliding_window(lambda x: forward(x, None), images, window, self.cfg.eval_overlap).float().cpu()


class RestorationTask(Task):
    def __init__(self, task: TaskConfig, stats: Stats, img_size: int) -> None:
        super().__init__(task, stats, img_size)
        target = stats.sensor(task.target_sensor)
        self.mean_C11 = torch.tensor(target.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std_C11 = torch.tensor(target.std, dtype=torch.float32).view(-1, 1, 1)

    def inputs(self, batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None
               ) -> tuple[dict[str, Tensor], Tensor | None]:
        images, _ = super().inputs(batch, device, dtype)
        sensor, ratio = self.cfg.target_sensor, self.cfg.resolution_ratio
        if ratio:  # Wald's protocol: the model never sees the reference at full resolution
            images[sensor] = degrade(images[sensor], ratio)
        base = images.get(sensor)
        return images, base

    def normalize(self, physical_BCHW: Tensor) -> Tensor:
        return (physical_BCHW - self.mean_C11.to(physical_BCHW.device)) / self.std_C11.to(physical_BCHW.device)

    def physical(self, normalized_BCHW: Tensor) -> Tensor:
        device = normalized_BCHW.device
        physical = normalized_BCHW.float() * self.std_C11.to(device) + self.mean_C11.to(device)
        return physical.clamp(*self.cfg.clip_range)

    def loss(self, output: Tensor, batch: dict[str, Any], device: torch.device) -> Tensor:
        return F.l1_loss(output.float(), self.normalize(batch["target"].to(device)))

    def metric(self) -> RestorationMetrics:
        return RestorationMetrics(self.cfg.data_range, ergas_ratio=self.cfg.resolution_ratio or None)

    def predict(self, forward: Forward, batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None
                ) -> Tensor:
        return self.physical(super().predict(forward, batch, device, dtype))

    def update(self, metric: RestorationMetrics, prediction: Tensor, batch: dict[str, Any]) -> None:
        metric.update(prediction, batch["target"])

    def base_physical(self, batch: dict[str, Any]) -> Tensor:
        """The input the model improves on, in physical units (for figures and the no-op baseline)."""
        _, base = self.inputs(batch, torch.device("cpu"), None)
        return self.physical(base)


TASK_CLASSES = {"multilabel": MultilabelTask, "segmentation": SegmentationTask, "restoration": RestorationTask}


def build_task(task: TaskConfig, stats: Stats, img_size: int) -> Task:
    return TASK_CLASSES[task.kind](task, stats, img_size)


def degrade(x_BCHW: Tensor, ratio: int) -> Tensor:
    """Block-average by ``ratio`` and upsample back (bicubic): the low-resolution input of Wald's protocol."""
    H, W = x_BCHW.shape[-2:]
    if H % ratio or W % ratio:
        raise ValueError(f"images of {H}x{W} are not a multiple of task.resolution_ratio={ratio}")
    low = F.avg_pool2d(x_BCHW.float(), ratio)
    return F.interpolate(low, size=(H, W), mode="bicubic", align_corners=False).to(x_BCHW.dtype)


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window offsets covering [0, size): step window x (1 - overlap), the last one flush with the end."""
    if size < window:
        raise ValueError(f"image side {size} is smaller than the inference window {window}; use task.eval_tile <= "
                         f"the image size")
    step = max(1, int(window * (1 - overlap)))
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def sliding_window(forward: Callable[[dict[str, Tensor]], Tensor], images: dict[str, Tensor], window: int,
                   overlap: float) -> Tensor:
    """Logits [B, K, H, W] of images larger than the model: windows of ``window`` px, logits averaged."""
    H, W = next(iter(images.values())).shape[-2:]
    if (H, W) == (window, window):
        return forward(images)
    total = count = None
    for top in window_starts(H, window, overlap):
        for left in window_starts(W, window, overlap):
            crop = {s: x[..., top:top + window, left:left + window] for s, x in images.items()}
            logits = forward(crop).float()
            if total is None:
                total = logits.new_zeros((*logits.shape[:2], H, W))
                count = logits.new_zeros((1, 1, H, W))
            total[..., top:top + window, left:left + window] += logits
            count[..., top:top + window, left:left + window] += 1
    return total / count


def _to(x: Tensor, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    x = x.to(device, non_blocking=True)
    return x.to(dtype) if dtype is not None else x
