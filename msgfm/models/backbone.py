"""The msGFM backbone: per-sensor patch embeddings f_i, a learned mask token, one shared Swin encoder.

This is the model, and only the model: pretraining and fine-tuning wrap it (msgfm/tasks), and
it follows timm's backbone contract (``forward_features``, ``forward_intermediates``,
``feature_info``, ``no_weight_decay``, ``group_matcher``, ``set_grad_checkpointing``) so generic
tools work on it. It is built from the model config, the kernel switches and its embeddings:
registered sensor names (one embedding each) or ``{name: channels}`` (fine-tuning's channel-
stacked embedding of several sensors, named ``"sar+s2"``).

Module names: ``embeddings.<name>.{proj,norm}``, ``mask_token`` (pretraining only) and
``encoder.*`` in timm SwinTransformer names (msgfm/models/swin.py); msgfm/models/adapter.py
converts between this layout, checkpoints and timm.

Legend: B batch, C channels, H/W image size, h/w = H/p, W/p patch grid, D embed width,
F = num_features (final width).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from msgfm.config import KernelsConfig, ModelConfig
from msgfm.errors import UserError
from msgfm.models.embed import PatchEmbed
from msgfm.models.moe import MoEMlp, moe_modules
from msgfm.models.swin import SwinEncoder
from msgfm.ops.norm import layer_norm_class
from msgfm.sensors import get_sensor


class MsGFMBackbone(nn.Module):
    """Embeddings + mask token + Swin encoder (see the module docstring)."""

    def __init__(self, model_cfg: ModelConfig, kernels: KernelsConfig, sensors: Sequence[str] | Mapping[str, int],
                 *, mask_token: bool = True) -> None:
        super().__init__()
        channels = dict(sensors) if isinstance(sensors, Mapping) else \
            {s: get_sensor(s).num_channels for s in sensors}
        if not channels:
            raise UserError("the backbone needs at least one sensor embedding (model.sensors / the data groups)")
        self.model_cfg = model_cfg
        self.channels = channels
        self.img_size = model_cfg.img_size
        self.patch_size = model_cfg.patch_size
        self.embed_dim = model_cfg.embed_dim
        self.num_features = model_cfg.num_features
        norm_layer = layer_norm_class(kernels.layernorm)
        # Creation order (embeddings, mask token, encoder) fixes the initial weights drawn from a seed.
        self.embeddings = nn.ModuleDict({name: PatchEmbed(c, model_cfg.embed_dim, model_cfg.patch_size, norm_layer)
                                         for name, c in channels.items()})
        self.mask_token: nn.Parameter | None
        self.register_parameter("mask_token", nn.Parameter(torch.zeros(1, 1, 1, model_cfg.embed_dim))
                                if mask_token else None)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.encoder = SwinEncoder(model_cfg, kernels)
        self.feature_info = [{"num_chs": model_cfg.embed_dim * 2**i, "reduction": model_cfg.patch_size * 2**i,
                              "module": f"encoder.layers.{i}"} for i in range(len(model_cfg.depths))]

    @property
    def sensors(self) -> list[str]:
        """The embeddings' names, in creation order."""
        return list(self.channels)

    @property
    def aux_loss_weight(self) -> float:
        """Weight of the MoE load-balancing loss in every objective (0 without experts)."""
        moe = self.model_cfg.moe
        return moe.aux_loss_weight if moe.enabled else 0.0

    # ------------------------------------------------------------------ forward

    def embed(self, x_BCHW: torch.Tensor, sensor: str, mask_Bhw: torch.Tensor | None = None) -> torch.Tensor:
        """f_sensor(x) as tokens [B, h, w, D]; masked patches (True) become the mask token."""
        tokens_BhwD = self.embeddings[sensor](x_BCHW)
        if mask_Bhw is None:
            return tokens_BhwD
        if self.mask_token is None:
            raise UserError("this backbone was built without a mask token (mask_token=False): it cannot mask")
        # where, not a blend: a masked patch's embedding (and so its pixels) never reaches the encoder.
        return torch.where(mask_Bhw.unsqueeze(-1), self.mask_token.to(tokens_BhwD.dtype), tokens_BhwD)

    def forward_features(self, x_BCHW: torch.Tensor, sensor: str | None = None) -> torch.Tensor:
        """Final normalized features [B, H/32, W/32, F] (NHWC), as timm's Swin ``forward_features``."""
        sensor = self._sensor(sensor)
        self.check_image(x_BCHW, sensor, f"x ({sensor})", exact_size=False)
        return self.encoder(self.embed(x_BCHW, sensor))

    def forward(self, x_BCHW: torch.Tensor, sensor: str | None = None) -> torch.Tensor:
        return self.forward_features(x_BCHW, sensor)

    def forward_intermediates(self, x_BCHW: torch.Tensor, sensor: str | None = None,
                              indices: int | Sequence[int] | None = None, norm: bool = False,
                              output_fmt: Literal["NCHW", "NHWC"] = "NCHW",
                              intermediates_only: bool = True) -> list[torch.Tensor] | tuple[torch.Tensor,
                                                                                            list[torch.Tensor]]:
        """Stage outputs, as timm's ``forward_intermediates``: stage i is [B, D*2^i, H/(4*2^i), W/(4*2^i)]
        (NCHW) or NHWC. ``indices``: stage numbers, or an int n for the last n stages (default all).
        ``norm``: the last stage goes through the final norm. Without ``intermediates_only`` the
        final normalized NHWC features come first: ``(features, intermediates)``."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise UserError(f"output_fmt must be 'NCHW' or 'NHWC', got '{output_fmt}'")
        stages = len(self.encoder.layers)
        if indices is None:
            wanted = list(range(stages))
        elif isinstance(indices, int):
            wanted = list(range(stages - indices, stages))
        else:
            wanted = [i % stages for i in indices]
        if any(not 0 <= i < stages for i in wanted):
            raise UserError(f"indices {indices} outside the {stages} stages")
        sensor = self._sensor(sensor)
        self.check_image(x_BCHW, sensor, f"x ({sensor})", exact_size=False)
        final_BhwF, outputs = self.encoder.forward_stages(self.embed(x_BCHW, sensor))
        if norm:
            outputs[-1] = final_BhwF
        picked = [outputs[i] for i in wanted]
        if output_fmt == "NCHW":
            picked = [s.permute(0, 3, 1, 2).contiguous() for s in picked]
        return picked if intermediates_only else (final_BhwF, picked)

    # ------------------------------------------------------------------ timm-style contract

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) exempt from weight decay: norms, biases, bias tables,
        the mask token."""
        return {name for name, p in self.named_parameters()
                if p.ndim <= 1 or name.endswith("relative_position_bias_table") or name == "mask_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise tools (timm's Swin rule, with msgfm's module names)."""
        return {"stem": r"^(?:embeddings|mask_token)",
                "blocks": r"^encoder\.layers\.(\d+)" if coarse else [
                    (r"^encoder\.layers\.(\d+)\.downsample", (0,)),
                    (r"^encoder\.layers\.(\d+)\.\w+\.(\d+)", None),
                    (r"^encoder\.norm", (99999,))]}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def moe_layers(self) -> dict[str, MoEMlp]:
        """Every MoE layer by module name (its ``.moe`` is the ``deepspeed.moe.layer.MoE``)."""
        return moe_modules(self)

    def expert_load(self) -> dict[str, dict[str, Any]]:
        """Per MoE layer, the load of the last forward on this rank (see :meth:`MoEMlp.load`; syncs)."""
        return {name: layer.load() for name, layer in self.moe_layers().items()}

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE load-balancing losses of the last forward; None without experts."""
        return self.encoder.aux_loss()

    # ------------------------------------------------------------------ input checks

    def _sensor(self, sensor: str | None) -> str:
        if sensor is not None:
            return sensor
        if len(self.channels) != 1:
            raise UserError(f"this backbone has several embeddings {self.sensors}: name the sensor of the input")
        return self.sensors[0]

    def check_image(self, x: Any, sensor: str, where: str, exact_size: bool) -> None:
        """Raise a UserError naming ``where`` unless ``x`` is a float [B, C, H, W] image this backbone takes."""
        if sensor not in self.embeddings:
            raise UserError(f"{where}: sensor '{sensor}' has no embedding in this model; model sensors: "
                            f"{self.sensors} (model.sensors / the data groups' sensors)")
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UserError(f"{where}: expected a float tensor [B, C, H, W], got {shape}")
        channels = self.channels[sensor]
        if x.shape[1] != channels:
            try:
                bands = f" ({', '.join(get_sensor(sensor).bands)})"
            except KeyError:  # a stacked embedding is not a registered sensor
                bands = ""
            raise UserError(f"{where}: sensor '{sensor}' has {channels} bands{bands}, got {x.shape[1]} channels "
                            f"(shape {list(x.shape)})")
        H, W = x.shape[-2:]
        if exact_size and (H, W) != (self.img_size, self.img_size):
            raise UserError(f"{where}: image size {H}x{W} does not match model.img_size={self.img_size}; "
                            f"crop/resize the input or change model.img_size")
        if H % self.patch_size or W % self.patch_size:
            raise UserError(f"{where}: image size {H}x{W} is not a multiple of model.patch_size={self.patch_size}")
        self.encoder.check_grid(H // self.patch_size, W // self.patch_size)
