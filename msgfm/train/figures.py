"""Reconstruction figures (the paper's Figure 3): input, masked input, reconstruction, target.

One row per (source sensor -> target sensor) case present in the batch, so a
paired group shows self reconstruction (s2 -> s2) beside cross reconstruction
(sar -> s2). Images are shown with the sensor's ``rgb_bands`` (msgfm.sensors),
each band of each panel stretched to its 2nd-98th percentile. Rendering uses matplotlib's
object API (no pyplot state), so it can run on the tracking thread.

Legend: C channels, H/W pixels, h/w mask-grid cells (model patches).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from msgfm.sensors import get_sensor


def figure_cases(out: dict[str, Any], images: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """The first sample of every (source, target) case of one model output, on the CPU."""
    cases = []
    for source, by_target in out.get("predictions", {}).items():
        for target, pred_nCHW in by_target.items():
            if pred_nCHW is None or len(pred_nCHW) == 0:
                continue
            index = int(out["sample_index"][source][target][0])
            cases.append({
                "source": source, "target": target,
                "input_CHW": images[source][index].detach().float().cpu(),
                "mask_hw": out["masks"][source][index].detach().cpu(),
                "prediction_CHW": pred_nCHW[0].detach().float().cpu(),
                "target_CHW": out["targets"][source][target][0].detach().float().cpu(),
            })
    return cases


def _stretch(x_CHW: np.ndarray, low: np.ndarray | None = None, high: np.ndarray | None = None,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if low is None or high is None:
        low = np.percentile(x_CHW, 2, axis=(1, 2), keepdims=True)
        high = np.percentile(x_CHW, 98, axis=(1, 2), keepdims=True)
    out = np.clip((x_CHW - low) / np.maximum(high - low, 1e-6), 0, 1)
    return out, low, high


def to_rgb(x_CHW: torch.Tensor, sensor: str, limits: tuple[np.ndarray, np.ndarray] | None = None,
           ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """A sensor image as an H x W x 3 picture in [0, 1] (its rgb_bands, 2-98 % stretch)."""
    bands = list(get_sensor(sensor).rgb_bands)
    picked = x_CHW.detach().float().cpu().numpy()[bands]
    image, low, high = _stretch(picked, *(limits or (None, None)))
    if image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
    return image.transpose(1, 2, 0), (low, high)


def _masked(x_CHW: torch.Tensor, mask_hw: torch.Tensor, sensor: str) -> np.ndarray:
    rgb, _ = to_rgb(x_CHW, sensor)
    scale = rgb.shape[0] // mask_hw.shape[0]
    mask_HW = mask_hw.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy().astype(bool)
    rgb = rgb.copy()
    rgb[mask_HW] = 0.5  # masked patches in grey
    return rgb


def save_reconstruction_figure(cases: list[dict[str, Any]], group: str, path: Path, step: int | None = None) -> Path:
    """Draw the cases of one group into a PNG at ``path``; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = max(len(cases), 1)
    fig = Figure(figsize=(10, 2.6 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 4, squeeze=False)
    titles = ("input", "masked input", "reconstruction", "target")
    for r, case in enumerate(cases):
        src, tgt = case["source"], case["target"]
        pred = case["prediction_CHW"]
        # show the prediction only where the loss looks (masked patches); the rest is the target
        scale = pred.shape[-1] // case["mask_hw"].shape[-1]
        mask_HW = case["mask_hw"].repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        blended = torch.where(mask_HW.unsqueeze(0), pred, case["target_CHW"])
        panels = (to_rgb(case["input_CHW"], src)[0], _masked(case["input_CHW"], case["mask_hw"], src),
                  to_rgb(blended, tgt)[0], to_rgb(case["target_CHW"], tgt)[0])
        for c, (panel, title) in enumerate(zip(panels, titles)):
            ax = axes[r][c]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            sensor = src if c < 2 else tgt
            ax.set_title(f"{title} ({sensor})", fontsize=9)
        kind = "self" if src == tgt else "cross"
        axes[r][0].set_ylabel(f"{src} -> {tgt}\n({kind})", fontsize=9)
    fig.suptitle(f"group {group}" + (f", step {step}" if step is not None else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path
