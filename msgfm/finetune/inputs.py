"""What a fine-tuned model expects of its inputs, recorded in its run folder (``model_inputs.json``).

A model is only usable on new rasters if the pixels reach it in the units it was trained in: per
input sensor the bands in storage order, the raw units of the training shards (physical =
raw x scale + offset, the nodata value, the stored dtype), the training sample size, and the
normalization statistics. Fine-tuning writes these facts once at the start of a run (rank 0);
``msgfm predict`` reads them, so a run folder predicts without its training data. Class names
(classification, segmentation) travel with them for the output's band descriptions.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from msgfm.data.format import ShardInfo
from msgfm.data.stats import Stats
from msgfm.errors import MissingFileError, UserError

INPUTS_FILE = "model_inputs.json"
INPUTS_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class SensorInput:
    """One input sensor as the training shards stored it."""

    bands: tuple[str, ...]
    scale: float
    offset: float
    nodata: float | None
    dtype: str
    height: int  # training sample size (pixels)
    width: int


@dataclass(frozen=True, kw_only=True)
class ModelInputs:
    """The recorded facts of one fine-tuned model (see the module docstring)."""

    task: str
    sensors: dict[str, SensorInput]  # the task's input sensors, in task order
    stats: Stats
    class_names: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"msgfm_model_inputs_version": INPUTS_VERSION, "task": self.task,
                "sensors": {name: {**asdict(s), "bands": list(s.bands)} for name, s in self.sensors.items()},
                "class_names": list(self.class_names), "stats": self.stats.to_dict()}


def model_inputs(task: str, sensors: list[str], shard: ShardInfo, stats: Stats,
                 class_names: list[str]) -> ModelInputs:
    """The inputs of a task trained on shards like ``shard`` (the first training shard)."""
    specs = {}
    for name in sensors:
        info = shard.sensors[name]
        specs[name] = SensorInput(bands=tuple(info.bands), scale=float(info.scale), offset=float(info.offset),
                                  nodata=info.nodata, dtype=str(info.dtype), height=info.shape[2],
                                  width=info.shape[3])
    return ModelInputs(task=task, sensors=specs, stats=stats, class_names=tuple(class_names))


def write_model_inputs(inputs: ModelInputs, folder: Path) -> Path:
    """``folder/model_inputs.json``, written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / INPUTS_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(inputs.to_dict(), indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_model_inputs(folder: Path) -> ModelInputs:
    """The facts a fine-tuning run recorded in ``folder``."""
    path = folder / INPUTS_FILE
    if not path.is_file():
        raise MissingFileError(f"{path} is missing: this run folder was fine-tuned before msgfm recorded its "
                               f"inputs; fine-tune again (a resumed run writes it too)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable JSON file ({err})") from None
    if doc.get("msgfm_model_inputs_version") != INPUTS_VERSION:
        raise UserError(f"{path}: version {doc.get('msgfm_model_inputs_version')!r}, this msgfm reads "
                        f"{INPUTS_VERSION}")
    try:
        sensors = {name: SensorInput(**{**s, "bands": tuple(s["bands"])}) for name, s in doc["sensors"].items()}
        return ModelInputs(task=str(doc["task"]), sensors=sensors, stats=Stats.from_dict(doc["stats"], path),
                           class_names=tuple(doc.get("class_names", ())))
    except (KeyError, TypeError) as err:
        raise UserError(f"{path}: incomplete ({err!r}); fine-tune again to record it") from None
