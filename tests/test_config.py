"""Config loading: shipped configs, overrides, and the errors users see."""
from __future__ import annotations

import pytest

from msgfm.config import RunConfig, list_configs, load_config, save_config
from msgfm.sensors import SensorSpec, get_sensor, list_sensors, register_sensors_from_yaml

PRETRAIN_CONFIGS = [n for n in list_configs() if not n.startswith("ft_")]  # ft_*: fine-tuning, own schema


@pytest.mark.parametrize("name", PRETRAIN_CONFIGS)
def test_every_shipped_config_loads_and_round_trips(name, tmp_path):
    cfg = load_config(name)
    assert isinstance(cfg, RunConfig)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_paper_config_numbers():
    cfg = load_config("msgfm_swinb_192")
    m = cfg.model
    assert (m.img_size, m.patch_size, m.embed_dim, m.window_size) == (192, 4, 128, 6)
    assert m.depths == [2, 2, 18, 2] and m.num_heads == [4, 8, 16, 32]
    assert m.moe.blocks == {2: [1, 3, 5, 7, 9, 11, 13, 15, 17]}
    assert (m.moe.num_experts, m.moe.top_k, m.moe.capacity_factor, m.moe.aux_loss_weight) == (8, 1, 1.25, 0.01)
    assert (cfg.masking.mask_patch_size, cfg.masking.mask_ratio) == (32, 0.6)
    groups = {g.name: (g.sensors, g.batch_size_per_gpu, g.lr) for g in cfg.data.groups}
    assert groups == {"rgb": (["rgb"], 128, 1e-4), "sen12ms": (["sar", "s2"], 32, 0.25e-4),
                      "mdas": (["dsm", "rgb"], 12, 1e-5)}
    assert cfg.schedule.milestones == [700] and cfg.schedule.epochs == 800


def test_ablations_change_only_what_they_ablate():
    base = load_config("msgfm_swinb_192_ablation")
    assert load_config("msgfm_swinb_192_dense_cross50").model.moe.enabled is False
    assert load_config("msgfm_swinb_192_moe_cross0").pretrain.cross_rate == 0.0
    assert load_config("msgfm_swinb_192_moe_cross100").pretrain.cross_rate == 1.0
    assert [g.sensors for g in load_config("msgfm_swinb_192_only_s2").data.groups] == [["s2"]]
    assert load_config("msgfm_swinb_192_moe_cross0").model == base.model
    assert base.schedule.epochs == 100


def test_dotted_overrides_reach_nested_keys_and_named_groups():
    cfg = load_config("msgfm_swinb_192", ["model.moe.num_experts=16", "data.groups.mdas.lr=2e-5",
                                          "kernels.attention=eager"])
    assert cfg.model.moe.num_experts == 16
    assert cfg.data.group("mdas").lr == 2e-5
    assert cfg.kernels.attention == "eager"


@pytest.mark.parametrize("override, fragment", [
    ("model.moe.num_expert=4", "unknown config key 'model.moe.num_expert'"),
    ("model.moe.num_expert=4", "num_experts"),  # the valid keys are listed
    ("masking.mask_ratio=1.0", "masking.mask_ratio"),
    ("masking.mask_ratio=0", "(0, 1)"),
    ("model.window_size=7", "does not divide stage 0"),
    ("model.embed_dim=130", "is not divisible by 4 heads"),
    ("model.moe.num_experts=6", "expert_parallel_size"),
    ("model.img_size=200", "total stride 32"),
    ("model.depths=[2,2,x,2]", "model.depths[2]': expected an integer"),
    ("model.moe.capacity_factor=true", "expected a number"),
    ("kernels.attention=flash", "must be one of"),
    ("data.groups.rgb.sensors=[lidar]", "unknown sensor 'lidar'"),
    ("data.groups.rgb.batch_size_per_gpu=many", "integer or 'auto'"),
    ("model.moe.blocks={2: [18]}", "out of range"),
    ("pretrain.cross_rate=1.5", "pretrain.cross_rate"),
    ("schedule.milestones=[900]", "outside"),
    ("data.groups.nope.lr=1", "no entry named 'nope'"),
    ("masking.mask_patch_size=30", "not a multiple of the model patch"),
])
def test_bad_values_fail_at_load_time_naming_the_key(override, fragment):
    with pytest.raises(ValueError, match=None) as info:
        load_config("msgfm_swinb_192", [override])
    assert fragment in str(info.value)


def test_finetuning_config_points_to_its_loader():
    with pytest.raises(ValueError, match="fine-tuning config"):
        load_config("ft_ben_tiny")


def test_unknown_config_name_lists_shipped_configs():
    with pytest.raises(FileNotFoundError, match="msgfm_swinb_192"):
        load_config("msgfm_swinb_193")


def test_sensor_registry_builtins():
    assert get_sensor("rgb").num_channels == 3
    s2 = get_sensor("s2")
    assert s2.bands == ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
    assert get_sensor("s2_l1c").num_channels == 13 and "B10" in get_sensor("s2_l1c").bands
    assert get_sensor("sar").bands == ("VV", "VH") and get_sensor("dsm").num_channels == 1
    assert len(s2.wavelengths_nm) == 12


def test_new_sensor_from_yaml_without_code(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "_base_: demo_cpu\n"
        "sensors:\n  hls:\n    bands: [B02, B03, B04, B8A, B11, B12]\n    gsd_m: 30\n    rgb_bands: [2, 1, 0]\n"
        "model:\n  sensors: [rgb, s2, sar, dsm, hls]\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert "hls" in cfg.sensors_in_model and get_sensor("hls").num_channels == 6
    (tmp_path / "more.yaml").write_text("lidar_i:\n  bands: [intensity]\n")
    register_sensors_from_yaml(tmp_path / "more.yaml")
    assert "lidar_i" in list_sensors()


def test_bad_sensor_specs_are_rejected():
    with pytest.raises(ValueError, match="wavelengths"):
        SensorSpec.from_dict("x", {"bands": ["a", "b"], "wavelengths_nm": [1.0]})
    with pytest.raises(ValueError, match="unknown keys"):
        SensorSpec.from_dict("x", {"bands": ["a"], "gsd": 3})
