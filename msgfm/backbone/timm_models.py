"""msGFM architectures by name in timm: ``timm.create_model("msgfm_swinb_192", ...)`` after ``import msgfm``.

Names (architectures from the shipped configs, msgfm/configs):

- ``msgfm_swinb_192``: the paper's Swin-B/192 with 8 top-1 experts in every other block of stage 3
- ``msgfm_swinb_192_dense``: the same without experts (``msgfm_swinb_192_dense_cross50``, Table 6)
- ``msgfm_tiny``: the tiny CPU model (``demo_cpu``), for tests
- ``msgfm_swin``: whatever architecture the export file's config.json describes

Pretrained weights are an ``msgfm export`` folder's ``model.safetensors``, given the timm way::

    timm.create_model("msgfm_swinb_192", pretrained=True, features_only=True, sensors=["s2"],
                      pretrained_cfg_overlay={"file": "export/model.safetensors"})

Features come out NCHW (timm's getter over ``forward_intermediates``). The architecture and band
lists are read from the ``config.json`` beside the file; ``sensors`` picks the embedding
(several are stacked, as :func:`msgfm.backbone.load_backbone` does; default: the export's first
sensor, or the config's first without a file).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from msgfm.backbone.model import MsGFMSwin, normalization, pick_sensors, read_config, swin_kwargs, to_swin_state
from msgfm.errors import UserError

# timm name -> the msgfm config its architecture comes from (one place for the Swin-B numbers: msgfm/configs)
VARIANTS = {"msgfm_swinb_192": "msgfm_swinb_192", "msgfm_swinb_192_dense": "msgfm_swinb_192_dense_cross50",
            "msgfm_tiny": "demo_cpu", "msgfm_swin": None}
_SHAPE_KEYS = ("patch_size", "embed_dim", "depths", "num_heads", "mlp_ratio", "qkv_bias")


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # first_conv None: timm must not "adapt" the patch embedding to in_chans, the export has the real one
    return {"url": "", "num_classes": 0, "input_size": (3, 192, 192), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
            "first_conv": None, "classifier": "head.fc", "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({name: _cfg() for name in VARIANTS})


def config_architecture(config_name: str) -> dict[str, Any]:
    """An export-style config (architecture + sensors with bands) from a shipped msgfm config, no weights."""
    from msgfm.config import load_config
    from msgfm.sensors import get_sensor

    cfg = load_config(config_name)
    model, moe = cfg.model, cfg.model.moe
    arch = {"img_size": model.img_size, "patch_size": model.patch_size, "embed_dim": model.embed_dim,
            "depths": list(model.depths), "num_heads": list(model.num_heads), "window_size": model.window_size,
            "mlp_ratio": model.mlp_ratio, "qkv_bias": model.qkv_bias,
            "moe": {"num_experts": moe.num_experts, "blocks": {str(k): list(v) for k, v in moe.blocks.items() if v}}
            if moe.enabled else None}
    return {"architecture": arch, "sensors": {s: {"bands": list(get_sensor(s).bands)} for s in cfg.sensors_in_model}}


def same_shape(name: str, export_arch: Mapping[str, Any], named_arch: Mapping[str, Any], file: str) -> None:
    differs = [k for k in _SHAPE_KEYS if list(_tuple(export_arch[k])) != list(_tuple(named_arch[k]))]
    if (export_arch.get("moe") is None) != (named_arch.get("moe") is None):
        differs.append("moe")
    if differs:
        raise UserError(f"{file}: the export's architecture differs from {name}'s in {differs}; create it as "
                        f"'msgfm_swin' (architecture from the export) or by the name that matches")


def _tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> MsGFMSwin:
    sensors = kwargs.pop("sensors", None)
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    pretrained_cfg = kwargs.get("pretrained_cfg")
    file = overlay.get("file") or (pretrained_cfg.get("file") if isinstance(pretrained_cfg, Mapping) else None)
    config_name = VARIANTS[name]
    if pretrained and not file:
        raise UserError(f"{name}: pretrained=True needs the export's weights: pass "
                        f"pretrained_cfg_overlay={{'file': 'EXPORT_DIR/model.safetensors'}} (msgfm export)")
    if file:
        config = read_config(Path(file).parent)
        if config_name is not None:
            same_shape(name, config["architecture"], config_architecture(config_name)["architecture"], file)
    elif config_name is None:
        raise UserError("msgfm_swin takes its architecture from an export: pass "
                        "pretrained_cfg_overlay={'file': 'EXPORT_DIR/model.safetensors'}")
    else:
        config = config_architecture(config_name)
    chosen = pick_sensors(config, sensors)
    model_kwargs = swin_kwargs(config, chosen)
    clash = sorted(set(kwargs) & set(model_kwargs) - {"in_chans"})
    if clash:
        raise UserError(f"{name}: {clash} are fixed by the architecture (config.json / the msgfm config)")
    if "in_chans" in kwargs and kwargs.pop("in_chans") != model_kwargs["in_chans"]:
        raise UserError(f"{name}: in_chans differs from the {model_kwargs['in_chans']} bands of sensors {chosen}; "
                        f"choose the sensors with sensors=[...] instead")
    # timm's data config (resolve_model_data_config) then normalizes as the model was trained
    norm = normalization(config, chosen)
    size = config["architecture"]["img_size"]
    kwargs["pretrained_cfg_overlay"] = {"input_size": (model_kwargs["in_chans"], size, size),
                                        **({"mean": tuple(norm["mean"]), "std": tuple(norm["std"])} if norm else {}),
                                        **overlay}
    depths = model_kwargs["depths"]
    out_indices = kwargs.pop("out_indices", tuple(range(len(depths))))

    def filter_fn(state: dict[str, torch.Tensor], model: MsGFMSwin) -> dict[str, torch.Tensor]:
        return to_swin_state(state, model.sensors)

    return build_model_with_cfg(MsGFMSwin, name, pretrained, pretrained_filter_fn=filter_fn,
                                feature_cfg={"feature_cls": "getter", "out_indices": out_indices},
                                **model_kwargs, **kwargs)


@register_model
def msgfm_swinb_192(pretrained: bool = False, **kwargs: Any) -> MsGFMSwin:
    """MsGFM Swin-B/192 with MoE (8 experts, top-1, every other block of stage 3)."""
    return _create("msgfm_swinb_192", pretrained, **kwargs)


@register_model
def msgfm_swinb_192_dense(pretrained: bool = False, **kwargs: Any) -> MsGFMSwin:
    """MsGFM Swin-B/192 without experts."""
    return _create("msgfm_swinb_192_dense", pretrained, **kwargs)


@register_model
def msgfm_tiny(pretrained: bool = False, **kwargs: Any) -> MsGFMSwin:
    """The tiny msGFM of the CPU demo (4 experts), for tests."""
    return _create("msgfm_tiny", pretrained, **kwargs)


@register_model
def msgfm_swin(pretrained: bool = False, **kwargs: Any) -> MsGFMSwin:
    """Any exported msGFM: the architecture comes from the export's config.json."""
    return _create("msgfm_swin", pretrained, **kwargs)
