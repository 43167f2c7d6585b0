"""Evaluation over a whole split: metrics accumulated over every sample, figures, per-class tables.

Legend: B batch, C channels, H x W pixels, K classes.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from msgfm.finetune.figures import save_per_class_table, save_restoration_figure, save_segmentation_figure
from msgfm.tasks.downstream import DownstreamTask, RestorationTask, SegmentationTask
from msgfm.tasks.metrics import scalars


@torch.no_grad()
def evaluate(task: DownstreamTask, loader: Iterable[dict[str, Any]], device: torch.device, dtype: torch.dtype | None,
             *, max_batches: int | None = None, num_figures: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metric result, first ``num_figures`` samples for figures), with ``task.predict``.

    Every rank evaluates its slice; the torchmetrics states are reduced over ranks in ``compute``.
    The RNG is forked and seeded: DeepSpeed's MoE gate drops over-capacity tokens at random even in
    eval mode, and the same weights must give the same numbers (and training's RNG stream is untouched).
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        return _evaluate(task, loader, device, dtype, max_batches, num_figures)


def _evaluate(task: DownstreamTask, loader: Iterable[dict[str, Any]], device: torch.device, dtype: torch.dtype | None,
              max_batches: int | None, num_figures: int) -> tuple[dict[str, Any], dict[str, Any]]:
    metric = task.metric()
    kept: dict[str, list[torch.Tensor]] = {"images": [], "prediction": [], "target": [], "base": []}
    start, samples = time.perf_counter(), 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        prediction = task.predict(batch, device, dtype)
        task.update(metric, prediction, batch)
        samples += len(batch["ids"])
        if sum(len(x) for x in kept["prediction"]) < num_figures:
            kept["images"].append(batch["images"][task.cfg.sensors[0]])
            kept["prediction"].append(prediction)
            kept["target"].append(batch["target"])
            if isinstance(task, RestorationTask):
                kept["base"].append(task.base_physical(batch))
    result = metric.compute()
    result["samples_per_second"] = torch.tensor(samples / max(time.perf_counter() - start, 1e-9))
    figures = {k: torch.cat(v)[:num_figures] for k, v in kept.items() if v}
    return result, figures


def write_outputs(task: DownstreamTask, result: dict[str, Any], figures: dict[str, Any], folder: Path, split: str,
                  class_names: list[str]) -> dict[str, Path]:
    """Per-class CSV and the prediction figure of one evaluation; returns artifact path -> file."""
    files: dict[str, Path] = {}
    per_class = {k.replace("_per_class", ""): v for k, v in result.items() if k.endswith("_per_class")}
    if per_class:
        files["tables"] = save_per_class_table(per_class, class_names, folder / f"{split}_per_class.csv")
    if not figures:
        return files
    name = f"{split}_predictions.png"
    if isinstance(task, SegmentationTask):
        files["figures"] = save_segmentation_figure(
            figures["images"], task.cfg.sensors[0], figures["target"], figures["prediction"].argmax(1),
            task.cfg.ignore_index, class_names, folder / name, title=f"{task.cfg.name} {split}")
    elif isinstance(task, RestorationTask):
        input_name = "degraded MS (input)" if task.cfg.resolution_ratio else "cloudy (input)"
        files["figures"] = save_restoration_figure(
            figures["base"], figures["prediction"], figures["target"], task.cfg.target_sensor, folder / name,
            input_name, title=f"{task.cfg.name} {split}")
    return files


def summary_line(split: str, result: dict[str, Any]) -> str:
    values = scalars(result)
    return f"{split}: " + "  ".join(f"{k}={v:.4f}" for k, v in values.items() if k != "samples_per_second")
