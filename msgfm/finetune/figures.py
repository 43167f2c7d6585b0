"""Prediction figures and per-class tables for MLflow.

- segmentation: input (the first sensor's ``rgb_bands``), reference and prediction as
  class colours over the input;
- restoration: input (cloudy image / upsampled MS), prediction, reference, with the
  same stretch for the three so that colours compare (cloud removal before / after,
  pan-sharpened vs reference).

Rendering uses matplotlib's object API (no pyplot state): it runs on the tracking thread.
Legend: C channels, H x W pixels, K classes.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msgfm.train.figures import to_rgb

# Distinct class colours (tab10), background of building masks first.
_PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                     [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]]) / 255.0


def _overlay(rgb_HW3: np.ndarray, classes_HW: np.ndarray, ignore_index: int) -> np.ndarray:
    colours = _PALETTE[np.clip(classes_HW, 0, len(_PALETTE) - 1) % len(_PALETTE)]
    blend = 0.45 * rgb_HW3 + 0.55 * colours
    blend[classes_HW == ignore_index] = rgb_HW3[classes_HW == ignore_index]
    return blend


def _figure(rows: int, cols: int) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3 * cols, 3 * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def save_segmentation_figure(images_BCHW: torch.Tensor, sensor: str, target_BHW: torch.Tensor,
                             pred_BHW: torch.Tensor, ignore_index: int, class_names: Sequence[str],
                             path: Path, title: str = "") -> Path:
    fig, axes = _figure(len(images_BCHW), 3)
    for row, (image, target, pred) in enumerate(zip(images_BCHW, target_BHW, pred_BHW)):
        rgb, _ = to_rgb(image, sensor)
        axes[row, 0].imshow(rgb)
        axes[row, 1].imshow(_overlay(rgb, target.numpy(), ignore_index))
        axes[row, 2].imshow(_overlay(rgb, pred.numpy(), ignore_index))
    for col, name in enumerate((f"input ({sensor})", "reference", "prediction")):
        axes[0, col].set_title(name)
    fig.suptitle(f"{title}  classes: " + ", ".join(f"{i}={n}" for i, n in enumerate(class_names)), fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def save_restoration_figure(inputs_BCHW: torch.Tensor, pred_BCHW: torch.Tensor, target_BCHW: torch.Tensor,
                            sensor: str, path: Path, input_name: str, title: str = "") -> Path:
    fig, axes = _figure(len(pred_BCHW), 3)
    for row, (inp, pred, target) in enumerate(zip(inputs_BCHW, pred_BCHW, target_BCHW)):
        reference, limits = to_rgb(target, sensor)  # one stretch for the row: colours compare
        axes[row, 0].imshow(to_rgb(inp, sensor, limits)[0])
        axes[row, 1].imshow(to_rgb(pred, sensor, limits)[0])
        axes[row, 2].imshow(reference)
    for col, name in enumerate((input_name, "prediction", "reference")):
        axes[0, col].set_title(name)
    if title:
        fig.suptitle(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def save_per_class_table(values: dict[str, torch.Tensor], class_names: Sequence[str], path: Path) -> Path:
    """CSV with one row per class and one column per per-class metric (e.g. AP, IoU, F1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["class", *values])
        for i, name in enumerate(class_names):
            writer.writerow([name, *(f"{float(v[i]):.6f}" for v in values.values())])
    return path
