"""One adapter between the layouts a backbone's weights come in: checkpoints, the backbone, timm.

- **backbone layout** (``MsGFMBackbone.state_dict()``): ``embeddings.<sensor>.{proj,norm}.*``,
  ``mask_token``, ``encoder.*`` (timm SwinTransformer names).
- **pretraining checkpoints** hold the task module: ``backbone.*`` plus ``decoders.*``; checkpoints
  written before the backbone/task split hold the backbone layout at the top level (with
  ``decoders.*`` beside it). :func:`backbone_state` turns either into the backbone layout.
- **timm**: a dense encoder plus one sensor's embedding is exactly
  ``timm.models.swin_transformer.SwinTransformer(img_size, patch_size, in_chans=C, embed_dim, depths,
  num_heads, window_size, num_classes=0)``: ``patch_embed.*`` is ``embeddings.<sensor>.*`` and every
  other key is ``encoder.<key>``. :func:`timm_to_backbone` / :func:`backbone_to_timm` map the names;
  :func:`load_timm_state_dict` / :func:`export_timm_state_dict` move weights in and out of a backbone
  with every key and shape checked.

Fine-tuning reads pretrained weights in the backbone layout (msgfm/finetune/transfer.py).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from msgfm.errors import UserError
from msgfm.models.backbone import MsGFMBackbone

BACKBONE_PREFIX = "backbone."
# Derived buffers some checkpoints carry; msgfm (and timm) rebuild them.
_DERIVED_SUFFIXES = ("relative_position_index", "attn_mask")
_BACKBONE_ROOTS = ("embeddings.", "encoder.", "mask_token")


def backbone_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone-layout tensors of a pretraining checkpoint's model state (either layout, see above)."""
    if any(k.startswith(BACKBONE_PREFIX) for k in state):
        return {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    found = {k: v for k, v in state.items() if k.startswith(_BACKBONE_ROOTS)}
    if not found:
        roots = sorted({k.split(".")[0] for k in state})[:8]
        raise UserError(f"not an msgfm model state: no backbone.*, embeddings.* or encoder.* tensors (keys start "
                        f"with {roots})")
    return found


def timm_to_backbone(timm_state: Mapping[str, torch.Tensor], sensor: str) -> dict[str, torch.Tensor]:
    """Timm SwinTransformer names -> backbone names for ``sensor``'s embedding (classifier and derived
    buffers dropped)."""
    out = {}
    for key, value in timm_state.items():
        if key.startswith("head.") or key.endswith(_DERIVED_SUFFIXES):
            continue
        if key.startswith("patch_embed."):
            out[f"embeddings.{sensor}.{key[len('patch_embed.'):]}"] = value
        else:
            out[f"encoder.{key}"] = value
    return out


def backbone_to_timm(state: Mapping[str, torch.Tensor], sensor: str) -> dict[str, torch.Tensor]:
    """Backbone names -> timm SwinTransformer names: ``sensor``'s embedding and the encoder."""
    prefix = f"embeddings.{sensor}."
    out = {f"patch_embed.{k[len(prefix):]}": v for k, v in state.items() if k.startswith(prefix)}
    out.update({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
    return out


def _require_dense(backbone: MsGFMBackbone, action: str) -> None:
    moe = list(backbone.moe_layers())
    if moe:
        raise UserError(f"cannot {action}: the encoder has DeepSpeed-MoE experts ({len(moe)} layers, e.g. "
                        f"'{moe[0]}') and timm's Swin is dense; use a model built with model.moe.enabled=false")


def _require_sensor(backbone: MsGFMBackbone, sensor: str) -> None:
    if sensor not in backbone.embeddings:
        raise UserError(f"sensor '{sensor}' has no embedding in this model; model sensors: {backbone.sensors}")


def export_timm_state_dict(backbone: MsGFMBackbone, sensor: str) -> dict[str, torch.Tensor]:
    """State dict of ``sensor``'s embedding + the encoder, in timm SwinTransformer names (strict-loadable)."""
    _require_dense(backbone, "export to timm")
    _require_sensor(backbone, sensor)
    own = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    return backbone_to_timm(own, sensor)


def load_timm_state_dict(backbone: MsGFMBackbone, state_dict: Mapping[str, torch.Tensor], sensor: str) -> None:
    """Load a timm SwinTransformer state dict into ``sensor``'s embedding and the shared encoder.

    The classifier (``head.*``) and derived buffers are ignored; every other key must match
    in name and shape (a window or width mismatch is reported with the key that differs).
    """
    _require_dense(backbone, "load timm weights")
    _require_sensor(backbone, sensor)
    mapped = timm_to_backbone(state_dict, sensor)
    own = {k: v for k, v in backbone.state_dict().items()
           if k.startswith(("encoder.", f"embeddings.{sensor}."))}
    missing, unexpected = sorted(set(own) - set(mapped)), sorted(set(mapped) - set(own))
    if missing or unexpected:
        raise UserError(f"timm state dict does not fit the msgfm backbone of sensor '{sensor}': "
                        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
                        f"is it a Swin with the same depths?")
    for key, value in mapped.items():
        if own[key].shape != value.shape:
            hint = (f" (sensor '{sensor}' has {own[key].shape[1]} bands)" if key.endswith("proj.weight") else
                    " (different window_size?)" if key.endswith("relative_position_bias_table") else "")
            raise UserError(f"timm weight '{key}' has shape {list(value.shape)}, the msgfm backbone expects "
                            f"{list(own[key].shape)}{hint}")
    backbone.load_state_dict(mapped, strict=False)
