"""``msgfm export``: a trained msGFM as ``model.safetensors`` + ``config.json`` + ``README.md``, and for a
fine-tuning run ``task/`` (the whole task module as ``task/model.safetensors`` with the run's
``config.yaml`` and ``model_inputs.json``), which ``msgfm predict --model`` builds the model from.

The weight names and the config are the export format of docs/export.md (read back by
msgfm/backbone, which needs no DeepSpeed). The same input gives the same bytes: tensors are
written in sorted order with fixed metadata, the JSON with a fixed key order, and nothing
records when or where the export ran.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import msgfm
from msgfm.backbone.model import CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, WEIGHTS_FILE
from msgfm.errors import UserError
from msgfm.export.card import model_card
from msgfm.export.source import ExportSource, storage_of
from msgfm.finetune.inputs import INPUTS_FILE
from msgfm.sensors import get_sensor
from msgfm.train.runtime import git_commit

CARD_FILE = "README.md"
# an export of a fine-tuning run also holds what msgfm predict builds the task module from (docs/export.md)
TASK_DIR = "task"
TASK_WEIGHTS = "model.safetensors"
TASK_CONFIG = "config.yaml"
TASK_FORMAT = f"{FORMAT_NAME}-task/{FORMAT_VERSION}"


def architecture(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The encoder's shape: what :class:`msgfm.backbone.MsGFMSwin` is built from."""
    moe = model_cfg["moe"]
    keys = ("img_size", "patch_size", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "qkv_bias")
    arch: dict[str, Any] = {"name": "msgfm_swin", **{k: model_cfg[k] for k in keys}}
    arch["moe"] = None if not moe["enabled"] else {
        "num_experts": moe["num_experts"], "top_k": moe["top_k"], "routing": "top-1, no token dropped",
        "blocks": {str(stage): list(blocks) for stage, blocks in sorted(moe["blocks"].items(), key=lambda i: int(i[0]))
                   if blocks}}
    return arch


def sensor_entry(source: ExportSource, sensor: str) -> dict[str, Any]:
    """Band names (storage order), wavelengths, GSD, units, storage scale/offset and normalization of one sensor."""
    parts = sensor.split("+")
    specs = [get_sensor(p) for p in parts]
    wavelengths = [w for spec in specs for w in (spec.wavelengths_nm or (None,) * spec.num_channels)]
    # in the run config's group order: the first entry is the default normalization (load_backbone, timm)
    groups = [g for g, sensors in source.group_sensors.items() if set(parts) <= set(sensors)]
    normalization: list[dict[str, Any]] = []
    storage: dict[str, Any] = {}
    units = sorted({source.stats[g].get("units", "physical") for g in groups if g in source.stats})
    for group in groups:
        stats = source.stats.get(group)
        if not stats:
            continue
        mean: list[float] = []
        std: list[float] = []
        for part in parts:
            entry = stats["sensors"][part]
            mean += [float(v) for v in entry["mean"]]
            std += [float(v) for v in entry["std"]]
        same = next((n for n in normalization if n["mean"] == mean and n["std"] == std), None)
        if same is not None:
            same["groups"].append(group)
        else:
            normalization.append({"groups": [group], "mean": mean, "std": std})
        for part in parts:
            found = storage_of(stats, part)
            if found is not None:
                storage.setdefault(part, {})[group] = found
    return {"bands": list(source.sensor_bands[sensor]), "wavelengths_nm": wavelengths,
            "gsd_m": specs[0].gsd_m if len(specs) == 1 else None,
            "description": " + ".join(spec.description for spec in specs),
            "units": units[0] if len(units) == 1 else units,
            "input": "physical values (stored value * scale + offset), then (x - mean) / std per band",
            "storage": storage or None, "normalization": normalization}


def build_export(source: ExportSource, sensors: Sequence[str] | None, dense_only: bool, decoders: bool
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the config.json of an export of ``source``."""
    known = list(source.sensor_bands)
    chosen = list(sensors) if sensors else known
    unknown = [s for s in chosen if s not in known]
    if unknown:
        raise UserError(f"--sensors {','.join(unknown)}: the model never saw sensor(s) {unknown}; it has "
                        f"embeddings for {known}")
    moe = source.model_cfg["moe"]
    if moe["enabled"]:
        if dense_only:
            raise UserError(f"--dense-only: the model has MoE layers ({moe['num_experts']} experts in stage(s) "
                            f"{sorted(moe['blocks'])}); drop --dense-only to export it with its experts")
        if moe["top_k"] != 1 or moe.get("use_residual"):
            raise UserError(f"model.moe: top_k={moe['top_k']}, use_residual={moe.get('use_residual')}: the "
                            f"DeepSpeed-free backbone implements top-1 routing without a residual MLP only")
    keep_prefixes = tuple(f"embeddings.{s}." for s in chosen) + ("encoder.", "mask_token")
    state = {k: v for k, v in source.backbone.items() if k.startswith(keep_prefixes)}
    if decoders:
        state.update({k: v for k, v in source.decoders.items()
                      if k.startswith(tuple(f"decoders.{s}." for s in chosen))})
    state = {k: state[k].detach().to("cpu", torch.float32).contiguous().clone() for k in sorted(state)}
    config = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "architecture": architecture(source.model_cfg),
        "sensors": {s: sensor_entry(source, s) for s in chosen},
        "weights": {"file": WEIGHTS_FILE, "dtype": "float32", "tensors": len(state), "decoders": decoders,
                    "parameters": int(sum(t.numel() for t in state.values()))},
        "task": None if not source.task_state else {
            "name": source.task_name, "folder": TASK_DIR, "weights": f"{TASK_DIR}/{TASK_WEIGHTS}",
            "files": sorted([TASK_WEIGHTS, *source.task_files]), "tensors": len(source.task_state),
            "use": "msgfm predict --model <this folder>"},
        "provenance": {"kind": source.kind, "checkpoint": source.name, "step": source.step,
                       "config_hash": source.config_hash, "trained_with_commit": source.trained_with_commit,
                       "exported_by": {"msgfm_version": msgfm.__version__, "git_commit": git_commit()},
                       "notes": source.notes},
    }
    return state, config


def task_weights(source: ExportSource) -> dict[str, torch.Tensor]:
    """The fine-tuned task module's whole state (backbone in msgfm's own names, head, everything
    ``load_state_dict`` needs), in sorted order, with its dtypes; empty for a pretraining source."""
    bad = [k for k, v in source.task_state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"the fine-tuned weights hold non-tensor entries {bad[:3]}: not a state dict of a "
                        f"fine-tuned msgfm model")
    return {k: source.task_state[k].detach().to("cpu").contiguous().clone() for k in sorted(source.task_state)}


def _write_task(out: Path, weights: dict[str, torch.Tensor], files: dict[str, bytes]) -> dict[str, Path]:
    """``out/task/``: the task module's weights (safetensors) and the run's files as they were; an old task/
    folder of a previous export into ``out`` goes when the new export has none."""
    folder = out / TASK_DIR
    written: dict[str, Path] = {}
    if not weights:
        for name in (TASK_WEIGHTS, TASK_CONFIG, INPUTS_FILE):
            (folder / name).unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        return written
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{TASK_WEIGHTS}.tmp"
    save_file(weights, str(tmp), metadata={"format": TASK_FORMAT})
    os.replace(tmp, folder / TASK_WEIGHTS)
    written[f"{TASK_DIR}/{TASK_WEIGHTS}"] = folder / TASK_WEIGHTS
    for name, data in sorted(files.items()):
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)
        written[f"{TASK_DIR}/{name}"] = folder / name
    return written


def write_export(state: dict[str, torch.Tensor], config: dict[str, Any], out: Path,
                 task: tuple[dict[str, torch.Tensor], dict[str, bytes]] | None = None) -> dict[str, Path]:
    """Write the three files into ``out`` (each atomically), and ``task/`` when ``task`` holds a fine-tuned
    task module's weights and files; returns them by name."""
    out.mkdir(parents=True, exist_ok=True)
    files = {WEIGHTS_FILE: out / WEIGHTS_FILE, CONFIG_FILE: out / CONFIG_FILE, CARD_FILE: out / CARD_FILE}
    # the task folder first: config.json, written last, only names a task/ that is complete
    files.update(_write_task(out, *(task or ({}, {}))))
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    # one metadata key: safetensors writes metadata from a hash map, whose order varies between runs
    save_file(state, str(tmp), metadata={"format": f"{FORMAT_NAME}/{FORMAT_VERSION}"})
    os.replace(tmp, files[WEIGHTS_FILE])
    for name, text in ((CONFIG_FILE, json.dumps(config, indent=1) + "\n"), (CARD_FILE, model_card(config))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, files[name])
    return files


def export(source_path: str | Path, out: str | Path, sensors: Sequence[str] | None = None,
           dense_only: bool = False, decoders: bool = False) -> tuple[dict[str, Any], ExportSource]:
    """Read ``source_path``, write the export into ``out``; returns (config, source)."""
    from msgfm.export.source import read_source

    source = read_source(source_path)
    state, config = build_export(source, sensors, dense_only, decoders)
    write_export(state, config, Path(out), (task_weights(source), source.task_files))
    return config, source
