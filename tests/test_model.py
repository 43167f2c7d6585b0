"""The msGFM pretraining task (backbone + SimMIM cross-sensor objective) on the demo_cpu config: shapes,
gradients, loss masking, routing, errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from msgfm.config import load_config
from msgfm.models import init_expert_groups
from msgfm.models.moe import MoEMlp
from msgfm.sensors import get_sensor
from msgfm.tasks import build_pretrain_task

DEMO = ["model.moe.expert_parallel_size=1"]


def make_model(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config("demo_cpu", [*DEMO, *overrides])
    return cfg, build_pretrain_task(cfg)


def forward(task, batch, group, masks=None, valid=None):
    """One group's forward with the figure outputs kept (predictions, targets, sample indices)."""
    return task({"images": batch, "masks": masks, "valid": valid}, group, keep_outputs=True)


def make_batch(cfg, group: str, seed: int = 0, batch_size: int | None = None) -> dict[str, torch.Tensor]:
    g = cfg.data.group(group)
    gen = torch.Generator().manual_seed(seed)
    B = batch_size or g.batch_size_per_gpu
    size = cfg.model.img_size
    return {s: torch.randn(B, get_sensor(s).num_channels, size, size, generator=gen) for s in g.sensors}


@pytest.fixture(scope="module")
def demo(single_rank_dist):
    cfg, model = make_model()
    init_expert_groups(model)
    return cfg, model


def test_output_shapes_for_every_group_and_sensor(demo):
    cfg, model = demo
    size, stride = cfg.model.img_size, cfg.model.encoder_stride
    for g in cfg.data.groups:
        batch = make_batch(cfg, g.name)
        B = g.batch_size_per_gpu
        with torch.no_grad():
            out = forward(model, batch, g.name)
        assert out["loss"].shape == () and torch.isfinite(out["loss"])
        assert out["metrics"]["aux_loss"].shape == () and out["metrics"]["aux_loss"] > 0  # demo has an MoE layer
        for source in g.sensors:
            assert out["masks"][source].shape == (B, size // 4, size // 4)
            assert len(out["target_sensor"][source]) == B
            for target, pred in out["predictions"][source].items():
                n = len(out["sample_index"][source][target])
                assert pred.shape == (n, get_sensor(target).num_channels, size, size)
                assert out["targets"][source][target].shape == pred.shape
        assert sum(out["counts"][t] for t in g.sensors) == B * len(g.sensors)
    for sensor in cfg.sensors_in_model:
        x = torch.randn(2, get_sensor(sensor).num_channels, size, size)
        with torch.no_grad():
            features = model.backbone.forward_features(x, sensor)
            stages = model.backbone.forward_intermediates(x, sensor, norm=True)
        assert features.shape == (2, size // stride, size // stride, cfg.model.num_features)
        assert [tuple(s.shape) for s in stages] == [
            (2, cfg.model.embed_dim * 2**i, size // 4 // 2**i, size // 4 // 2**i) for i in range(4)]


def test_other_image_sizes_that_the_windows_allow_work_for_features(demo):
    cfg, model = demo
    x = torch.randn(1, 3, 128, 128)  # grids 32, 16, 8, 4: windows 4, 4, 4, 2 divide them
    assert model.backbone.forward_features(x, "rgb").shape == (1, 4, 4, cfg.model.num_features)
    with pytest.raises(ValueError, match="stage 2's 6x6 token grid is not a multiple of its window 4"):
        model.backbone.forward_features(torch.randn(1, 3, 96, 96), "rgb")
    with pytest.raises(ValueError, match="encoder stride 32"):
        model.backbone.forward_features(torch.randn(1, 3, 48, 48), "rgb")


def test_every_parameter_learns_after_one_backward_over_all_groups(single_rank_dist):
    # cross_rate 0: every sensor is some row's target for sure (with 0.5 a small paired batch may
    # leave a decoder without rows; that case has its own test below).
    cfg, model = make_model("pretrain.cross_rate=0")
    init_expert_groups(model)
    loss = 0.0
    experts_with_tokens: set[tuple[str, int]] = set()
    for g in cfg.data.groups:
        out = forward(model, make_batch(cfg, g.name), g.name)
        loss = loss + out["loss"]
        for name, load in model.backbone.expert_load().items():
            experts_with_tokens |= {(name, e) for e, n in enumerate(load["tokens_per_expert"].tolist()) if n}
    loss.backward()
    silent = []
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        expert = ".deepspeed_experts." in name
        if expert:
            layer, rest = name.split(".moe.deepspeed_moe.experts.deepspeed_experts.")
            if (layer, int(rest.split(".")[0])) not in experts_with_tokens:
                continue
        if not p.grad.abs().sum() > 0:
            silent.append(name)
    assert not silent, f"zero gradients: {silent}"
    assert experts_with_tokens  # the check above covered at least one expert


def test_a_decoder_without_rows_gets_zero_gradients_not_none(demo, monkeypatch):
    cfg, model = demo
    model.zero_grad(set_to_none=True)
    # Every row (sar and s2 sources) decodes into s2.
    monkeypatch.setattr(model, "_choose_targets", lambda num_sensors, batch_size: torch.ones(2, batch_size).long())
    out = forward(model, make_batch(cfg, "sen12ms"), "sen12ms")
    assert out["counts"]["sar"] == 0 and "recon/sar" not in out["metrics"]
    assert out["counts"]["s2"] == 2 * len(out["masks"]["s2"])
    torch.testing.assert_close(out["metrics"]["recon_loss"], out["metrics"]["recon/s2"])
    out["loss"].backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.decoders["sar"].parameters())
    assert all(p.grad is not None and p.grad.any() for p in model.decoders["s2"].parameters())
    model.zero_grad(set_to_none=True)


def test_masked_input_pixels_never_reach_the_reconstruction(demo):
    cfg, model = demo
    batch = make_batch(cfg, "rgb", batch_size=8)
    masks = model.mask_generator.for_sensors(["rgb"], 8, generator=torch.Generator().manual_seed(1))
    pixel_mask = masks["rgb"].repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    noisy = {"rgb": torch.where(pixel_mask, torch.randn_like(batch["rgb"]) * 100, batch["rgb"])}
    outs = []
    for b in (batch, noisy):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(forward(model, b, "rgb", masks=masks))
    assert torch.equal(outs[0]["predictions"]["rgb"]["rgb"], outs[1]["predictions"]["rgb"]["rgb"])
    # ... while an unmasked pixel does change it.
    visible = (~pixel_mask).nonzero()[0].tolist()
    changed = {"rgb": batch["rgb"].clone()}
    changed["rgb"][visible[0], :, visible[2], visible[3]] += 10
    torch.manual_seed(0)
    with torch.no_grad():
        moved = forward(model, changed, "rgb", masks=masks)["predictions"]["rgb"]["rgb"]
    assert not torch.equal(outs[0]["predictions"]["rgb"]["rgb"], moved)


def _loss_with_target_pixel(model, batch, masks, valid, value: float) -> float:
    """mdas with cross_rate 1: dsm decodes into rgb. Change rgb pixel (0, 0, 0, col) to ``value``."""
    changed = {k: v.clone() for k, v in batch.items()}
    changed["rgb"][0, 0, 0, masks["col"]] = value
    torch.manual_seed(0)
    with torch.no_grad():
        out = forward(model, changed, "mdas", masks={s: masks[s] for s in ("dsm", "rgb")}, valid=valid)
    assert out["target_sensor"]["dsm"] == ["rgb"] * len(out["target_sensor"]["dsm"])
    return float(out["metrics"]["recon_loss"])


@pytest.mark.parametrize("col, masked_in_source", [(63, False), (0, True)])
def test_loss_counts_a_target_pixel_only_where_the_source_is_masked(single_rank_dist, col, masked_in_source):
    cfg, model = make_model("pretrain.cross_rate=1")
    init_expert_groups(model)
    batch = make_batch(cfg, "mdas", batch_size=2)
    B, h = 2, cfg.model.img_size // 4
    dsm_mask = torch.zeros(B, h, h, dtype=torch.bool)
    dsm_mask[:, :, : h // 2] = True  # left half of the dsm image masked: the loss region in rgb
    rgb_mask = torch.ones(B, h, h, dtype=torch.bool)  # rgb fully masked: its own encoder input ignores the change
    masks = {"dsm": dsm_mask, "rgb": rgb_mask, "col": col}
    before = _loss_with_target_pixel(model, batch, masks, None, 0.0)
    after = _loss_with_target_pixel(model, batch, masks, None, 50.0)
    assert (before != after) == masked_in_source
    if masked_in_source:  # ... unless the data pipeline marked the pixel invalid
        valid = {"rgb": torch.ones(B, 1, 64, 64, dtype=torch.bool)}
        valid["rgb"][0, 0, 0, col] = False
        assert _loss_with_target_pixel(model, batch, masks, valid, 0.0) == \
            _loss_with_target_pixel(model, batch, masks, valid, 50.0)


def test_loss_is_the_l1_mean_over_masked_pixels_and_channels(demo):
    cfg, model = demo
    batch = make_batch(cfg, "rgb")
    torch.manual_seed(0)
    with torch.no_grad():
        out = forward(model, batch, "rgb")
    pred = out["predictions"]["rgb"]["rgb"]
    mask = out["masks"]["rgb"].repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand_as(pred)
    expected = (pred - batch["rgb"]).abs()[mask].mean()
    torch.testing.assert_close(out["metrics"]["recon/rgb"], expected)
    torch.testing.assert_close(out["metrics"]["recon_loss"], expected)
    torch.testing.assert_close(out["loss"], expected + cfg.model.moe.aux_loss_weight * out["metrics"]["aux_loss"])


@pytest.mark.parametrize("cross_rate", [0, 1])
def test_cross_rate_extremes_route_only_to_self_or_partner(single_rank_dist, cross_rate):
    cfg, model = make_model(f"pretrain.cross_rate={cross_rate}")
    init_expert_groups(model)
    for group, (a, b) in (("sen12ms", ("sar", "s2")), ("mdas", ("dsm", "rgb"))):
        with torch.no_grad():
            out = forward(model, make_batch(cfg, group), group)
        expected = {a: a, b: b} if cross_rate == 0 else {a: b, b: a}
        for source, target in expected.items():
            assert set(out["target_sensor"][source]) == {target}
            assert list(out["predictions"][source]) == [target]
        counts, metrics = out["counts"], out["metrics"]
        assert (counts["cross"] == 0) == (cross_rate == 0) and (counts["self"] == 0) == (cross_rate == 1)
        assert ("recon_cross" not in metrics) == (cross_rate == 0)
        assert ("recon_self" not in metrics) == (cross_rate == 1)
    with torch.no_grad():
        out = forward(model, make_batch(cfg, "rgb"), "rgb")  # unpaired: always itself (Eq. 2)
    assert set(out["target_sensor"]["rgb"]) == {"rgb"} and out["counts"]["cross"] == 0


def test_cross_rate_half_mixes_targets(demo):
    cfg, model = demo
    torch.manual_seed(0)
    with torch.no_grad():
        out = forward(model, make_batch(cfg, "sen12ms", batch_size=16), "sen12ms")
    assert 0 < out["counts"]["cross"] < 32 and {"recon_cross", "recon_self"} <= set(out["metrics"])


def test_self_and_cross_terms_split_each_targets_rows(demo):
    """recon_self/<t> and recon_cross/<t>: the masked L1 over the rows decoded into t from t itself and from
    its partner, recomputed here from the kept predictions."""
    cfg, model = demo
    torch.manual_seed(0)
    with torch.no_grad():
        out = forward(model, make_batch(cfg, "sen12ms", batch_size=6), "sen12ms")
    metrics, seen = out["metrics"], 0
    for target in ("sar", "s2"):
        for source in ("sar", "s2"):
            key = f"recon_{'self' if source == target else 'cross'}/{target}"
            if target not in out["predictions"][source]:
                assert key not in metrics
                continue
            pred = out["predictions"][source][target]
            mask = out["masks"][source][out["sample_index"][source][target]]
            pixels = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand_as(pred)
            expected = (pred - out["targets"][source][target]).abs()[pixels].mean()
            torch.testing.assert_close(metrics[key], expected)
            seen += 1
    assert seen >= 3  # 6 samples x 2 sources at cross_rate 0.5: both kinds occur for some target


@pytest.mark.parametrize("mutate, message", [
    (lambda b: (b, "nosuchgroup"), "unknown data group 'nosuchgroup'"),
    (lambda b: ({**b, "foo": b["sar"]}, "sen12ms"), r"not in the group: \['foo'\]"),
    (lambda b: ({"sar": b["sar"]}, "sen12ms"), r"missing \['s2'\]"),
    (lambda b: ({"sar": b["sar"], "s2": b["s2"][:, :10]}, "sen12ms"), r"sensor 's2' has 12 bands \(B01, .*got 10"),
    (lambda b: ({"sar": b["sar"][..., :32, :32], "s2": b["s2"][..., :32, :32]}, "sen12ms"),
     "32x32 does not match model.img_size=64"),
    (lambda b: ({"sar": b["sar"][:1], "s2": b["s2"]}, "sen12ms"), "must share batch size and image size"),
    (lambda b: ({"sar": b["sar"].long(), "s2": b["s2"]}, "sen12ms"), "expected a float tensor"),
])
def test_bad_inputs_raise_errors_that_name_the_problem(demo, mutate, message):
    cfg, model = demo
    batch, group = mutate(make_batch(cfg, "sen12ms"))
    with pytest.raises(ValueError, match=message):
        forward(model, batch, group)


def test_bad_masks_valid_and_feature_inputs_raise(demo):
    cfg, model = demo
    batch = make_batch(cfg, "rgb", batch_size=8)
    with pytest.raises(ValueError, match=r"masks\['rgb'\]: expected a bool tensor \[8, 16, 16\]"):
        forward(model, batch, "rgb", masks={"rgb": torch.zeros(8, 4, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"valid\['rgb'\]"):
        forward(model, batch, "rgb", valid={"rgb": torch.ones(8, 2, 64, 64, dtype=torch.bool)})
    with pytest.raises(ValueError, match="sensor 'pan' has no embedding"):
        model.backbone.forward_features(torch.randn(1, 1, 64, 64), "pan")


def test_eager_and_sdpa_attention_give_the_same_model_outputs(single_rank_dist):
    outs = []
    for impl in ("eager", "sdpa"):
        cfg, model = make_model(f"kernels.attention={impl}", seed=0)
        init_expert_groups(model)
        torch.manual_seed(1)
        with torch.no_grad():
            outs.append(forward(model, make_batch(cfg, "sen12ms"), "sen12ms"))
    torch.testing.assert_close(outs[0]["loss"], outs[1]["loss"], atol=1e-5, rtol=1e-5)
    for source in ("sar", "s2"):
        for target, pred in outs[0]["predictions"][source].items():
            torch.testing.assert_close(pred, outs[1]["predictions"][source][target], atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_changes_no_numbers(single_rank_dist):
    grads = []
    for enable in (False, True):
        cfg, model = make_model(seed=0)
        init_expert_groups(model)
        model.backbone.set_grad_checkpointing(enable)
        torch.manual_seed(2)
        forward(model, make_batch(cfg, "mdas"), "mdas")["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert "backbone.encoder.layers.2.blocks.1.mlp.moe.deepspeed_moe.gate.wg.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_no_weight_decay_names_norms_biases_tables_and_the_mask_token(demo):
    _, model = demo
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert nwd <= set(names) and "backbone.mask_token" in nwd
    assert "backbone.encoder.layers.0.blocks.0.attn.relative_position_bias_table" in nwd
    assert "backbone.encoder.norm.weight" in nwd and "backbone.embeddings.s2.norm.bias" in nwd
    assert "decoders.rgb.proj.bias" in nwd
    decayed = set(names) - nwd
    assert "backbone.encoder.layers.1.blocks.0.attn.qkv.weight" in decayed and "decoders.s2.proj.weight" in decayed
    assert all(names[n].ndim >= 2 for n in decayed)


def test_paper_model_builds_on_cpu_without_a_process_group():
    code = ("import torch.distributed as dist; from msgfm.config import load_config; "
            "from msgfm.tasks import build_pretrain_task; m = build_pretrain_task(load_config('msgfm_swinb_192')); "
            "layers = m.backbone.moe_layers(); assert not dist.is_initialized(); "
            "print(len(layers), {l.moe.num_local_experts for l in layers.values()})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "9 {1}"


def test_moe_blocks_are_deepspeed_moe_where_configured_and_only_there(demo):
    from deepspeed.moe.layer import MoE
    from timm.layers import Mlp

    cfg, model = demo
    moe_cfg = cfg.model.moe
    expected = {f"encoder.layers.{s}.blocks.{b}.mlp" for s, blocks in moe_cfg.blocks.items() for b in blocks}
    assert set(model.backbone.moe_layers()) == expected
    for i, stage in enumerate(model.backbone.encoder.layers):
        for j, block in enumerate(stage.blocks):
            name = f"encoder.layers.{i}.blocks.{j}.mlp"
            assert isinstance(block.mlp, MoEMlp if name in expected else Mlp)
    for layer in model.backbone.moe_layers().values():
        assert isinstance(layer.moe, MoE)
        gate = layer.moe.deepspeed_moe.gate
        assert (layer.moe.num_experts, gate.k, gate.capacity_factor, gate.eval_capacity_factor, gate.min_capacity) == \
            (moe_cfg.num_experts, moe_cfg.top_k, moe_cfg.capacity_factor, moe_cfg.eval_capacity_factor,
             moe_cfg.min_capacity)


def test_decoder_equals_conv_and_pixel_shuffle():
    from msgfm.tasks.heads import SimMIMDecoder

    decoder = SimMIMDecoder(num_features=16, out_chans=3, encoder_stride=4)
    features_BhwF = torch.randn(2, 3, 5, 16)
    reference = torch.nn.PixelShuffle(4)(decoder.proj(features_BhwF.permute(0, 3, 1, 2)))
    torch.testing.assert_close(decoder(features_BhwF), reference)
