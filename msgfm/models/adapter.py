"""Moving dense msgfm encoders to and from timm's SwinTransformer.

A dense encoder (``model.moe.enabled: false``) with one sensor's embedding is exactly
``timm.models.swin_transformer.SwinTransformer(img_size, patch_size, in_chans=C, embed_dim,
depths, num_heads, window_size, num_classes=0)``: the parameter names match up to the
``patch_embed.`` / ``embeddings.{sensor}.`` / ``encoder.`` prefixes, so timm and TerraTorch
users can load msgfm backbones, and timm weights (e.g. ImageNet-22k) can initialise msgfm.
"""
from __future__ import annotations

from typing import Mapping

import torch

from msgfm.models.msgfm import MsGFM

# Derived buffers some checkpoints carry; msgfm (and timm) rebuild them.
_DERIVED_SUFFIXES = ("relative_position_index", "attn_mask")


def _require_dense(model: MsGFM, action: str) -> None:
    moe = list(model.moe_layers())
    if moe:
        raise ValueError(f"cannot {action}: the encoder has DeepSpeed-MoE experts ({len(moe)} layers, e.g. "
                         f"'{moe[0]}') and timm's Swin is dense; use a model built with model.moe.enabled=false")


def _require_sensor(model: MsGFM, sensor: str) -> None:
    if sensor not in model.embeddings:
        raise ValueError(f"sensor '{sensor}' has no embedding in this model; model sensors: {model.sensors}")


def export_timm_state_dict(model: MsGFM, sensor: str) -> dict[str, torch.Tensor]:
    """State dict of ``sensor``'s embedding + the encoder, in timm SwinTransformer names (strict-loadable)."""
    _require_dense(model, "export to timm")
    _require_sensor(model, sensor)
    out = {f"patch_embed.{k}": v.detach().clone() for k, v in model.embeddings[sensor].state_dict().items()}
    out.update({k: v.detach().clone() for k, v in model.encoder.state_dict().items()})
    return out


def load_timm_state_dict(model: MsGFM, state_dict: Mapping[str, torch.Tensor], sensor: str) -> None:
    """Load a timm SwinTransformer state dict into ``sensor``'s embedding and the shared encoder.

    The classifier (``head.*``) and derived buffers are ignored; every other key must match
    in name and shape (a window or width mismatch is reported with the key that differs).
    """
    _require_dense(model, "load timm weights")
    _require_sensor(model, sensor)
    embed, encoder = {}, {}
    for key, value in state_dict.items():
        if key.startswith("head.") or key.endswith(_DERIVED_SUFFIXES):
            continue
        if key.startswith("patch_embed."):
            embed[key[len("patch_embed."):]] = value
        else:
            encoder[key] = value
    for name, module, part in (("patch_embed", model.embeddings[sensor], embed), ("encoder", model.encoder, encoder)):
        own = module.state_dict()
        missing, unexpected = sorted(set(own) - set(part)), sorted(set(part) - set(own))
        if missing or unexpected:
            raise ValueError(f"timm state dict does not fit the msgfm {name} of sensor '{sensor}': "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
                             f"is it a Swin with the same depths?")
        for key, value in part.items():
            if own[key].shape != value.shape:
                hint = (f" (sensor '{sensor}' has {own[key].shape[1]} bands)" if key == "proj.weight" else
                        " (different window_size?)" if key.endswith("relative_position_bias_table") else "")
                raise ValueError(f"timm weight '{key}' has shape {list(value.shape)}, msgfm {name} expects "
                                 f"{list(own[key].shape)}{hint}")
        module.load_state_dict(part, strict=True)
