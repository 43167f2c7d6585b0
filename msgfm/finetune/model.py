"""The fine-tuning model: task sensors -> patch embedding(s) -> shared Swin encoder -> task head.

``FinetuneModel(batch)`` takes ``batch[sensor]`` = normalized [B, C_s, H, W] for the
task's sensors (all on one grid) and returns logits [B, K] (multilabel), logits
[B, K, H, W] (segmentation) or the predicted image [B, C_t, H, W] (restoration,
normalized units of the target; see msgfm/finetune/tasks.py).

Legend: B batch, C_s channels of sensor s, H x W pixels, D embed width, F_i stage widths.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from msgfm.config import KernelsConfig, ModelConfig
from msgfm.finetune.heads import LinearHead, RestorationDecoder, UPerNetHead
from msgfm.models.embed import PatchEmbed
from msgfm.models.swin import SwinEncoder
from msgfm.ops.norm import layer_norm_class
from msgfm.sensors import get_sensor


class FinetuneModel(nn.Module):
    """Embedding(s) + Swin encoder + head; ``method`` is ``stack`` (paper's method 2) or ``separate`` (1)."""

    def __init__(self, model_cfg: ModelConfig, kernels: KernelsConfig, sensors: Sequence[str], method: str,
                 kind: str, *, num_outputs: int, head_channels: int = 512, head_norm: str = "bn",
                 head_dropout: float = 0.0) -> None:
        super().__init__()
        if method not in ("stack", "separate"):
            raise ValueError(f"transfer.method must be 'stack' or 'separate', got '{method}'")
        self.model_cfg = model_cfg  # the encoder as built (from the checkpoint's architecture)
        self.sensors = list(sensors)
        self.method = method
        self.kind = kind
        self.channels = {s: get_sensor(s).num_channels for s in self.sensors}
        self.encoder_depths = list(model_cfg.depths)
        # MoE load-balancing loss keeps its pretraining weight while fine-tuning (0 without experts)
        self.aux_loss_weight = model_cfg.moe.aux_loss_weight if model_cfg.moe.enabled else 0.0
        norm_layer = layer_norm_class(kernels.layernorm)
        dim, patch = model_cfg.embed_dim, model_cfg.patch_size
        if method == "stack":
            self.embed = PatchEmbed(sum(self.channels.values()), dim, patch, norm_layer)
        else:
            self.embeddings = nn.ModuleDict({s: PatchEmbed(c, dim, patch, norm_layer)
                                             for s, c in self.channels.items()})
        self.encoder = SwinEncoder(model_cfg, kernels)
        copies = 1 if method == "stack" else len(self.sensors)
        widths = [dim * 2**i * copies for i in range(len(model_cfg.depths))]
        if kind == "multilabel":
            self.head = LinearHead(widths[-1], num_outputs, head_dropout)
        else:
            # Stages 0-2 leave the encoder un-normalized (only the last has the final norm): one new
            # LayerNorm each, as Swin's dense-prediction backbones add.
            self.stage_norms = nn.ModuleList(norm_layer(dim * 2**i) for i in range(len(model_cfg.depths) - 1))
            if kind == "segmentation":
                self.head = UPerNetHead(widths, num_outputs, head_channels, dropout=head_dropout, norm=head_norm)
            elif kind == "restoration":
                self.head = RestorationDecoder(widths, sum(self.channels.values()), num_outputs)
            else:
                raise ValueError(f"task kind must be multilabel, segmentation or restoration, got '{kind}'")

    def _stages(self, tokens_BhwD: torch.Tensor) -> list[torch.Tensor]:
        final_BhwF, stages = self.encoder.forward_stages(tokens_BhwD)
        if self.kind == "multilabel":
            return [final_BhwF.permute(0, 3, 1, 2)]
        stages = [norm(s) for norm, s in zip(self.stage_norms, stages[:-1])] + [final_BhwF]
        return [s.permute(0, 3, 1, 2).contiguous() for s in stages]

    def features(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Stage features NCHW (only the last, pooled-ready, for multilabel), sensors concatenated (method 1)."""
        missing = [s for s in self.sensors if s not in batch]
        if missing:
            raise ValueError(f"the batch lacks sensor(s) {missing}; the task uses {self.sensors}")
        if self.method == "stack":
            return self._stages(self.embed(torch.cat([batch[s] for s in self.sensors], dim=1)))
        per_sensor = [self._stages(self.embeddings[s](batch[s])) for s in self.sensors]
        return [torch.cat(level, dim=1) for level in zip(*per_sensor)]

    def forward(self, batch: dict[str, torch.Tensor], base_BCHW: torch.Tensor | None = None) -> torch.Tensor:
        features = self.features(batch)
        if self.kind == "multilabel":
            return self.head(features)
        if self.kind == "segmentation":
            logits = self.head(features)
            size = batch[self.sensors[0]].shape[-2:]
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        image = torch.cat([batch[s] for s in self.sensors], dim=1)
        return self.head(features, image, base_BCHW)

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n.endswith("relative_position_bias_table")}

    def encoder_modules(self) -> list[nn.Module]:
        """What linear probing freezes: the embedding(s) and the encoder."""
        return [self.embed if self.method == "stack" else self.embeddings, self.encoder]

    def aux_loss(self) -> torch.Tensor | None:
        return self.encoder.aux_loss()
