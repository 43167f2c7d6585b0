"""What ``msgfm export`` reads: a pretraining checkpoint (DeepSpeed layout, any ranks and expert-parallel
size, dense or MoE) or a fine-tuning run, reduced to the facts an export needs.

Checkpoint files are verified against their manifest and loaded as data only
(msgfm/train/checkpoint.py, msgfm/train/safe_load.py); a fine-tuning run's ``best/model.pt``
too (safe_load).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from msgfm.config import config_from_dict, load_finetune_config
from msgfm.data.format import read_shard_info
from msgfm.errors import MissingFileError, UserError
from msgfm.finetune.inputs import INPUTS_FILE
from msgfm.models.adapter import backbone_state
from msgfm.sensors import get_sensor
from msgfm.train import checkpoint as ckpt
from msgfm.train.safe_load import load_weights
from msgfm.train.tracking import tracking_uri

# DeepSpeed's MoE names inside an msgfm encoder -> the export's (msgfm/backbone/model.py)
DS_GATE, EXPORT_GATE = ".mlp.moe.deepspeed_moe.gate.wg.", ".mlp.gate."
DS_EXPERTS, EXPORT_EXPERTS = ".mlp.moe.deepspeed_moe.experts.deepspeed_experts.", ".mlp.experts."


@dataclass
class ExportSource:
    """A trained model as the exporter sees it."""

    kind: str  # "pretraining" or "fine-tuning"
    name: str  # the checkpoint tag or "best"
    model_cfg: dict[str, Any]
    backbone: dict[str, torch.Tensor]  # backbone layout (msgfm/models/adapter.py)
    decoders: dict[str, torch.Tensor]
    sensor_bands: dict[str, list[str]]  # embedding name -> band names in storage order
    stats: dict[str, dict[str, Any]]  # data group -> Stats.to_dict()
    group_sensors: dict[str, list[str]]
    step: int | None
    config_hash: str
    trained_with_commit: str
    run_dir: Path | None
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None  # where the run's MLflow run lives
    notes: list[str] = field(default_factory=list)
    # a fine-tuning run's whole task module and the files prediction builds it from (config.yaml and
    # model_inputs.json, as the run wrote them); empty for a pretraining checkpoint
    task_name: str | None = None
    task_state: dict[str, torch.Tensor] = field(default_factory=dict)
    task_files: dict[str, bytes] = field(default_factory=dict)


def config_hash(tree: dict[str, Any]) -> str:
    """sha256 of the resolved config (canonical JSON), first 16 hex digits."""
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def export_state_names(backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone names -> export names: DeepSpeed's MoE nesting flattened to ``mlp.gate`` / ``mlp.experts``."""
    out = {}
    for key, value in backbone.items():
        out[key.replace(DS_GATE, EXPORT_GATE).replace(DS_EXPERTS, EXPORT_EXPERTS)] = value
    return out


def read_source(path: str | Path) -> ExportSource:
    """A pretraining checkpoint / run folder, or a fine-tuning run folder (``best/model.pt``)."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such file or folder (give a pretraining run folder, a checkpoint "
                               f"folder, or a fine-tuning run folder)")
    finetune_weights = path / "best" / "model.pt" if path.is_dir() else path
    if finetune_weights.name == "model.pt" and finetune_weights.is_file():
        return _read_finetune(finetune_weights)
    return _read_pretraining(path)


def _read_pretraining(path: Path) -> ExportSource:
    folder = ckpt.resolve_checkpoint_dir(path)  # verified against its manifest; a torn one is refused
    meta = ckpt.load_client_state(folder).get("msgfm") or {}
    if "config" not in meta:
        raise UserError(f"{folder}: the checkpoint records no msgfm config (client state 'msgfm.config'); "
                        f"it was not written by msgfm pretraining")
    state = ckpt.load_model_state_dict(folder)  # dense weights and every expert, global expert ids
    cfg = config_from_dict(meta["config"])
    sensors = cfg.sensors_in_model
    backbone = backbone_state(state)
    decoders = {k: v for k, v in state.items() if k.startswith("decoders.")}
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else None
    return ExportSource(
        kind="pretraining", name=folder.name, model_cfg=meta["config"]["model"],
        backbone=export_state_names(backbone), decoders=decoders,
        sensor_bands={s: list(get_sensor(s).bands) for s in sensors}, stats=dict(meta.get("stats") or {}),
        group_sensors={g.name: list(g.sensors) for g in cfg.data.groups}, step=meta.get("step"),
        config_hash=config_hash(meta["config"]), trained_with_commit=str(meta.get("git_commit", "unknown")),
        run_dir=run_dir, mlflow_run_id=_mlflow_run_id(run_dir),
        tracking_uri=tracking_uri(cfg.tracking, run_dir) if run_dir is not None else None)


def _read_finetune(weights: Path) -> ExportSource:
    run_dir = weights.parent.parent
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise MissingFileError(f"{config_path}: a fine-tuning run folder records its config there; without it "
                               f"the architecture of {weights} is unknown")
    cfg = load_finetune_config(config_path)
    state = load_weights(weights, "fine-tuned weights")
    if not isinstance(state, dict):
        raise UserError(f"{weights}: not a state dict of a fine-tuned msgfm model")
    backbone = backbone_state(state)
    names = sorted({k.split(".")[1] for k in backbone if k.startswith("embeddings.")})
    sensor_bands = {name: [b for s in name.split("+") for b in get_sensor(s).bands] for name in names}
    stats: dict[str, dict[str, Any]] = {}
    notes = []
    try:
        from msgfm.finetune.data import task_stats

        stats = {"finetune": task_stats(cfg, Path(cfg.data.root)).to_dict()}
    except (UserError, OSError) as err:
        notes.append(f"normalization statistics not found at export ({str(err).splitlines()[0]})")
    task_files: dict[str, bytes] = {}
    if (run_dir / INPUTS_FILE).is_file():
        task_files = {"config.yaml": config_path.read_bytes(), INPUTS_FILE: (run_dir / INPUTS_FILE).read_bytes()}
    else:
        notes.append(f"no {INPUTS_FILE} in the run folder (fine-tuned before msgfm recorded its inputs): the "
                     f"export holds no task/ folder, so msgfm predict cannot run it")
    tree = cfg.to_dict()
    return ExportSource(
        kind="fine-tuning", name="best", model_cfg=tree["model"], backbone=export_state_names(backbone),
        decoders={}, sensor_bands=sensor_bands, stats=stats, group_sensors={"finetune": list(cfg.task.sensors)},
        step=None, config_hash=config_hash(tree), trained_with_commit="unknown", run_dir=run_dir,
        mlflow_run_id=_mlflow_run_id(run_dir), tracking_uri=tracking_uri(cfg.tracking, run_dir), notes=notes,
        task_name=cfg.task.name, task_state=state if task_files else {}, task_files=task_files)


def _mlflow_run_id(run_dir: Path | None) -> str | None:
    """The MLflow run a run folder was tracked in (msgfm's Tracker records it beside the run), if any."""
    if run_dir is None:
        return None
    for name in ("mlflow_run_id", ".mlflow_run_id"):
        marker = run_dir / name
        if marker.is_file():
            return marker.read_text().strip() or None
    return None


def storage_of(stats: dict[str, Any], sensor: str) -> dict[str, Any] | None:
    """How a sensor was stored in the shards the statistics came from (dtype, scale, offset, nodata), or None
    when no such shard is reachable from here."""
    folder = Path(stats.get("path", ".")).parent
    for entry in stats.get("files", []):
        shard = folder / entry["path"]
        if not shard.is_file():
            continue
        try:
            info = read_shard_info(shard, check_data=False).sensors.get(sensor)
        except (UserError, OSError):
            continue
        if info is not None:
            return {"dtype": str(info.dtype), "scale": info.scale, "offset": info.offset, "nodata": info.nodata}
    return None
