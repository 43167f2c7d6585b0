"""msGFM backbones in TerraTorch's backbone registry: ``backbone: msgfm_swinb_192`` in a TerraTorch YAML.

TerraTorch (1.2.x) finds backbones in ``terratorch.registry.BACKBONE_REGISTRY``, a registry of
sources; a name ``<prefix>_<rest>`` goes to the source registered under ``<prefix>``. Importing
this module registers the source ``msgfm`` with the builders ``swinb_192``, ``swinb_192_dense``,
``tiny`` and ``swin``, so ``msgfm_swinb_192`` etc. resolve here. TerraTorch imports third-party
code through its ``custom_modules_path`` setting (or ``TERRATORCH_CUSTOM_MODULE_PATH``, or a
``custom_modules`` folder in the working directory); docs/terratorch/ holds such a folder whose
``__init__`` imports this module, and a working example config.

A builder takes TerraTorch's backbone arguments: ``model_bands`` (band names, matched against the
export's band lists: ``"B04"`` or, where names repeat across sensors, ``"s2:B04"``),
``pretrained``, ``ckpt_data`` / ``ckpt_path`` (the export folder or its model.safetensors) and
``out_indices``; it returns a module whose forward gives the NCHW stage outputs and whose
``out_channels`` lists their widths.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from terratorch.registry import BACKBONE_REGISTRY, Registry
from torch import nn

from msgfm.backbone.model import MsGFMSwin, load_backbone, pick_sensors, read_config, swin_kwargs
from msgfm.backbone.timm_models import VARIANTS, config_architecture, same_shape
from msgfm.errors import UserError

PREFIX = "msgfm"
MSGFM_BACKBONES = Registry()


class TerraTorchMsGFM(nn.Module):
    """An :class:`MsGFMSwin` whose forward returns the NCHW outputs of ``out_indices`` (TerraTorch's contract)."""

    def __init__(self, backbone: MsGFMSwin, out_indices: Sequence[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_indices = [int(i) for i in out_indices]
        info: Any = backbone.feature_info
        self.out_channels = [info[i]["num_chs"] for i in self.out_indices]
        self.patch_size = backbone.patch_embed.patch_size[0]  # type: ignore[index]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.backbone.forward_intermediates(x, indices=self.out_indices, output_fmt="NCHW",
                                                  intermediates_only=True)
        assert isinstance(out, list)
        return out


def select_bands(available: Sequence[str], model_bands: Sequence[str]) -> list[int]:
    """Index in ``available`` (``"sensor:band"``) of each requested band (``"band"`` or ``"sensor:band"``)."""
    indices = []
    for band in model_bands:
        band = str(band)
        hits = [i for i, full in enumerate(available) if full == band or full.split(":", 1)[1] == band]
        if len(hits) != 1:
            why = "is not among" if not hits else "is ambiguous in"
            raise UserError(f"backbone_model_bands: band '{band}' {why} the model's bands {list(available)}; "
                            f"name it as 'sensor:band'")
        indices.append(hits[0])
    return indices


def sensors_for(config: dict[str, Any], model_bands: Sequence[str]) -> list[str]:
    """The export's sensors that hold ``model_bands``, in the order they first appear."""
    available = [f"{s}:{b}" for s, e in config["sensors"].items() for b in e["bands"]]
    chosen: list[str] = []
    for i in select_bands(available, model_bands):
        sensor = available[i].split(":", 1)[0]
        if sensor not in chosen:
            chosen.append(sensor)
    return chosen


def build(name: str, model_bands: Sequence[str] | None = None, pretrained: bool = False,
          ckpt_data: str | Path | None = None, ckpt_path: str | Path | None = None,
          out_indices: Sequence[int] | None = None, **swin_overrides: Any) -> TerraTorchMsGFM:
    """A TerraTorch backbone of the msGFM architecture ``name`` (see :data:`VARIANTS`)."""
    source = ckpt_data or ckpt_path
    if pretrained and source is None:
        raise UserError(f"backbone msgfm_{name}: backbone_pretrained needs backbone_ckpt_data: the folder written by "
                        f"`msgfm export` (or its model.safetensors)")
    config_name = VARIANTS[f"{PREFIX}_{name}"]
    if source is not None:
        config = read_config(source)
    elif config_name is None:
        raise UserError("backbone msgfm_swin takes its architecture from an export: set backbone_ckpt_data")
    else:
        config = config_architecture(config_name)
    sensors = sensors_for(config, model_bands) if model_bands else pick_sensors(config, None)
    if source is not None and config_name is not None:
        same_shape(f"msgfm_{name}", config["architecture"], config_architecture(config_name)["architecture"],
                    str(source))
    if pretrained:
        model = load_backbone(source, sensors=sensors, **swin_overrides)  # type: ignore[arg-type]
    else:  # the architecture and bands, fresh weights
        model = MsGFMSwin(**swin_kwargs(config, sensors), **swin_overrides)
    if model_bands:
        keep = select_bands(model.bands, model_bands)
        proj: Any = model.patch_embed.proj
        with torch.no_grad():
            narrowed = nn.Conv2d(len(keep), proj.out_channels, proj.kernel_size, proj.stride)
            narrowed.weight.copy_(proj.weight[:, keep])
            narrowed.bias.copy_(proj.bias)  # type: ignore[union-attr]
        model.patch_embed.proj = narrowed
        model.bands = [model.bands[i] for i in keep]
        model.in_chans = len(keep)
    return TerraTorchMsGFM(model.train(), out_indices if out_indices is not None else range(len(model.layers)))


@MSGFM_BACKBONES.register
def swinb_192(**kwargs: Any) -> TerraTorchMsGFM:
    """MsGFM Swin-B/192 with MoE."""
    return build("swinb_192", **kwargs)


@MSGFM_BACKBONES.register
def swinb_192_dense(**kwargs: Any) -> TerraTorchMsGFM:
    """MsGFM Swin-B/192 without experts."""
    return build("swinb_192_dense", **kwargs)


@MSGFM_BACKBONES.register
def tiny(**kwargs: Any) -> TerraTorchMsGFM:
    """The tiny msGFM of the CPU demo."""
    return build("tiny", **kwargs)


@MSGFM_BACKBONES.register
def swin(**kwargs: Any) -> TerraTorchMsGFM:
    """Any exported msGFM (architecture from its config.json)."""
    return build("swin", **kwargs)


if PREFIX not in BACKBONE_REGISTRY.keys():
    BACKBONE_REGISTRY.register_source(PREFIX, MSGFM_BACKBONES)
