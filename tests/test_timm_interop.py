"""A dense msgfm backbone with one sensor's embedding is a timm Swin: both directions, two configurations."""
from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer

from msgfm.config import load_config
from msgfm.models import MsGFMBackbone, export_timm_state_dict, load_timm_state_dict
from msgfm.sensors import get_sensor

CONFIGS = {
    # 64 px, window 4: stage 2's 4x4 grid is one unshifted window, stage 3's 2x2 grid shrinks the window to 2.
    "demo": ("demo_cpu", ["model.moe.enabled=false"]),
    # Swin-B/192 (window 6) with reduced depth: stage 3's 6x6 grid is one unshifted window.
    "swinb192_shallow": ("msgfm_swinb_192", ["model.moe.enabled=false", "model.depths=[2,2,2,2]", "model.sensors=[rgb]",
                                             "data.groups=[{name: rgb, sensors: [rgb], lr: 1.0e-4}]"]),
}


def _pair(config: str, sensor: str) -> tuple:
    name, overrides = CONFIGS[config]
    cfg = load_config(name, overrides)
    torch.manual_seed(0)
    model = MsGFMBackbone(cfg.model, cfg.kernels, cfg.sensors_in_model).eval()
    m = cfg.model
    timm_model = SwinTransformer(img_size=m.img_size, patch_size=m.patch_size,
                                 in_chans=get_sensor(sensor).num_channels,
                                 embed_dim=m.embed_dim, depths=m.depths, num_heads=m.num_heads,
                                 window_size=m.window_size, num_classes=0).eval()
    x = torch.randn(2, get_sensor(sensor).num_channels, m.img_size, m.img_size,
                    generator=torch.Generator().manual_seed(1))
    return model, timm_model, x


@pytest.mark.parametrize("config, sensor", [("demo", "s2"), ("swinb192_shallow", "rgb")])
def test_export_loads_strictly_into_timm_with_equal_features(config, sensor):
    model, timm_model, x = _pair(config, sensor)
    timm_model.load_state_dict(export_timm_state_dict(model, sensor), strict=True)
    with torch.no_grad():
        ours, theirs = model.forward_features(x, sensor), timm_model.forward_features(x)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("config, sensor", [("demo", "sar"), ("swinb192_shallow", "rgb")])
def test_timm_weights_load_into_msgfm_with_equal_features(config, sensor):
    model, timm_model, x = _pair(config, sensor)
    with torch.no_grad():  # make the timm weights differ from msgfm's init everywhere
        for p in timm_model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    load_timm_state_dict(model, timm_model.state_dict(), sensor)
    with torch.no_grad():
        ours, theirs = model.forward_features(x, sensor), timm_model.forward_features(x)
    assert (ours - theirs).abs().max() < 1e-4


def test_clear_errors_for_moe_models_and_mismatched_weights():
    cfg = load_config("demo_cpu", ["model.moe.expert_parallel_size=1"])
    with pytest.raises(ValueError, match="DeepSpeed-MoE experts"):
        export_timm_state_dict(MsGFMBackbone(cfg.model, cfg.kernels, cfg.sensors_in_model), "rgb")
    model, timm_model, _ = _pair("demo", "rgb")
    with pytest.raises(ValueError, match=r"sensor 's2' has 12 bands"):
        load_timm_state_dict(model, timm_model.state_dict(), "s2")
    with pytest.raises(ValueError, match="no embedding"):
        export_timm_state_dict(model, "pan")
