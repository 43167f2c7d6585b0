"""An exported msGFM backbone as a plain timm Swin: no DeepSpeed, no msgfm training code.

An export folder (``msgfm export``, docs/export.md) holds ``model.safetensors`` and
``config.json``. :func:`load_backbone` builds :class:`MsGFMSwin` from them: timm's
``SwinTransformer`` (so it *is* a timm backbone: ``forward_features``,
``forward_intermediates``, ``feature_info``, ``no_weight_decay``, ``set_grad_checkpointing``)
whose MoE blocks carry :class:`~msgfm.backbone.moe.Top1MoE` instead of an MLP, and whose patch
embedding takes the chosen sensors' bands: one sensor, or several stacked along channels
(transfer method 2: the stacked embedding is the mean of what each sensor's pretrained
embedding makes of its own bands, msgfm/finetune/transfer.py).

Weight names in ``model.safetensors`` (one naming, written by msgfm/export):

- ``embeddings.<sensor>.proj.{weight,bias}``, ``embeddings.<sensor>.norm.{weight,bias}``
- ``mask_token`` [1, 1, 1, D] (pretraining's learned mask token)
- ``encoder.<key>`` with ``<key>`` a timm ``SwinTransformer`` key (``layers.<i>.blocks.<j>.attn.qkv.weight``,
  ``layers.<i>.downsample.norm.weight``, ``norm.weight``, ...); in an MoE block the MLP is
  ``encoder.layers.<i>.blocks.<j>.mlp.gate.weight`` [E, C] and
  ``encoder.layers.<i>.blocks.<j>.mlp.experts.<e>.{fc1,fc2}.{weight,bias}`` (e: global expert number)
- ``decoders.<sensor>.*`` (SimMIM decoders, only when exported with ``--decoders``)

Nothing here imports DeepSpeed, MLflow or rasterio (tests/test_backbone_export.py checks it).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from msgfm.backbone.moe import Top1MoE
from msgfm.errors import MissingFileError, UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "msgfm-export"
FORMAT_VERSION = 1
EMBED_PARAMS = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")


class MsGFMSwin(SwinTransformer):
    """timm's SwinTransformer with msGFM's top-1 MoE layers (plain torch) in the blocks ``moe_blocks`` names.

    ``moe_blocks``: stage -> block indices whose MLP is a :class:`Top1MoE` of ``num_experts``.
    ``sensors`` / ``bands``: what the patch embedding's input channels are, in order.
    Every other argument is timm's ``SwinTransformer``'s (``num_classes`` defaults to 0: a backbone).
    """

    def __init__(self, *, moe_blocks: Mapping[int | str, Sequence[int]] | None = None, num_experts: int = 0,
                 sensors: Sequence[str] = (), bands: Sequence[str] = (), num_classes: int = 0,
                 drop_path_rate: float = 0.0, **swin_kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, drop_path_rate=drop_path_rate, **swin_kwargs)
        self.in_chans = int(swin_kwargs.get("in_chans", 3))
        self.sensors = list(sensors)
        self.bands = list(bands)
        self.moe_blocks = {int(stage): [int(b) for b in blocks] for stage, blocks in (moe_blocks or {}).items()}
        mlp_ratio = float(swin_kwargs.get("mlp_ratio", 4.0))
        drop = float(swin_kwargs.get("proj_drop_rate", 0.0))
        for stage, blocks in self.moe_blocks.items():
            for j in blocks:
                block: Any = self.layers[stage].blocks[j]  # type: ignore[index]
                dim = block.norm2.normalized_shape[0]
                block.mlp = Top1MoE(dim, int(dim * mlp_ratio), num_experts, drop)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Timm's ``forward_intermediates``, with ``output_fmt="NHWC"`` as well as ``"NCHW"``."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise UserError(f"output_fmt must be 'NCHW' or 'NHWC', got '{output_fmt}'")
        out = super().forward_intermediates(x, indices, norm, stop_early, "NCHW", intermediates_only)
        if output_fmt == "NCHW":
            return out

        def nhwc(stages: list[torch.Tensor]) -> list[torch.Tensor]:
            return [s.permute(0, 2, 3, 1) for s in stages]

        return nhwc(out) if isinstance(out, list) else (out[0], nhwc(out[1]))

    def moe_layers(self) -> dict[str, Top1MoE]:
        """Every MoE layer by module name."""
        return {name: m for name, m in self.named_modules() if isinstance(m, Top1MoE)}

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE load-balancing losses of the last forward; None without experts."""
        losses = [m.aux_loss for m in self.moe_layers().values() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None


# --------------------------------------------------------------------------------------------- reading an export


def export_paths(export: str | Path) -> tuple[Path, Path]:
    """(config.json, model.safetensors) of an export folder (or of either file in it)."""
    path = Path(export)
    folder = path.parent if path.name in (CONFIG_FILE, WEIGHTS_FILE) else path
    config, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for needed in (config, weights):
        if not needed.is_file():
            raise MissingFileError(f"{needed}: not found; an msgfm export folder holds {CONFIG_FILE} and "
                                   f"{WEIGHTS_FILE} (write one with `msgfm export RUN -o DIR`)")
    return config, weights


def read_config(export: str | Path) -> dict[str, Any]:
    """The ``config.json`` of an export, its format checked."""
    config_path, _ = export_paths(export)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path}: not valid JSON ({err}); write the export again") from None
    if config.get("format") != FORMAT_NAME or int(config.get("format_version", -1)) > FORMAT_VERSION:
        raise UserError(f"{config_path}: not an msgfm export of format {FORMAT_NAME} <= {FORMAT_VERSION} (format "
                        f"{config.get('format')!r}, version {config.get('format_version')!r}); update msgfm")
    return config


def pick_sensors(config: Mapping[str, Any], sensors: str | Sequence[str] | None) -> list[str]:
    """The sensors asked for (``"s2,sar"`` or a list; default: the export's first sensor), each checked."""
    known = list(config["sensors"])
    if sensors is None:
        return known[:1]
    chosen = [s.strip() for s in sensors.split(",")] if isinstance(sensors, str) else [str(s) for s in sensors]
    chosen = [s for s in chosen if s]
    unknown = [s for s in chosen if s not in known]
    if unknown or not chosen:
        raise UserError(f"sensors {unknown or chosen}: the model was not trained on them; it knows {known} "
                        f"(pass some of these as sensors=)")
    if len(set(chosen)) != len(chosen):
        raise UserError(f"sensors {chosen}: a sensor is named twice")
    return chosen


def swin_kwargs(config: Mapping[str, Any], sensors: Sequence[str]) -> dict[str, Any]:
    """Constructor arguments of :class:`MsGFMSwin` for an export's architecture and the chosen sensors."""
    arch = config["architecture"]
    moe = arch.get("moe")
    return {"img_size": arch["img_size"], "patch_size": arch["patch_size"], "embed_dim": arch["embed_dim"],
            "depths": tuple(arch["depths"]), "num_heads": tuple(arch["num_heads"]),
            "window_size": arch["window_size"], "mlp_ratio": arch["mlp_ratio"], "qkv_bias": arch["qkv_bias"],
            "in_chans": sum(len(config["sensors"][s]["bands"]) for s in sensors),
            "moe_blocks": moe["blocks"] if moe else None, "num_experts": moe["num_experts"] if moe else 0,
            "sensors": list(sensors), "bands": [f"{s}:{b}" for s in sensors for b in config["sensors"][s]["bands"]]}


def stacked_embedding(per_sensor: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One patch embedding for sensors stacked along channels (method 2, msgfm/finetune/transfer.py):
    projections concatenated along input channels and scaled by 1/n, biases and norms averaged."""
    if len(per_sensor) == 1:
        return dict(per_sensor[0])
    scale = 1.0 / len(per_sensor)
    out = {"proj.weight": torch.cat([p["proj.weight"] for p in per_sensor], dim=1) * scale}
    for param in ("proj.bias", "norm.weight", "norm.bias"):
        out[param] = torch.stack([p[param] for p in per_sensor]).mean(0)
    return out


def to_swin_state(weights: Mapping[str, torch.Tensor], sensors: Sequence[str]) -> dict[str, torch.Tensor]:
    """Export names -> :class:`MsGFMSwin` names for ``sensors`` (stacked when several)."""
    per_sensor = []
    for sensor in sensors:
        prefix = f"embeddings.{sensor}."
        found = {p: weights[prefix + p] for p in EMBED_PARAMS if prefix + p in weights}
        if len(found) != len(EMBED_PARAMS):
            raise UserError(f"the export has no complete patch embedding for sensor '{sensor}' (missing "
                            f"{[prefix + p for p in EMBED_PARAMS if p not in found]}); export it again")
        per_sensor.append(found)
    state = {f"patch_embed.{k}": v for k, v in stacked_embedding(per_sensor).items()}
    state.update({k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")})
    return state


def load_backbone(export: str | Path, sensors: str | Sequence[str] | None = None,
                  **swin_overrides: Any) -> MsGFMSwin:
    """The backbone of an ``msgfm export`` folder as a plain torch module (eval mode, CPU, float32).

    ``sensors``: the sensors the input holds, stacked along channels in this order (``"s2"``,
    ``["sar", "s2"]`` or ``"sar,s2"``; default: the export's first sensor); ``in_chans`` is their
    band count. ``swin_overrides`` go to timm's ``SwinTransformer`` (e.g. ``drop_path_rate``,
    ``strict_img_size``); architecture keys come from the export and cannot be overridden.
    """
    from safetensors.torch import load_file

    config = read_config(export)
    _, weights_path = export_paths(export)
    chosen = pick_sensors(config, sensors)
    kwargs = swin_kwargs(config, chosen)
    clash = sorted(set(swin_overrides) & set(kwargs))
    if clash:
        raise UserError(f"load_backbone: {clash} come from the export's config.json and cannot be overridden")
    model = MsGFMSwin(**kwargs, **swin_overrides)
    load_swin_state(model, to_swin_state(load_file(str(weights_path)), chosen), str(weights_path))
    model.normalization = normalization(config, chosen)  # type: ignore[assignment]
    return model.eval()


def load_swin_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load into a :class:`MsGFMSwin` (a classifier head, if any, stays as initialised)."""
    own = {k for k in model.state_dict() if not k.startswith("head.")}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise UserError(f"{source}: the weights do not fit the architecture in its config.json (missing "
                        f"{missing[:4]}, unexpected {unexpected[:4]}); export the model again")
    model.load_state_dict(dict(state), strict=False)


def normalization(config: Mapping[str, Any], sensors: Sequence[str]) -> dict[str, list[float]]:
    """Per-channel mean and std of the stacked input (each sensor's first recorded statistics), or empty."""
    mean: list[float] = []
    std: list[float] = []
    for sensor in sensors:
        stats = config["sensors"][sensor].get("normalization") or []
        if not stats:
            return {}
        mean += stats[0]["mean"]
        std += stats[0]["std"]
    return {"mean": mean, "std": std}
