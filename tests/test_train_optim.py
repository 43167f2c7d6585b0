"""Optimizer parameter groups: weight decay exemptions, MoE expert groups, kernel choice."""
from __future__ import annotations

import pytest
import torch
from deepspeed.moe.utils import is_moe_param

from msgfm.config import OptimizerConfig, load_config
from msgfm.tasks import build_pretrain_task
from msgfm.train.optim import (
    apex_fused_adam,
    build_optimizer,
    optimizer_class,
    param_groups,
    parameter_owner,
    set_lr,
    set_rates,
)


@pytest.fixture(scope="module")
def model():
    cfg = load_config("demo_cpu", ["model.moe.expert_parallel_size=1", "model.img_size=32"])
    return build_pretrain_task(cfg)


def test_groups_cover_every_parameter_once(model):
    groups = param_groups(model, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)


def test_no_decay_and_expert_groups(model):
    groups = param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skip = model.no_weight_decay()
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            exempt = name in skip or p.ndim <= 1
            assert group["weight_decay"] == (0.0 if exempt else 0.05), name
            assert bool(group.get("moe")) == is_moe_param(p), name  # experts live in their own groups
    assert any(g.get("moe") for g in groups)
    no_decay_names = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "backbone.mask_token" in no_decay_names
    assert any("relative_position_bias_table" in n for n in no_decay_names)
    assert any(n.endswith("norm1.weight") for n in no_decay_names)


def test_kernel_choice_on_cpu(model):
    assert optimizer_class(OptimizerConfig(), on_gpu=False)[0] is torch.optim.AdamW
    for kind in ("apex", "deepspeed"):
        with pytest.raises(ValueError, match="needs a CUDA device"):
            optimizer_class(OptimizerConfig(implementation=kind), on_gpu=False)
    cls, reason = apex_fused_adam()
    if cls is None:
        assert "apex" in reason
        with pytest.raises(ValueError, match="Build NVIDIA apex from source"):
            optimizer_class(OptimizerConfig(implementation="apex"), on_gpu=True)


def test_adamw_hyperparameters_and_set_lr(model):
    opt = build_optimizer(model, OptimizerConfig(), lr=1e-4, on_gpu=False)
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in opt.param_groups)
    set_lr(opt, 3e-5)
    assert {g["lr"] for g in opt.param_groups} == {3e-5}



def test_each_sensor_owns_its_embedding_and_decoder_groups(model):
    groups = param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    owners = {}
    for group in groups:
        for p in group["params"]:
            owners[names[id(p)]] = group["sensor"]
            assert not (group.get("moe") and group["sensor"]), "experts are shared"
    assert owners["backbone.embeddings.sar.proj.weight"] == "sar" and owners["decoders.dsm.proj.bias"] == "dsm"
    assert owners["backbone.mask_token"] is None and owners["backbone.encoder.norm.weight"] is None
    assert {g["sensor"] for g in groups} == {None, "rgb", "s2", "sar", "dsm"}
    assert parameter_owner("backbone.embeddings.s2.norm.bias") == "s2" and parameter_owner("decoders.rgb") is None
    opt = build_optimizer(model, OptimizerConfig(), lr=1e-4, on_gpu=False)
    set_rates(opt, 2e-4, {"sar": 5e-5})
    rates = {g["sensor"]: g["lr"] for g in opt.param_groups}
    assert rates[None] == 2e-4 and rates["sar"] == 5e-5 and rates["rgb"] == 1e-4  # rgb: not in this update
