"""Transfer from a pretraining checkpoint to a fine-tuning task: methods 1 and 2, bias interpolation, options."""
from __future__ import annotations

import math

import pytest
import torch

from msgfm.config import load_config
from msgfm.config.finetune import load_finetune_config
from msgfm.finetune.build import build_finetune_model, encoder_config, load_pretrained, new_model
from msgfm.finetune.options import param_groups, select_train_fraction, swin_layer_id
from msgfm.finetune.transfer import TransferError, interpolate_bias_table
from msgfm.tasks import build_pretrain_task


@pytest.fixture(scope="module")
def pretrained():
    """The backbone of a tiny MoE msGFM (demo_cpu) with its 4 sensor embeddings, in eval mode."""
    torch.manual_seed(0)
    # evaluation drops no token in fine-tuning (eval capacity = number of experts): the same here
    run_cfg = load_config("demo_cpu", ["model.moe.expert_parallel_size=1", "model.moe.eval_capacity_factor=4"])
    return run_cfg, build_pretrain_task(run_cfg).backbone.eval()


def _seeded(fn, *args):
    """Any token dropping by DeepSpeed's gate is random (RTS), in eval too: same seed, same drops."""
    torch.manual_seed(123)
    with torch.no_grad():
        return fn(*args)


def _ft_cfg(*overrides: str):
    return load_finetune_config("ft_ben_tiny", list(overrides))


def _finetune(run_cfg, pre, *overrides):
    cfg = _ft_cfg(*overrides)
    model = new_model(cfg, encoder_config(cfg, run_cfg.to_dict()["model"])).eval()
    return model, load_pretrained(model, pre.state_dict())


def test_stack_single_sensor_reproduces_pretrained_features(pretrained):
    run_cfg, pre = pretrained
    model, report = _finetune(run_cfg, pre, "task.sensors=[s2]")
    x = torch.randn(2, 12, 64, 64)
    expected = _seeded(pre.forward_features, x, "s2").permute(0, 3, 1, 2)
    got = _seeded(model.features, {"s2": x})[-1]
    torch.testing.assert_close(got, expected)
    assert report.embeddings_from == {"s2": "pretrained"}
    assert any(k.startswith("head.") for k in report.missing)  # the new head is reported by name
    assert "mask_token" in report.unused
    assert any(k.startswith("embeddings.rgb.") for k in report.unused)  # sensors the task does not use


def test_stack_two_sensors_is_the_mean_of_their_embeddings(pretrained):
    run_cfg, pre = pretrained
    model, _ = _finetune(run_cfg, pre, "task.sensors=[sar, s2]")
    sar, s2 = torch.randn(2, 2, 64, 64), torch.randn(2, 12, 64, 64)
    with torch.no_grad():
        stacked = model.backbone.embeddings["sar+s2"].proj(torch.cat([sar, s2], 1))
        mean = (pre.embeddings["sar"].proj(sar) + pre.embeddings["s2"].proj(s2)) / 2
    torch.testing.assert_close(stacked, mean)
    torch.testing.assert_close(model.backbone.embeddings["sar+s2"].norm.weight,
                               (pre.embeddings["sar"].norm.weight + pre.embeddings["s2"].norm.weight) / 2)


def test_separate_concatenates_per_sensor_features(pretrained):
    run_cfg, pre = pretrained
    model, report = _finetune(run_cfg, pre, "task.sensors=[sar, s2]", "transfer.method=separate")
    sar, s2 = torch.randn(1, 2, 64, 64), torch.randn(1, 12, 64, 64)
    # method 1 runs the encoder once per sensor: compare each sensor's half under the same seed
    torch.manual_seed(5)
    with torch.no_grad():
        got = model.features({"sar": sar, "s2": s2})[-1]
    torch.manual_seed(5)
    with torch.no_grad():
        expected = torch.cat([pre.forward_features(sar, "sar"), pre.forward_features(s2, "s2")], -1)
    torch.testing.assert_close(got, expected.permute(0, 3, 1, 2))
    assert model.head.fc.in_features == 2 * pre.encoder.num_features
    assert report.embeddings_from == {"sar": "pretrained", "s2": "pretrained"}


def test_sensor_without_pretrained_embedding_warns_and_stays_random(pretrained):
    run_cfg, pre = pretrained
    state = {k: v for k, v in pre.state_dict().items() if not k.startswith("embeddings.sar.")}
    cfg = _ft_cfg("task.sensors=[sar, s2]")
    model = new_model(cfg, encoder_config(cfg, run_cfg.to_dict()["model"]))
    before = model.backbone.embeddings["sar+s2"].proj.weight[:, :2].clone()
    with pytest.warns(UserWarning, match=r"no patch embedding for sensor\(s\) \['sar'\]"):
        report = load_pretrained(model, state)
    assert report.embeddings_from == {"sar": "random", "s2": "pretrained"}
    torch.testing.assert_close(model.backbone.embeddings["sar+s2"].proj.weight[:, :2], before)
    stacked = model.backbone.embeddings["sar+s2"].proj.weight
    torch.testing.assert_close(stacked[:, 2:], pre.embeddings["s2"].proj.weight / 2)


def test_other_window_interpolates_bias_tables(pretrained):
    run_cfg, pre = pretrained
    model, report = _finetune(run_cfg, pre, "task.sensors=[s2]", "model.window_size=2")
    assert report.interpolated and all(k.endswith("relative_position_bias_table") for k in report.interpolated)
    table = model.backbone.encoder.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (9, 1)
    # Bicubic resampling (align_corners) keeps a linear function of the offsets linear.
    dy, dx = torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="ij")
    linear = (0.3 * dy + 0.1 * dx + 1.0).reshape(49, 1).repeat(1, 2)
    resized = interpolate_bias_table(linear, 2)
    ny, nx = torch.meshgrid(torch.linspace(0, 6, 3), torch.linspace(0, 6, 3), indexing="ij")
    torch.testing.assert_close(resized[:, 0], (0.3 * ny + 0.1 * nx + 1.0).reshape(9))
    assert interpolate_bias_table(linear, 4) is linear
    with torch.no_grad():  # and the model runs at the new window
        assert model.output({"s2": torch.randn(1, 12, 64, 64)}).shape == (1, 19)


def test_other_image_size(pretrained):
    run_cfg, pre = pretrained
    model, report = _finetune(run_cfg, pre, "task.sensors=[s2]", "model.img_size=128")
    # stage 3 of the 64 px checkpoint attended over its whole 2x2 grid (window 2); at 128 px the
    # grid is 4x4 and the window 4: only that stage's tables are resampled
    assert report.interpolated and all(k.startswith("encoder.layers.3.") for k in report.interpolated)
    with torch.no_grad():
        assert model.output({"s2": torch.randn(1, 12, 128, 128)}).shape == (1, 19)


def test_other_architecture_is_a_clear_error(pretrained):
    run_cfg, pre = pretrained
    cfg = _ft_cfg("task.sensors=[s2]", "model.depths=[2, 2, 4, 2]")
    model = new_model(cfg, encoder_config(cfg, None))
    with pytest.raises(TransferError, match="another architecture.*missing from the checkpoint: encoder.layers.2"):
        load_pretrained(model, pre.state_dict())
    dense_cfg = _ft_cfg("task.sensors=[s2]", "model.moe.enabled=false")
    dense = new_model(dense_cfg, encoder_config(dense_cfg, None))
    with pytest.raises(TransferError, match="in the checkpoint only: .*deepspeed_moe"):
        load_pretrained(dense, pre.state_dict())
    with pytest.raises(TransferError, match="no 'encoder"):
        load_pretrained(dense, {"backbone.weight": torch.zeros(1)})


def test_build_from_checkpoint_folder_uses_its_architecture(pretrained, tmp_path):
    run_cfg, pre = pretrained
    ckpt = tmp_path / "step00000010"
    ckpt.mkdir()
    torch.save({"module": {f"backbone.{k}": v for k, v in pre.state_dict().items()},
                "msgfm": {"config": run_cfg.to_dict()}},
               ckpt / "mp_rank_00_model_states.pt")
    # the task config asks for another width: the checkpoint's architecture wins (only size/window/drop path apply)
    cfg = _ft_cfg("task.sensors=[s2]", "model.embed_dim=48", "model.num_heads=[2, 4, 8, 16]",
                  "transfer.freeze_encoder=true")
    model, report = build_finetune_model(cfg, ckpt)
    assert model.backbone.encoder.embed_dim == run_cfg.model.embed_dim
    assert report.embeddings_from == {"s2": "pretrained"}
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    with pytest.raises(ValueError, match="--pretrained"):
        build_finetune_model(cfg, None)


def test_evaluation_drops_no_token(pretrained):
    run_cfg, pre = pretrained
    model, _ = _finetune(run_cfg, pre, "task.sensors=[s2]")
    moe = next(m for m in model.backbone.moe_layers().values())
    assert moe.moe.deepspeed_moe.gate.eval_capacity_factor == 4.0
    x = torch.randn(3, 12, 64, 64)
    torch.manual_seed(1)
    with torch.no_grad():
        one_batch = model.output({"s2": x})
        torch.manual_seed(2)  # another RNG state and batches of one: the same scores
        one_by_one = torch.cat([model.output({"s2": x[i:i + 1]}) for i in range(3)])
    torch.testing.assert_close(one_batch, one_by_one, atol=1e-5, rtol=1e-5)


def test_layer_decay_groups(pretrained):
    run_cfg, pre = pretrained
    model, _ = _finetune(run_cfg, pre, "task.sensors=[s2]")
    depths = run_cfg.model.depths
    assert swin_layer_id("backbone.embeddings.s2.proj.weight", depths) == 0
    assert swin_layer_id("backbone.embeddings.sar+s2.norm.bias", depths) == 0  # method 2's stacked embedding
    assert swin_layer_id("backbone.encoder.layers.0.blocks.1.attn.qkv.weight", depths) == 2
    assert swin_layer_id("backbone.encoder.layers.2.downsample.reduction.weight", depths) == 4
    assert swin_layer_id("backbone.encoder.layers.3.blocks.1.mlp.fc1.weight", depths) == 8
    assert swin_layer_id("backbone.encoder.norm.weight", depths) == 9 == swin_layer_id("head.fc.weight", depths)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5, depths=depths,
                          no_weight_decay=model.no_weight_decay())
    scales = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scales[9] == 1.0 and scales[0] == pytest.approx(0.5**9)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model.head.fc.bias)]["weight_decay"] == 0.0
    assert by_param[id(model.head.fc.weight)]["weight_decay"] == 0.05
    table = model.backbone.encoder.layers[0].blocks[0].attn.relative_position_bias_table
    assert by_param[id(table)]["weight_decay"] == 0.0
    assert any(g.get("moe") for g in groups)  # experts in their own groups for DeepSpeed
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("fraction,expected", [(0.01, 3), (0.1, 25), (1.0, 250)])
def test_train_fraction_is_seeded_and_saved(tmp_path, fraction, expected):
    ids = [f"patch_{i:04d}" for i in range(250)]
    path = tmp_path / "train_ids.txt"
    chosen = select_train_fraction(ids, fraction, seed=3, path=path)
    assert len(chosen) == expected == math.floor(fraction * 250 + 0.5)
    assert path.read_text().splitlines()[1:] == chosen
    assert select_train_fraction(ids, fraction, seed=3, path=path) == chosen  # read back
    assert select_train_fraction(ids, fraction, seed=3, path=tmp_path / "again.txt") == chosen  # same draw
    if fraction < 1:
        assert select_train_fraction(ids, fraction, seed=4, path=tmp_path / "other.txt") != chosen
        with pytest.raises(ValueError, match="other settings"):
            select_train_fraction(ids, fraction, seed=4, path=path)


def test_timm_baseline_gives_timm_features(tmp_path):
    import timm

    timm_model = timm.models.swin_transformer.SwinTransformer(
        img_size=64, patch_size=4, in_chans=12, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
        window_size=4, num_classes=0).eval()
    weights = tmp_path / "swin_tiny_s2.pth"
    torch.save(timm_model.state_dict(), weights)
    cfg = _ft_cfg("task.sensors=[s2]", "model.moe.enabled=false", "transfer.init=timm",
                  f"transfer.timm_weights={weights}")
    model, report = build_finetune_model(cfg)
    assert report.embeddings_from == {"s2": "pretrained"} and not report.interpolated
    x = torch.randn(2, 12, 64, 64)
    with torch.no_grad():
        ours = model.eval().features({"s2": x})[-1]
        theirs = timm_model.forward_features(x).permute(0, 3, 1, 2)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # timm weights of another window size (8 here, 12 for Swin-B/384): bias tables resampled on the way in
    wide = timm.models.swin_transformer.SwinTransformer(
        img_size=64, patch_size=4, in_chans=12, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
        window_size=8, num_classes=0)
    torch.save(wide.state_dict(), weights)
    model, _ = build_finetune_model(cfg)
    table = wide.layers[0].blocks[0].attn.relative_position_bias_table.detach()
    torch.testing.assert_close(model.backbone.encoder.layers[0].blocks[0].attn.relative_position_bias_table.detach(),
                               interpolate_bias_table(table, 4))
    with pytest.raises(ValueError, match="timm Swin weights are dense"):
        build_finetune_model(_ft_cfg("transfer.init=timm", f"transfer.timm_weights={weights}"))
