"""A relaunch into a run folder continues the run it finds, not a silently different one.

On resume the new resolved config is compared with the one the checkpoint was written with
(``config.json`` inside the checkpoint; older checkpoints: the config in the model-states
client state). Every difference is one :class:`Change`, of one of three kinds:

- ``architecture``: the model's parameters would not match the checkpoint's (widths, depths,
  windows, experts and their layout, the sensors with an embedding, a fine-tuning head).
  Always refused: no flag makes those weights fit.
- ``training``: the math of the steps to come differs (learning rates, batch sizes, the
  schedule, the loss, augmentation, seeds, ...). Refused unless the user passes
  ``--allow-config-change``; then the differences are printed, appended to
  ``<output>/config_changes.jsonl`` with the step and logged to MLflow as a tagged change.
  Some of them also change the data order (seed, batch sizes, shards): said so.
- ``run``: nothing the steps compute depends on it (``train.max_steps``, logging and
  checkpoint intervals, workers, kernels implementations, the data root, tracking):
  accepted, printed and recorded the same way.

Keys are dotted paths as in overrides; data groups (a list in YAML) are keyed by name
(``data.groups.rgb.lr``), as overrides address them.
"""
from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from msgfm.errors import UserError
from msgfm.train.checkpoint import CONFIG_FILE, load_client_state
from msgfm.train.tracking import Tracker

ALLOW_FLAG = "--allow-config-change"
CHANGES_FILE = "config_changes.jsonl"  # one row per resume that changed the config, in the run folder
ABSENT = "(absent)"

ChangeKind = Literal["architecture", "training", "run"]

# Keys whose change means the checkpoint's weights do not fit the model to be built.
# Patterns are dotted keys: ``*`` stands for one part (a group's name), a trailing ``.**`` for anything below.
ARCHITECTURE_KEYS = (
    "sensors.**", "model.img_size", "model.patch_size", "model.embed_dim", "model.depths", "model.num_heads",
    "model.window_size", "model.mlp_ratio", "model.qkv_bias", "model.sensors", "model.moe.enabled",
    "model.moe.num_experts", "model.moe.blocks.**", "model.moe.expert_parallel_size",
    "model.moe.use_residual", "model.moe.top_k",
    # fine-tuning: the task head and how the sensors enter the encoder
    "task.name", "task.kind", "task.sensors", "task.num_classes", "task.target_sensor", "transfer.method",
    "transfer.head_norm", "transfer.head_channels",
)
# Keys nothing a step computes depends on.
RUN_KEYS = (
    "name", "tracking.**", "kernels.**", "model.grad_checkpointing", "train.max_steps",
    "train.log_interval", "train.checkpoint_interval", "train.keep_last", "train.max_val_batches",
    "train.max_eval_batches", "train.num_figures", "train.max_nonfinite_steps", "data.root",
    "data.num_workers", "data.groups.*.num_workers", "data.prefetch_factor", "data.pin_memory",
    "data.eval_batch_size_per_gpu",
)
# Training keys that also change which samples the next steps draw.
DATA_ORDER_KEYS = (
    "train.seed", "data.groups", "data.groups.*", "data.groups.*.batch_size_per_gpu", "data.groups.*.shards",
    "data.groups.*.sensors", "data.total_batch_size_per_gpu", "data.val_fraction", "data.stats_file",
    "data.train", "data.train_fraction", "data.fraction_seed", "data.batch_size_per_gpu",
)


@dataclass(frozen=True)
class Change:
    """One config key whose value differs between the checkpoint and this launch."""

    key: str
    old: Any
    new: Any
    kind: ChangeKind
    data_order: bool = False

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    return value if value == ABSENT else json.dumps(value)


def _matches(key: str, patterns: Sequence[str]) -> bool:
    parts = key.split(".")
    for pattern in patterns:
        wanted = pattern.split(".")
        if wanted[-1] == "**":
            wanted = wanted[:-1]
            if len(parts) < len(wanted):
                continue
            parts_cut = parts[:len(wanted)]
        elif len(parts) != len(wanted):
            continue
        else:
            parts_cut = parts
        if all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts_cut, wanted)):
            return True
    return False


def classify(key: str) -> ChangeKind:
    """The kind of a change of ``key`` (see the module docstring)."""
    if _matches(key, ARCHITECTURE_KEYS):
        return "architecture"
    if _matches(key, RUN_KEYS):
        return "run"
    return "training"


def _keyed(value: Any) -> Any:
    """Lists of named sections (data groups) become mappings by name, so they compare by name."""
    if isinstance(value, Mapping):
        return {str(k): _keyed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_keyed(v) for v in value]
        names = [v.get("name") for v in items if isinstance(v, dict)]
        if items and len(names) == len(items) and all(isinstance(n, str) for n in names) \
                and len(set(names)) == len(names):
            return {n: v for n, v in zip(names, items)}
        return items
    return value


def _diff(old: Any, new: Any, key: str, out: list[tuple[str, Any, Any]]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for name in list(old) + [n for n in new if n not in old]:
            sub = f"{key}.{name}" if key else name
            if name not in new:
                out.append((sub, old[name], ABSENT))
            elif name not in old:
                out.append((sub, ABSENT, new[name]))
            else:
                _diff(old[name], new[name], sub, out)
    elif not config_values_equal(old, new):
        out.append((key, old, new))


def config_values_equal(old: Any, new: Any) -> bool:
    """Equal config values, across YAML / JSON round trips."""
    # YAML / JSON round trips: 1 and 1.0 are one value, tuples come back as lists
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool) \
            and not isinstance(new, bool):
        return float(old) == float(new)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(config_values_equal(a, b) for a, b in zip(old, new))
    return bool(old == new)


def _with_model_sensors(tree: dict[str, Any]) -> dict[str, Any]:
    """Pretraining configs leave ``model.sensors`` empty for "the data groups' sensors": compare what is built."""
    model, data = tree.get("model"), tree.get("data")
    if "task" in tree or not isinstance(model, dict) or model.get("sensors") or not isinstance(data, dict):
        return tree
    sensors: dict[str, None] = {}
    for group in data.get("groups") or []:
        if isinstance(group, dict):
            sensors.update(dict.fromkeys(group.get("sensors") or []))
    return {**tree, "model": {**model, "sensors": list(sensors)}}


def diff_configs(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Every key whose value differs between two resolved configs (as ``cfg.to_dict()`` gives them)."""
    found: list[tuple[str, Any, Any]] = []
    _diff(_keyed(_with_model_sensors(dict(old))), _keyed(_with_model_sensors(dict(new))), "", found)
    return [Change(key, a, b, classify(key), _matches(key, DATA_ORDER_KEYS)) for key, a, b in found]


def describe(changes: Sequence[Change], limit: int = 6) -> str:
    """The changes on one line, at most ``limit`` of them named."""
    text = "; ".join(str(c) for c in changes[:limit])
    return text + (f"; and {len(changes) - limit} more" if len(changes) > limit else "")


def check_resume(changes: Sequence[Change], checkpoint: Path, allow_change: bool) -> None:
    """Refuse what cannot or may not be resumed: one line naming the keys (a :class:`UserError`)."""
    architecture = [c for c in changes if c.kind == "architecture"]
    if architecture:
        raise UserError(f"the model differs from the checkpoint {checkpoint} it would resume: {describe(architecture)}"
                        f"; a changed architecture cannot continue this run: restore those values, or start a new "
                        f"--output-dir")
    training = [c for c in changes if c.kind == "training"]
    if training and not allow_change:
        raise UserError(f"the config differs from the checkpoint {checkpoint} it would resume: {describe(training)}"
                        f"; relaunch with {ALLOW_FLAG} to continue with these values (recorded in the run folder "
                        f"and MLflow), restore them, or start a new --output-dir")


def checkpoint_config(path: Path) -> dict[str, Any] | None:
    """The resolved config a checkpoint was written with, or None when it recorded none."""
    recorded = path / CONFIG_FILE
    if recorded.is_file():
        data = json.loads(recorded.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    config = load_client_state(path).get("msgfm", {}).get("config")
    return dict(config) if isinstance(config, Mapping) else None


def guard_resume(checkpoint: Path, new_config: Mapping[str, Any], allow_change: bool, rank: int) -> list[Change]:
    """Compare the config of ``checkpoint`` with this launch's; refuse or return the accepted changes.

    Rank 0 prints the accepted changes; recording them is :func:`record_changes` (rank 0, once the
    run folder's tracking is open)."""
    old = checkpoint_config(checkpoint)
    if old is None:
        if rank == 0:
            print(f"msgfm: checkpoint {checkpoint} records no config: the config is not compared", flush=True)
        return []
    changes = diff_configs(old, new_config)
    check_resume(changes, checkpoint, allow_change)
    if changes and rank == 0:
        for change in changes:
            note = {"training": f"accepted ({ALLOW_FLAG})", "run": "accepted (no effect on the math)"}[change.kind]
            order = ", changes the data order" if change.data_order and change.kind == "training" else ""
            print(f"msgfm: config changed since {checkpoint.name}: {change} [{note}{order}]", flush=True)
    return changes


def record_changes(output_dir: Path, step: int, checkpoint: Path, changes: Sequence[Change]) -> Path:
    """Append one row for this resume to ``<output>/config_changes.jsonl``; returns the file."""
    row = {"step": step, "time": time.time(), "checkpoint": checkpoint.name, "changes": [asdict(c) for c in changes]}
    path = output_dir / CHANGES_FILE
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return path


def note_changes(tracker: Tracker, step: int, checkpoint: Path, changes: Sequence[Change]) -> None:
    """Rank 0, after the tracker opened the run: record the accepted changes of this resume in the run folder
    (``config_changes.jsonl``) and in MLflow (a tag and params at ``step``, the new config.yaml)."""
    if not changes:
        return
    out = tracker.output_dir
    path = record_changes(out, step, checkpoint, changes)
    files = [path] + [out / "config.yaml"] * (out / "config.yaml").is_file()
    tracker.log_config_change(step, [asdict(c) for c in changes], files)
