"""Fine-tuning takes only what it can use: a fine-tuning run as --pretrained, a pretraining run as
--eval-only --checkpoint, and architecture overrides a checkpoint replaces are refused with one line;
overrides stand anywhere on the command line of both launchers."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from test_finetune import _run, launcher, vaihingen_shards, write_pretraining_checkpoint  # noqa: F401 (a fixture)
from test_train_support import REPO

from msgfm.config import load_config, load_finetune_config, save_config
from msgfm.errors import UserError
from msgfm.finetune.build import FINETUNE_MODEL_KEYS, refuse_dropped_model_overrides, resolve_encoder


def _pretrain_launcher():
    spec = importlib.util.spec_from_file_location("pretrain_launcher", REPO / "launchers" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overrides_stand_anywhere_on_both_command_lines():
    args = launcher().parse_args(["data.train_fraction=0.1", "--deepspeed_config", "ds_configs/cpu.json",
                                  "transfer.method=separate", "--task", "ben", "-v", "train.lr=0.5"])
    assert args.overrides == ["data.train_fraction=0.1", "transfer.method=separate", "train.lr=0.5"]
    assert args.task == "ben" and args.verbose and args.deepspeed_config == "ds_configs/cpu.json"
    args = _pretrain_launcher().parse_args(["train.max_steps=3", "--config", "demo_cpu", "model.embed_dim=64",
                                            "--deepspeed_config", "ds_configs/cpu.json", "--allow-config-change"])
    assert args.overrides == ["train.max_steps=3", "model.embed_dim=64"]
    assert args.config == "demo_cpu" and args.allow_config_change


def test_what_is_neither_an_option_nor_an_override_is_still_an_error(capsys):
    with pytest.raises(SystemExit):
        _pretrain_launcher().parse_args(["--deepspeed_config", "ds_configs/cpu.json", "--bogus", "max_steps"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus max_steps" in err and "dotted.key=value" in err


def test_an_override_the_checkpoint_replaces_is_refused_with_its_key():
    built = load_config("demo_cpu").model  # embed_dim 32, 4 experts
    refuse_dropped_model_overrides(["model.embed_dim=32", "model.drop_path_rate=0.2", "train.lr=1",
                                    "model.window_size=8", "model.moe.num_experts=4"], built, "ckpt")  # all fine
    cases = [("model.embed_dim=64", "model.embed_dim"), ("model.moe.num_experts=8", "model.moe.num_experts"),
             ("model={depths: [2, 2, 6, 2]}", "model.depths"), ("model.moe.blocks={2: [0]}", "model.moe.blocks.2")]
    for override, key in cases:
        with pytest.raises(UserError, match=rf"override '{override.split('=')[0]}.*the encoder's architecture comes "
                                            rf"from ckpt \({key} is .* there\), so {key} cannot change"):
            refuse_dropped_model_overrides([override], built, "ckpt")
    assert set(FINETUNE_MODEL_KEYS) >= {"img_size", "window_size", "drop_path_rate"}


def test_an_architecture_override_with_pretrained_weights_stops_the_run(vaihingen_shards, tmp_path):  # noqa: F811
    pretrained = write_pretraining_checkpoint(tmp_path / "pretrain")  # demo_cpu: embed_dim 32
    with pytest.raises(UserError, match=r"override 'model\.embed_dim=64': the encoder's architecture comes from the "
                                        r"pretrained checkpoint .*\(model\.embed_dim is 32 there\)"):
        _run("ft_vaihingen_tiny", vaihingen_shards, tmp_path / "o", "model.embed_dim=64", pretrained=pretrained,
             task_name="vaihingen")
    assert not (tmp_path / "o" / "checkpoints").exists() or not any((tmp_path / "o" / "checkpoints").iterdir())


def _fine_tuning_checkpoint(folder: Path) -> Path:
    """A fine-tuning run folder as finetune() leaves it: config.yaml with a task, a checkpoint whose client
    state says kind finetune."""
    run = write_pretraining_checkpoint(folder)
    ckpt = run / "checkpoints" / "step00000001"
    import torch

    state = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)
    state["msgfm"] = {"kind": "finetune", "config": load_finetune_config("ft_vaihingen_tiny").to_dict()}
    torch.save(state, ckpt / "mp_rank_00_model_states.pt")
    return run


def test_pretrained_pointing_at_a_fine_tuning_run_says_what_to_pass(tmp_path):
    run = _fine_tuning_checkpoint(tmp_path / "ft_run")
    cfg = load_finetune_config("ft_vaihingen_tiny")
    with pytest.raises(UserError, match=rf"--pretrained {run} is a fine-tuning run \(task 'vaihingen'\), not a "
                                        rf"pretraining checkpoint: .*--eval-only --checkpoint {run}"):
        resolve_encoder(cfg, run)
    assert resolve_encoder(cfg, write_pretraining_checkpoint(tmp_path / "pre")).embed_dim == 32


def test_eval_only_at_a_pretraining_run_says_what_to_pass(vaihingen_shards, tmp_path, capsys):  # noqa: F811
    run = write_pretraining_checkpoint(tmp_path / "pre")
    save_config(load_config("demo_cpu"), run / "config.yaml")  # a run folder, as pretraining leaves it
    for checkpoint in (run, run / "checkpoints" / "step00000001"):  # the run folder, or one checkpoint in it
        rc = launcher().main(["--deepspeed_config", "ds_configs/cpu.json", "--task", "vaihingen", "--config",
                              "ft_vaihingen_tiny", "--data-root", str(vaihingen_shards), "--output-dir",
                              str(tmp_path / "eval"), "--eval-only", "--checkpoint", str(checkpoint),
                              "tracking.enabled=false"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert err == (f"finetune: error: --checkpoint {checkpoint} is a pretraining run, not a fine-tuned model: "
                       f"--eval-only scores a fine-tuning run folder or its best/model.pt; to fine-tune from "
                       f"{checkpoint} pass it as --pretrained (without --eval-only)")
    assert not (tmp_path / "eval" / "eval" / "metrics.json").exists()
    assert json.loads((run / "checkpoints" / "step00000001" / "COMPLETE").read_text())["step"] == 1  # untouched


def test_train_subset_written_by_two_nodes_with_the_same_pid_at_once(tmp_path, monkeypatch):
    """Ranks of two nodes on a shared filesystem can have the same pid: while one writes the subset file, the
    other writes it too; neither may move the other's temporary file away."""
    from msgfm.finetune import options

    ids = [f"s{i}" for i in range(20)]
    path = tmp_path / "train_ids_0.5_seed0.txt"
    monkeypatch.setattr(os, "getpid", lambda: 4242)  # the same pid on both "nodes"
    real_replace, other = os.replace, []

    def replace_after_the_other_node(src, dst):  # Path.replace goes through os.replace too
        if not other:  # the other node's rank writes and publishes in between
            other.append(None)
            other[0] = options.select_train_fraction(ids, 0.5, 0, path)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_the_other_node)
    chosen = options.select_train_fraction(ids, 0.5, 0, path)
    assert other == [chosen] and path.read_text().splitlines()[1:] == chosen
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
