"""Shared pieces of the training tests (no tests here): a tiny run config, its ds_config, its data."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from msgfm.config import RunConfig, load_config
from msgfm.train.runtime import own_job_environment

REPO = Path(__file__).resolve().parents[1]

# demo_cpu shrunk to 32 px and 4/2/2 samples per group batch: a step takes well under a second
TINY = {
    "_base_": "demo_cpu",
    "name": "tiny",
    "model": {"img_size": 32},
    "data": {
        "groups": [
            {"name": "rgb", "sensors": ["rgb"], "shards": ["rgb/*.h5"], "batch_size_per_gpu": 4, "lr": 3.0e-3,
             "num_workers": 0},
            {"name": "sen12ms", "sensors": ["sar", "s2"], "shards": ["sen12ms/*.h5"], "batch_size_per_gpu": 2,
             "lr": 1.5e-3, "num_workers": 0},
            {"name": "mdas", "sensors": ["dsm", "rgb"], "shards": ["mdas/*.h5"], "batch_size_per_gpu": 2,
             "lr": 1.0e-3, "num_workers": 0},
        ],
        "val_fraction": 0.2,
        "pin_memory": False,
    },
    "schedule": {"epochs": 10, "warmup_epochs": 1, "warmup_start_lr": 1.0e-4, "kind": "cosine", "min_lr": 1.0e-4,
                 "milestones": []},
    "train": {"max_steps": 12, "log_interval": 1, "checkpoint_interval": 4, "keep_last": 2},
    "tracking": {"log_interval": 1, "figure_interval": 6},
}


def write_tiny_config(folder: Path, data_root: Path, **sections) -> Path:
    """The tiny config as a YAML file (sections replace/extend TINY's top-level sections)."""
    tree = json.loads(json.dumps(TINY))
    tree["data"]["root"] = str(data_root)
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def write_tiny_ds_config(folder: Path, **changes) -> Path:
    """ds_configs/cpu.json with the tiny config's micro batch (its largest group batch, 4)."""
    config = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 4
    config.update(changes)
    path = folder / "ds_tiny.json"
    path.write_text(json.dumps(config))
    return path


def write_tiny_data(folder: Path, samples_per_group: int = 40) -> Path:
    from msgfm.config import load_config
    from msgfm.data.synthetic import write_synthetic_data

    cfg_path = write_tiny_config(folder, folder / "data")
    return write_synthetic_data(load_config(cfg_path), folder / "data", samples_per_group)


def write_tiny_run(folder: Path, samples_per_group: int) -> Path:
    """Tiny synthetic data, the tiny config and its ds_config, all in ``folder``."""
    write_tiny_data(folder, samples_per_group=samples_per_group)
    write_tiny_config(folder, folder / "data")
    write_tiny_ds_config(folder)
    return folder


def tiny_config(groups: Sequence[Mapping], root: Path, *, img_size: int = 32, overrides: Sequence[str] = ()
                ) -> RunConfig:
    """demo_cpu shrunk to ``img_size`` with the given data groups (dicts as in the YAML)."""
    groups_yaml = yaml.safe_dump([dict(g) for g in groups], default_flow_style=True).strip()
    return load_config("demo_cpu", overrides=[f"model.img_size={img_size}", f"data.root={root}",
                                              "masking.mask_patch_size=16", f"data.groups={groups_yaml}",
                                              "data.pin_memory=false", *overrides])


def child_env(drop_prefixes: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """The environment for a plain ``python launchers/...`` child: without the process-group variables the
    single_rank_dist fixture set in this process (the child starts its own group) and without names starting
    with ``drop_prefixes``, plus ``extra``."""
    env = own_job_environment(**extra)
    return {k: v for k, v in env.items() if not (drop_prefixes and k.startswith(drop_prefixes))}
