"""The ablation configs of Table 6 and Figure 4 / Table 9: each builds, its parameter counts are those of
what it ablates, and its tiny sibling changes demo_cpu in exactly the same way and trains a step."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_train_support import write_tiny_ds_config

from msgfm.config import list_configs, load_config
from msgfm.data.plan import plan_data, stats_path_for
from msgfm.data.stats import write_stats
from msgfm.data.synthetic import write_synthetic_data
from msgfm.tasks.params import count_parameters
from msgfm.train.ds_config import load_ds_config
from msgfm.train.pretrain import build_trainer

PAPER = ["rgb"], ["sar", "s2"], ["dsm", "rgb"]
# config -> (MoE, cross_rate, the sensors of each group): the paper rows as the README's table maps them
ABLATIONS: dict[str, tuple[bool, float, tuple[list[str], ...]]] = {
    "msgfm_swinb_192_dense_cross0": (False, 0.0, PAPER),   # Table 6: no MoE, no cross-sensor
    "msgfm_swinb_192_moe_cross0": (True, 0.0, PAPER),      # Table 6: MoE only
    "msgfm_swinb_192_dense_cross50": (False, 0.5, PAPER),  # Table 6: cross-sensor only (50%)
    "msgfm_swinb_192_moe_cross100": (True, 1.0, PAPER),    # Table 6: MoE + cross 100%
    "msgfm_swinb_192_moe_cross50": (True, 0.5, PAPER),     # Table 6: MoE + cross 50%
    "msgfm_swinb_192_only_sar": (True, 0.5, (["sar"],)),   # Figure 4 / Table 9
    "msgfm_swinb_192_only_s2": (True, 0.5, (["s2"],)),
    "msgfm_swinb_192_only_rgb": (True, 0.5, (["rgb"],)),
    "msgfm_swinb_192_no_rgb": (True, 0.5, (["sar", "s2"], ["dsm"])),
    "msgfm_swinb_192_all_sensors": (True, 0.5, PAPER),
}
SWIN_B_DENSE = 86_718_648  # the dense Swin-B/192 encoder (README, test_model_moe: equals timm's)


def ablated(cfg) -> tuple[bool, float, tuple[list[str], ...], list[str]]:
    return (cfg.model.moe.enabled, cfg.pretrain.cross_rate, tuple(g.sensors for g in cfg.data.groups),
            sorted(cfg.sensors_in_model))


def test_every_ablation_ships_with_a_tiny_sibling_and_every_tiny_sibling_with_its_ablation():
    shipped = set(list_configs())
    assert {*ABLATIONS, *(f"{n}_tiny" for n in ABLATIONS), "msgfm_swinb_192_ablation"} <= shipped
    tiny = {n.removesuffix("_tiny") for n in shipped if n.startswith("msgfm_swinb_192_") and n.endswith("_tiny")}
    assert tiny == set(ABLATIONS)
    assert all(load_config(n).name == n for n in ABLATIONS)  # runs are named after their config


@pytest.fixture(scope="module")
def reference_per_sensor() -> dict[str, int]:
    return count_parameters(load_config("msgfm_swinb_192_ablation"))["per_sensor"]


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_changes_only_what_it_ablates_and_builds_with_sane_parameter_counts(name, reference_per_sensor):
    cfg, base = load_config(name), load_config("msgfm_swinb_192_ablation")
    moe, cross_rate, groups = ABLATIONS[name]
    assert ablated(cfg)[:3] == (moe, cross_rate, groups)
    assert cfg.schedule == base.schedule and cfg.schedule.epochs == 100 and cfg.schedule.kind == "constant"
    assert cfg.masking == base.masking and cfg.optimizer == base.optimizer
    shape = ("img_size", "embed_dim", "depths", "num_heads", "window_size")
    assert [getattr(cfg.model, k) for k in shape] == [getattr(base.model, k) for k in shape]
    if groups == PAPER:  # the same data groups, batches and rates as the reference
        assert cfg.data == base.data

    counts = count_parameters(cfg)  # builds the whole pretraining model (on the meta device)
    assert counts["encoder_dense"] == SWIN_B_DENSE
    if moe:  # 9 MoE layers x 8 experts of Swin-B's 512-wide stage-3 MLP
        assert counts["encoder_experts"] == 9 * 8 * (512 * 2048 * 2 + 2048 + 512)
        assert 218e6 < counts["encoder_total"] < 220e6
    else:
        assert counts["encoder_experts"] == 0 and counts["encoder_total"] == SWIN_B_DENSE
    sensors = sorted({s for g in groups for s in g})
    assert sorted(counts["per_sensor"]) == sensors  # an embedding and a decoder for exactly the sensors used
    assert all(counts["per_sensor"][s] == reference_per_sensor[s] for s in sensors)


@pytest.mark.parametrize("name", ABLATIONS)
def test_tiny_sibling_ablates_demo_cpu_the_same_way(name):
    full, tiny, demo = load_config(name), load_config(f"{name}_tiny"), load_config("demo_cpu")
    assert ablated(tiny) == ablated(full)
    keep_moe = [k for k in vars(demo.model.moe) if k != "enabled"]
    assert [getattr(tiny.model.moe, k) for k in keep_moe] == [getattr(demo.model.moe, k) for k in keep_moe]
    assert (tiny.model.img_size, tiny.model.embed_dim, tiny.model.depths) == (64, 32, [2, 2, 2, 2])
    assert tiny.data.root == demo.data.root and tiny.schedule == demo.schedule


@pytest.fixture(scope="module")
def ds_config(tmp_path_factory) -> dict:
    return load_ds_config(write_tiny_ds_config(tmp_path_factory.mktemp("ds")))


@pytest.mark.parametrize("name", ABLATIONS)
def test_tiny_sibling_trains_one_step(name, single_rank_dist, ds_config, tmp_path: Path):
    small = [f"data.groups.{g.name}.batch_size_per_gpu=2" for g in load_config(f"{name}_tiny").data.groups]
    cfg = load_config(f"{name}_tiny", [f"data.root={tmp_path / 'data'}", "model.img_size=32",
                                       "masking.mask_patch_size=16", "model.moe.expert_parallel_size=1",
                                       "data.pin_memory=false", "train.max_steps=1", "train.log_interval=1",
                                       "train.max_nonfinite_steps=1", *small])
    write_synthetic_data(cfg, tmp_path / "data", samples_per_group=6)  # a shard for each group's first glob
    for group in cfg.data.groups:  # and a copy for its other globs (only_rgb also reads the MDAS RGB half)
        first = next((tmp_path / "data").glob(group.shards[0]))
        for pattern in group.shards[1:]:
            (tmp_path / "data" / pattern).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(first, tmp_path / "data" / pattern.replace("*", "copy"))
        if len(group.shards) > 1:  # statistics in the shards' common folder, as `msgfm stats` writes them
            shards = [p for pattern in group.shards for p in (tmp_path / "data").glob(pattern)]
            write_stats(shards, stats_path_for(shards, cfg.data.stats_file), progress=False)
    trainer = build_trainer(cfg, ds_config, plan_data(cfg, tmp_path / "data"), tmp_path / "run", tracking=False)
    model = trainer.engine.module
    assert sorted(model.backbone.sensors) == sorted(cfg.sensors_in_model)
    assert bool(model.backbone.moe_layers()) == cfg.model.moe.enabled
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.fit()  # a non-finite loss in the step would stop it (max_nonfinite_steps=1, checked at step 1)
    assert trainer.step == 1 and int(trainer.consecutive_nonfinite) == 0
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("backbone.encoder.") for n in moved)
    for sensor in cfg.sensors_in_model:  # every sensor's embedding learned from its group's batch
        assert any(n.startswith(f"backbone.embeddings.{sensor}.") for n in moved), sensor
    assert all(torch.isfinite(p).all() for p in model.parameters())
