"""DeepSpeed-MoE inside msgfm: expert load numbers, process groups, expert init, parameter counts."""
from __future__ import annotations

import pytest
import torch

from msgfm.config import load_config
from msgfm.models import init_expert_groups, reinit_experts
from msgfm.sensors import get_sensor
from msgfm.tasks import build_pretrain_task, count_parameters


def _demo(*overrides: str) -> tuple:
    cfg = load_config("demo_cpu", ["model.moe.expert_parallel_size=1", *overrides])
    torch.manual_seed(0)
    return cfg, build_pretrain_task(cfg)


def _rgb_batch(cfg, batch_size: int = 8) -> dict[str, torch.Tensor]:
    size = cfg.model.img_size
    return {"rgb": torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("capacity_factor", [0.5, 100.0])
def test_expert_load_counts_routes_and_dropped_tokens(single_rank_dist, capacity_factor):
    cfg, model = _demo(f"model.moe.capacity_factor={capacity_factor}")
    init_expert_groups(model)
    (name, layer), = model.backbone.moe_layers().items()
    outputs = []
    layer.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    with torch.no_grad():
        out = model({"images": _rgb_batch(cfg)}, "rgb")
    load = model.backbone.expert_load()[name]
    num_tokens = outputs[0].shape[0] * outputs[0].shape[1]
    assert int(load["tokens_per_expert"].sum()) == num_tokens  # top-1: one route per token
    torch.testing.assert_close(load["share"].sum(), torch.tensor(1.0))
    # A dropped token leaves the (non-residual) MoE layer as an exact zero vector.
    zero_rows = int((outputs[0].flatten(0, 1) == 0).all(dim=1).sum())
    assert load["dropped_fraction"] == pytest.approx(zero_rows / num_tokens)
    assert (zero_rows > 0) == (capacity_factor < 1)
    torch.testing.assert_close(out["metrics"]["aux_loss"], layer.aux_loss.float())


def test_expert_parallel_model_needs_groups_and_a_fitting_world(single_rank_dist):
    cfg = load_config("demo_cpu")  # expert_parallel_size 2: builds without any process group
    model = build_pretrain_task(cfg)
    assert {m.moe.num_local_experts for m in model.backbone.moe_layers().values()} == {2}
    with pytest.raises(RuntimeError, match="init_expert_groups"):
        model({"images": _rgb_batch(cfg)}, "rgb")
    with pytest.raises(ValueError, match="expert_parallel_size=2 does not divide the world size 1"):
        init_expert_groups(model)


def test_init_expert_groups_attaches_each_layer_once(single_rank_dist):
    _, model = _demo()
    assert init_expert_groups(model) == 1
    assert all(m.moe.deepspeed_moe.ep_group is not None for m in model.backbone.moe_layers().values())
    assert init_expert_groups(model) == 0


def test_reinit_experts_gives_distinct_experts_independent_of_the_split():
    cfg1 = load_config("demo_cpu", ["model.moe.expert_parallel_size=1"])
    cfg2 = load_config("demo_cpu", ["model.moe.expert_parallel_size=2"])
    whole, half = build_pretrain_task(cfg1), build_pretrain_task(cfg2)
    reinit_experts(whole, seed=7, ep_rank=0)
    reinit_experts(half, seed=7, ep_rank=1)
    experts_whole = next(iter(whole.backbone.moe_layers().values())).moe.deepspeed_moe.experts.deepspeed_experts
    experts_half = next(iter(half.backbone.moe_layers().values())).moe.deepspeed_moe.experts.deepspeed_experts
    fc1 = [e.fc1.weight for e in experts_whole]
    assert all(not torch.equal(fc1[i], fc1[j]) for i in range(4) for j in range(i + 1, 4))
    for j in range(2):  # rank 1 of 2 holds global experts 2 and 3
        torch.testing.assert_close(experts_half[j].fc1.weight, experts_whole[2 + j].fc1.weight, rtol=0, atol=0)
        torch.testing.assert_close(experts_half[j].fc2.weight, experts_whole[2 + j].fc2.weight, rtol=0, atol=0)


def _mlp_params(dim: int, ratio: float = 4.0) -> int:
    hidden = int(dim * ratio)
    return dim * hidden + hidden + hidden * dim + dim


def test_paper_parameter_counts():
    import timm

    cfg = load_config("msgfm_swinb_192")
    counts = count_parameters(cfg)
    assert abs(counts["encoder_dense"] - 86.7e6) <= 0.1e6
    # The dense encoder is exactly timm's Swin-B/192 (window 6) minus its patch embedding.
    tm = timm.models.swin_transformer.SwinTransformer(img_size=192, patch_size=4, in_chans=3, embed_dim=128,
                                                      depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                                                      window_size=6, num_classes=0, device="meta")
    timm_encoder = sum(p.numel() for n, p in tm.named_parameters() if not n.startswith("patch_embed."))
    assert counts["encoder_dense"] == timm_encoder
    moe_layers, experts, width = 9, 8, 512  # stage 3 (index 2) of Swin-B is 512 wide
    assert counts["encoder_experts"] == moe_layers * experts * _mlp_params(width)
    gates = moe_layers * width * experts
    assert counts["encoder_shared"] == counts["encoder_dense"] - moe_layers * _mlp_params(width) + gates
    assert counts["encoder_total"] == counts["encoder_shared"] + counts["encoder_experts"]
    assert counts["encoder_active_per_token"] == counts["encoder_shared"] + counts["encoder_experts"] // experts
    assert 218e6 < counts["encoder_total"] < 220e6  # all experts; the paper gives 89M (Table 11), see README
    # Global totals do not depend on the expert-parallel split, and a rank's model holds 1/8 of the experts.
    assert count_parameters(load_config("msgfm_swinb_192", ["model.moe.expert_parallel_size=1"])) == counts
    with torch.device("meta"):
        local = sum(p.numel() for p in build_pretrain_task(cfg).parameters())
    assert local == counts["model_total"] - counts["encoder_experts"] * 7 // 8
    bands = sum(get_sensor(s).num_channels for s in cfg.sensors_in_model)
    assert counts["decoders"] == 1024 * 32 * 32 * bands + 32 * 32 * bands
