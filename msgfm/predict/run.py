"""``predict()``: a fine-tuned model over whole scenes, written as a GeoTIFF on the input's grid.

Top to bottom: load the model (msgfm.predict.model), open and check the input rasters
(msgfm.predict.scene), then slide tiles over the scene with overlap blending
(msgfm.predict.blend), each finished strip of rows converted to the output and written
with a windowed write. What is written, per task kind:

- segmentation: ``classes`` (default) one uint8 band of class indices (nodata 255), or
  ``probabilities``: one float32 band per class (softmax of the blended logits; nodata NaN);
- multilabel (scene classification): each tile of the training sample size is classified as a
  whole and its logits spread over its pixels, blended like the others: ``classes`` one uint8
  band per class (1 present, 0 absent: probability >= 0.5; nodata 255) or ``probabilities``;
- restoration (cloud removal, pan-sharpening): the target sensor's bands in physical units
  (float32, clipped to ``task.clip_range``; nodata NaN).

Pixels where the first input has no valid band (its nodata, NaN) are nodata in the output.
Legend: B tiles, K output channels, T tile side, W scene width.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.windows import Window
from torch import Tensor
from tqdm import tqdm

from msgfm.errors import UserError
from msgfm.predict.blend import blend_scene, tiles_of
from msgfm.predict.model import PredictionModel, load_model
from msgfm.predict.scene import SceneInputs
from msgfm.sensors import get_sensor
from msgfm.tasks.downstream import RestorationTask

OUTPUT_KINDS = ("classes", "probabilities")
CLASS_NODATA = 255


def predict(*, model: str | Path, task: str, inputs: list[str], out: str | Path, output: str | None = None,
            band_orders: Sequence[str] = (), overlap: float | None = None, batch_size: int = 8,
            device: str | None = None, progress: bool = True) -> Path:
    """Predict ``inputs`` (one raster per input sensor) with the fine-tuned ``model``; write ``out``."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_model(model, task_name=task, device=torch_device)
    task_cfg = loaded.cfg.task
    kind = _output_kind(task_cfg.kind, output)
    paths = _input_paths(inputs, task_cfg.sensors)
    orders = _band_orders(band_orders, task_cfg.sensors)
    overlap = task_cfg.eval_overlap if overlap is None else overlap
    tile, model_size = _tile_size(loaded)
    coarse = task_cfg.target_sensor if task_cfg.kind == "restoration" and task_cfg.resolution_ratio else ""
    start = time.perf_counter()
    with SceneInputs(paths, loaded.inputs, band_orders=orders, coarse_sensor=coarse,
                     coarse_ratio=task_cfg.resolution_ratio) as scene:
        count = sum(len(row) for row in tiles_of(scene.height, scene.width, tile, overlap))
        bands = _band_names(loaded, kind)

        def forward(positions: list[tuple[int, int]]) -> Tensor:
            reads = [scene.read(top, left, tile) for top, left in positions]
            images = {s: torch.stack([r[0][s] for r in reads]).to(torch_device) for s in task_cfg.sensors}
            valid_B1TT = torch.stack([r[1] for r in reads])[:, None].float()
            return torch.cat([_model_output(loaded, images, tile, model_size).float().cpu(), valid_B1TT], dim=1)

        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        partial = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
        dtype, nodata = ("uint8", CLASS_NODATA) if kind == "classes" else ("float32", float("nan"))
        profile = {"driver": "GTiff", "height": scene.height, "width": scene.width, "count": len(bands),
                   "dtype": dtype, "nodata": nodata, "crs": scene.crs, "transform": scene.transform,
                   "compress": "deflate", "BIGTIFF": "IF_SAFER"}
        try:
            with rasterio.open(partial, "w", **profile) as dst, \
                    tqdm(total=count, unit="tile", desc="predict", disable=not progress) as bar:
                for i, name in enumerate(bands, start=1):
                    dst.set_band_description(i, name)

                def write_rows(top: int, values_KhW: Tensor) -> None:
                    array = _to_output(loaded, kind, values_KhW[:-1], values_KhW[-1] > 0.5)
                    dst.write(array, window=Window(0, top, scene.width, array.shape[1]))

                blend_scene(forward, height=scene.height, width=scene.width, channels=_channels(loaded) + 1,
                            tile=tile, overlap=overlap, batch_size=batch_size, write_rows=write_rows,
                            on_tiles=bar.update)
            os.replace(partial, out_path)
        finally:
            partial.unlink(missing_ok=True)
        seconds = time.perf_counter() - start
        print(f"wrote {out_path}: {scene.height}x{scene.width} px, {len(bands)} band(s) ({kind}), "
              f"CRS {scene.crs}, {count} tiles of {tile} px in {seconds:.1f} s", flush=True)
    return out_path


@torch.no_grad()
def _model_output(model: PredictionModel, images: dict[str, Tensor], tile: int, model_size: int) -> Tensor:
    """[B, K, T, T]: logits (classification, segmentation) or normalized bands (restoration)."""
    if model.task.kind != "multilabel":
        return model.task.scene_output(images)
    # a tile is one training sample: resized to the model's input as in training, classified as a whole
    resized = {s: F.interpolate(x, size=(model_size, model_size), mode="bilinear", align_corners=False)
               for s, x in images.items()}
    logits_BK = model.task.scene_output(resized)
    return logits_BK[:, :, None, None].expand(-1, -1, tile, tile)


def _to_output(model: PredictionModel, kind: str, values_KhW: Tensor, valid_hW: Tensor) -> np.ndarray:
    """Blended raw outputs -> the written bands (see the module docstring)."""
    task = model.task
    if isinstance(task, RestorationTask):
        restored = task.physical(values_KhW[None])[0]
        return restored.masked_fill(~valid_hW, float("nan")).numpy().astype(np.float32)
    if kind == "probabilities":
        probs = values_KhW.softmax(0) if task.kind == "segmentation" else values_KhW.sigmoid()
        return probs.masked_fill(~valid_hW, float("nan")).numpy().astype(np.float32)
    classes = values_KhW.argmax(0, keepdim=True) if task.kind == "segmentation" else values_KhW.sigmoid() >= 0.5
    return classes.to(torch.uint8).masked_fill(~valid_hW, CLASS_NODATA).numpy()


def _tile_size(model: PredictionModel) -> tuple[int, int]:
    """(tile side on the scene, model input side): the model's input, the evaluation tile of a segmentation
    task, and for multilabel the training sample size (resized to the model's input, as in training)."""
    task_cfg, size = model.cfg.task, model.task.img_size
    if task_cfg.kind == "multilabel":
        first = model.inputs.sensors[task_cfg.sensors[0]]
        return first.height, size
    if task_cfg.kind == "segmentation" and task_cfg.eval_tile:
        return task_cfg.eval_tile, size
    return size, size


def _channels(model: PredictionModel) -> int:
    task_cfg = model.cfg.task
    return get_sensor(task_cfg.target_sensor).num_channels if task_cfg.kind == "restoration" else task_cfg.num_classes


def _band_names(model: PredictionModel, kind: str) -> list[str]:
    task_cfg = model.cfg.task
    if task_cfg.kind == "restoration":
        return list(get_sensor(task_cfg.target_sensor).bands)
    if task_cfg.kind == "segmentation" and kind == "classes":
        return ["class"]
    names = list(model.inputs.class_names) or [f"class_{i}" for i in range(task_cfg.num_classes)]
    return names


def _output_kind(task_kind: str, output: str | None) -> str:
    if task_kind == "restoration":
        if output is not None:
            raise UserError(f"--output {output}: a restoration model writes its restored bands; --output "
                            f"(classes | probabilities) is for classification and segmentation models")
        return "bands"
    if output is None:
        return "classes"
    if output not in OUTPUT_KINDS:
        raise UserError(f"--output must be one of {OUTPUT_KINDS}, got '{output}'")
    return output


def _input_paths(inputs: list[str], sensors: list[str]) -> dict[str, Path]:
    """--input PATH (in the model's sensor order) or --input SENSOR=PATH -> {sensor: path}, in sensor order."""
    named = {}
    for position, text in enumerate(inputs):
        sensor, sep, path = text.partition("=")
        if sep and sensor in sensors:
            named[sensor] = Path(path)
        elif position < len(sensors):
            named.setdefault(sensors[position], Path(text))
    if len(inputs) != len(sensors) or set(named) != set(sensors):
        raise UserError(f"the model reads sensor(s) {sensors}: give one --input per sensor, in that order "
                        f"(or as SENSOR=PATH); got {inputs}")
    return {s: named[s] for s in sensors}


def _band_orders(texts: Sequence[str], sensors: list[str]) -> dict[str, list[str]]:
    orders = {}
    for text in texts:
        sensor, sep, names = text.partition("=")
        if not sep or sensor not in sensors or not names:
            raise UserError(f"--band-order {text}: expected SENSOR=BAND,BAND,... with SENSOR one of {sensors}")
        orders[sensor] = [b.strip() for b in names.split(",")]
    return orders
