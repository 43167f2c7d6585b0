"""The downstream tasks: the backbone, a head, and what a task predicts, its loss, metric and inference.

A :class:`DownstreamTask` is the fine-tuning model: the backbone (one channel-stacked embedding
of the task's sensors for the paper's transfer method 2 ``stack``, or one embedding per sensor
for method 1 ``separate``, whose features are concatenated), one LayerNorm per earlier stage for
dense heads (only the last stage has the encoder's final norm, as Swin's dense backbones add),
and the task's head. ``prepare`` moves a batch to the device, ``forward`` returns the training
loss, ``predict`` the evaluation output.

- ``ben`` (multilabel): BCE on logits; :class:`~msgfm.tasks.metrics.MultilabelMeanAP`.
- ``vaihingen`` (segmentation; also the SpaceNet building masks): cross-entropy with
  ``ignore_index``; :class:`~msgfm.tasks.metrics.SegmentationMetrics`; images larger
  than the model's input are predicted by sliding windows whose logits are averaged.
- ``sen12mscr`` / ``spacenet`` (restoration): the model predicts the target sensor's bands
  in its *normalized* units as a residual on a base image (the cloudy bands; for
  pan-sharpening the degraded, re-upsampled MS bands); L1 loss in normalized units (every
  band weighs the same), metrics in physical units after clipping to ``task.clip_range``.
  Pan-sharpening follows Wald's protocol: the stored MS image is the reference, the model
  sees it block-averaged by ``task.resolution_ratio`` and upsampled back (bicubic), next to
  the PAN image averaged onto the same grid by the converter.

Legend: B batch, C channels (C_s of sensor s), H x W pixels, K classes.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msgfm.config import TaskConfig
from msgfm.data.stats import Stats
from msgfm.errors import UserError
from msgfm.models.backbone import MsGFMBackbone
from msgfm.ops.norm import layer_norm_class
from msgfm.tasks.base import Task, TaskOutput, to_device
from msgfm.tasks.heads import LinearHead, RestorationDecoder, UPerNetHead
from msgfm.tasks.metrics import MultilabelMeanAP, RestorationMetrics, SegmentationMetrics

Method = Literal["stack", "separate"]


def stacked_name(sensors: list[str]) -> str:
    """The name of method 2's one embedding for channel-stacked ``sensors`` (``sar+s2``)."""
    return "+".join(sensors)


def backbone_embeddings(sensors: list[str], channels: dict[str, int], method: Method) -> dict[str, int]:
    """The backbone's embeddings for a task: one stacked embedding (method 2) or one per sensor (method 1)."""
    if method not in ("stack", "separate"):
        raise UserError(f"transfer.method must be 'stack' or 'separate', got '{method}'")
    if method == "stack":
        return {stacked_name(sensors): sum(channels[s] for s in sensors)}
    return {s: channels[s] for s in sensors}


class DownstreamTask(Task):
    """Backbone + task head; subclasses define the loss, the metric and the prediction."""

    def __init__(self, backbone: MsGFMBackbone, task: TaskConfig, stats: Stats | None, *, method: Method,
                 num_outputs: int, head_channels: int = 512, head_norm: Literal["bn", "gn"] = "bn",
                 head_dropout: float = 0.0,
                 layernorm: str = "torch") -> None:
        super().__init__(backbone)
        self.cfg, self.stats, self.img_size = task, stats, backbone.img_size
        self.sensors = list(task.sensors)
        self.method = method
        self.kind = task.kind
        model_cfg = backbone.model_cfg
        dim = model_cfg.embed_dim
        copies = 1 if method == "stack" else len(self.sensors)
        widths = [dim * 2**i * copies for i in range(len(model_cfg.depths))]
        if self.kind == "multilabel":
            self.head: nn.Module = LinearHead(widths[-1], num_outputs, head_dropout)
        else:
            norm_layer = layer_norm_class(layernorm)
            self.stage_norms = nn.ModuleList(norm_layer(dim * 2**i) for i in range(len(model_cfg.depths) - 1))
            if self.kind == "segmentation":
                self.head = UPerNetHead(widths, num_outputs, head_channels, dropout=head_dropout, norm=head_norm)
            else:
                self.head = RestorationDecoder(widths, sum(backbone.channels.values()), num_outputs)

    # ------------------------------------------------------------------ the model

    def _stages(self, tokens_BhwD: Tensor) -> list[Tensor]:
        final_BhwF, stages = self.backbone.encoder.forward_stages(tokens_BhwD)
        if self.kind == "multilabel":
            return [final_BhwF.permute(0, 3, 1, 2)]
        stages = [norm(s) for norm, s in zip(self.stage_norms, stages[:-1])] + [final_BhwF]
        return [s.permute(0, 3, 1, 2).contiguous() for s in stages]

    def features(self, images: dict[str, Tensor]) -> list[Tensor]:
        """Stage features NCHW (only the last, pooled-ready, for multilabel), sensors concatenated (method 1)."""
        missing = [s for s in self.sensors if s not in images]
        if missing:
            raise UserError(f"the batch lacks sensor(s) {missing}; the task uses {self.sensors}")
        embed = self.backbone.embed
        if self.method == "stack":
            return self._stages(embed(torch.cat([images[s] for s in self.sensors], dim=1),
                                      stacked_name(self.sensors)))
        per_sensor = [self._stages(embed(images[s], s)) for s in self.sensors]
        return [torch.cat(level, dim=1) for level in zip(*per_sensor)]

    def output(self, images: dict[str, Tensor], base_BCHW: Tensor | None = None) -> Tensor:
        """Logits [B, K] (multilabel), logits [B, K, H, W] (segmentation) or the image [B, C_t, H, W]."""
        features = self.features(images)
        if self.kind == "multilabel":
            return self.head(features)
        if self.kind == "segmentation":
            logits = self.head(features)
            size = images[self.sensors[0]].shape[-2:]
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        image = torch.cat([images[s] for s in self.sensors], dim=1)
        return self.head(features, image, base_BCHW)

    def scene_output(self, images: dict[str, Tensor]) -> Tensor:
        """``output`` for normalized tiles of a scene (``msgfm predict``): restoration's residual base is the
        target sensor's bands as given, never degraded (Wald's protocol is for scoring at reduced resolution;
        a scene is restored at its own resolution)."""
        base = images.get(self.cfg.target_sensor) if self.kind == "restoration" else None
        return self.output(images, base)

    def encoder_modules(self) -> list[nn.Module]:
        """What linear probing freezes: the embedding(s) and the encoder."""
        return [self.backbone]

    # ------------------------------------------------------------------ the Task protocol

    def prepare(self, batch: dict[str, Any], group: str, device: torch.device,
                dtype: torch.dtype | None) -> dict[str, Any]:
        """Images (engine dtype), the residual base (restoration) and the target on the device."""
        images = {s: to_device(x, device, dtype) for s, x in batch["images"].items()}
        inputs: dict[str, Any] = {"images": images, "base": None}
        if "target" in batch:
            inputs["target"] = batch["target"].to(device, non_blocking=True)
        return inputs

    def forward(self, inputs: dict[str, Any], group: str = "train", keep_outputs: bool = False) -> TaskOutput:
        output = self.output(inputs["images"], inputs["base"])
        task_loss = self.loss(output, inputs["target"])
        loss, aux = self.add_aux_loss(task_loss)
        metrics = {"loss": loss.detach(), "task_loss": task_loss.detach()}
        if aux is not None:
            metrics["aux_loss"] = aux.detach()
        out: TaskOutput = {"loss": loss, "metrics": metrics}
        if keep_outputs:
            out["output"] = output.detach()
        return out

    def metric_keys(self, group: str) -> list[str]:
        return ["loss", "task_loss", "aux_loss"]

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def metric(self) -> Any:
        raise NotImplementedError

    def update(self, metric: Any, prediction: Tensor, batch: dict[str, Any]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None) -> Tensor:
        """Evaluation output for the metric (on the CPU, float32)."""
        inputs = self.prepare(batch, "eval", device, dtype)
        return self.output(inputs["images"], inputs["base"]).float().cpu()


class MultilabelTask(DownstreamTask):
    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(output.float(), target)

    def metric(self) -> MultilabelMeanAP:
        return MultilabelMeanAP(self.cfg.num_classes)

    def update(self, metric: MultilabelMeanAP, prediction: Tensor, batch: dict[str, Any]) -> None:
        metric.update(prediction, batch["target"].long())


class SegmentationTask(DownstreamTask):
    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.float(), target, ignore_index=self.cfg.ignore_index)

    def metric(self) -> SegmentationMetrics:
        return SegmentationMetrics(self.cfg.num_classes, ignore_index=self.cfg.ignore_index,
                                   exclude_from_mean=tuple(self.cfg.exclude_from_mean))

    def update(self, metric: SegmentationMetrics, prediction: Tensor, batch: dict[str, Any]) -> None:
        metric.update(prediction.argmax(1), batch["target"])

    @torch.no_grad()
    def predict(self, batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None) -> Tensor:
        images = self.prepare(batch, "eval", device, dtype)["images"]
        window = self.cfg.eval_tile or self.img_size
        return sliding_window(self.output, images, window, self.cfg.eval_overlap).float().cpu()


class RestorationTask(DownstreamTask):
    def __init__(self, backbone: MsGFMBackbone, task: TaskConfig, stats: Stats | None, **kwargs: Any) -> None:
        super().__init__(backbone, task, stats, **kwargs)
        if stats is None:
            raise UserError(f"task '{task.name}' predicts physical units: it needs the training statistics")
        target = stats.sensor(task.target_sensor)
        self.mean_C11 = torch.tensor(target.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std_C11 = torch.tensor(target.std, dtype=torch.float32).view(-1, 1, 1)

    def prepare(self, batch: dict[str, Any], group: str, device: torch.device,
                dtype: torch.dtype | None) -> dict[str, Any]:
        inputs = super().prepare(batch, group, device, dtype)
        images = inputs["images"]
        sensor, ratio = self.cfg.target_sensor, self.cfg.resolution_ratio
        if ratio:  # Wald's protocol: the model never sees the reference at full resolution
            images[sensor] = degrade(images[sensor], ratio)
        inputs["base"] = images.get(sensor)
        return inputs

    def normalize(self, physical_BCHW: Tensor) -> Tensor:
        return (physical_BCHW - self.mean_C11.to(physical_BCHW.device)) / self.std_C11.to(physical_BCHW.device)

    def physical(self, normalized_BCHW: Tensor) -> Tensor:
        device = normalized_BCHW.device
        physical = normalized_BCHW.float() * self.std_C11.to(device) + self.mean_C11.to(device)
        return physical.clamp(*self.cfg.clip_range)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.l1_loss(output.float(), self.normalize(target))

    def metric(self) -> RestorationMetrics:
        return RestorationMetrics(self.cfg.data_range, ergas_ratio=self.cfg.resolution_ratio or None)

    @torch.no_grad()
    def predict(self, batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None) -> Tensor:
        return self.physical(super().predict(batch, device, dtype))

    def update(self, metric: RestorationMetrics, prediction: Tensor, batch: dict[str, Any]) -> None:
        metric.update(prediction, batch["target"])

    def base_physical(self, batch: dict[str, Any]) -> Tensor:
        """The input the model improves on, in physical units (for figures and the no-op baseline)."""
        base = self.prepare(batch, "eval", torch.device("cpu"), None)["base"]
        return self.physical(base)


TASK_CLASSES: dict[str, type[DownstreamTask]] = {"multilabel": MultilabelTask, "segmentation": SegmentationTask,
                                                 "restoration": RestorationTask}


def degrade(x_BCHW: Tensor, ratio: int) -> Tensor:
    """Block-average by ``ratio`` and upsample back (bicubic): the low-resolution input of Wald's protocol."""
    H, W = x_BCHW.shape[-2:]
    if H % ratio or W % ratio:
        raise UserError(f"images of {H}x{W} are not a multiple of task.resolution_ratio={ratio}")
    low = F.avg_pool2d(x_BCHW.float(), ratio)
    return F.interpolate(low, size=(H, W), mode="bicubic", align_corners=False).to(x_BCHW.dtype)


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window offsets covering [0, size): step window x (1 - overlap), the last one flush with the end."""
    if size < window:
        raise UserError(f"image side {size} is smaller than the inference window {window}; use task.eval_tile <= "
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
    tiles = [(top, left) for top in window_starts(H, window, overlap) for left in window_starts(W, window, overlap)]
    total: Tensor | None = None
    count = torch.zeros((1, 1, H, W))
    for top, left in tiles:
        crop = {s: x[..., top:top + window, left:left + window] for s, x in images.items()}
        logits = forward(crop).float()
        if total is None:
            total = logits.new_zeros((*logits.shape[:2], H, W))
            count = count.to(logits.device)
        total[..., top:top + window, left:left + window] += logits
        count[..., top:top + window, left:left + window] += 1
    assert total is not None  # window_starts gives at least one tile
    return total / count

