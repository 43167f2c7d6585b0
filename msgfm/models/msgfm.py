"""msGFM pretraining model: per-sensor embeddings f_i, one shared Swin encoder, per-sensor decoders D_i.

One forward handles one data group (Section 3 of the paper). Every sensor image of the group
is masked SimMIM-style (masked patch embeddings replaced by a learned ``mask_token``); all
masked images go through the encoder in ONE pass (concatenated along the batch, so every rank
runs the same MoE calls and fewer kernels); each sample's features are decoded by the decoder
of its *target* sensor: itself for unpaired groups (Eq. 2); for a paired group (a, b), the
partner with probability ``pretrain.cross_rate`` and itself otherwise, drawn per sample and
per source sensor (Eq. 1).

Loss (exact definition). For a target sensor t, let R_t be the (source, sample) rows decoded
into t, M the source's mask upsampled to pixels and V the target's valid-pixel mask (all True
when ``valid`` is not given). Then

    recon/t    = sum_{rows in R_t} sum_{c,y,x} |D_t(z) - x_t| * M * V  /  sum_{rows in R_t} sum_{c,y,x} M * V
    recon_loss = mean of recon/t over the targets with R_t non-empty
    loss       = recon_loss + model.moe.aux_loss_weight * aux_loss   (aux_loss: sum over MoE layers)

so each target's L1 is the mean over its masked (and valid) pixels and its channels, as in
SimMIM. The target of every row is drawn on the host (a tiny CPU tensor), so routing costs
no device sync. A decoder of the group that no row targets in a batch adds a zero term, so
all its parameters still receive a (zero) gradient on every rank.

Legend: B batch, C channels, H/W image size, h/w = H/p, W/p patch grid, D embed width,
F = num_features (final width), S sensors of the group.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from msgfm.config import RunConfig
from msgfm.data.masking import SimMIMMaskGenerator, upsample_mask
from msgfm.models.decoder import SimMIMDecoder
from msgfm.models.embed import PatchEmbed
from msgfm.models.moe import MoEMlp
from msgfm.models.swin import SwinEncoder
from msgfm.ops.norm import layer_norm_class
from msgfm.sensors import get_sensor


class MsGFM(nn.Module):
    """The pretraining model of one run config; see the module docstring for the objective."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        model_cfg = cfg.model
        self.sensors = list(cfg.sensors_in_model)
        self.groups = {g.name: list(g.sensors) for g in cfg.data.groups}
        self.img_size = model_cfg.img_size
        self.patch_size = model_cfg.patch_size
        self.cross_rate = cfg.pretrain.cross_rate
        self.aux_loss_weight = model_cfg.moe.aux_loss_weight if model_cfg.moe.enabled else 0.0
        norm_layer = layer_norm_class(cfg.kernels.layernorm)
        self.embeddings = nn.ModuleDict({
            s: PatchEmbed(get_sensor(s).num_channels, model_cfg.embed_dim, model_cfg.patch_size, norm_layer)
            for s in self.sensors})
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, model_cfg.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.encoder = SwinEncoder(model_cfg, cfg.kernels)
        self.decoders = nn.ModuleDict({
            s: SimMIMDecoder(model_cfg.num_features, get_sensor(s).num_channels, model_cfg.encoder_stride)
            for s in self.sensors})
        self.mask_generator = SimMIMMaskGenerator.from_config(cfg)

    # ------------------------------------------------------------------ timm-style backbone contract

    def embed(self, x_BCHW: torch.Tensor, sensor: str, mask_Bhw: torch.Tensor | None = None) -> torch.Tensor:
        """f_sensor(x) as tokens [B, h, w, D]; masked patches (True) become the mask token."""
        tokens_BhwD = self.embeddings[sensor](x_BCHW)
        if mask_Bhw is None:
            return tokens_BhwD
        # where, not a blend: a masked patch's embedding (and so its pixels) never reaches the encoder.
        return torch.where(mask_Bhw.unsqueeze(-1), self.mask_token.to(tokens_BhwD.dtype), tokens_BhwD)

    def forward_features(self, x_BCHW: torch.Tensor, sensor: str) -> torch.Tensor:
        """Final normalized features [B, H/32, W/32, F] (NHWC), as timm's Swin ``forward_features``."""
        self._check_image(x_BCHW, sensor, f"x ({sensor})", exact_size=False)
        return self.encoder(self.embed(x_BCHW, sensor))

    def forward_stages(self, x_BCHW: torch.Tensor, sensor: str, norm_last: bool = True) -> list[torch.Tensor]:
        """The 4 stage outputs as NCHW [B, D*2^i, H/(4*2^i), W/(4*2^i)] (for UPerNet-style heads).

        The last one goes through the final norm when ``norm_last`` (timm's ``forward_intermediates(norm=True)``).
        """
        self._check_image(x_BCHW, sensor, f"x ({sensor})", exact_size=False)
        final_BhwF, stages = self.encoder.forward_stages(self.embed(x_BCHW, sensor))
        if norm_last:
            stages[-1] = final_BhwF
        return [s.permute(0, 3, 1, 2).contiguous() for s in stages]

    def no_weight_decay(self) -> set[str]:
        """Full parameter names exempt from weight decay: norm weights, biases, bias tables, mask token."""
        return {name for name, p in self.named_parameters()
                if p.ndim <= 1 or name.endswith("relative_position_bias_table") or name == "mask_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def moe_layers(self) -> dict[str, MoEMlp]:
        """Every MoE layer by full module name (its ``.moe`` is the ``deepspeed.moe.layer.MoE``)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, MoEMlp)}

    def expert_load(self) -> dict[str, dict[str, Any]]:
        """Per MoE layer, the load of the last forward on this rank (see :meth:`MoEMlp.load`; syncs)."""
        return {name: layer.load() for name, layer in self.moe_layers().items()}

    # ------------------------------------------------------------------ pretraining forward

    def forward(self, batch: dict[str, torch.Tensor], group: str, masks: dict[str, torch.Tensor] | None = None,
                valid: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """One group's SimMIM / cross-sensor reconstruction loss.

        Args:
            batch: sensor -> float [B, C, H, W]; exactly the group's sensors, sharing B, H, W.
            group: a ``data.groups`` name.
            masks: sensor -> bool [B, H/p, W/p] (True = masked); None: drawn with ``masking.*``.
            valid: sensor -> bool [B, C or 1, H, W], False where the target has no data; optional per sensor.

        Returns a dict: ``loss`` (backpropagate this), ``recon_loss``, ``aux_loss``; detached
        ``recon/{sensor}`` for every target decoded into in this batch (absent otherwise);
        ``recon_self`` / ``recon_cross`` (pixel means over rows decoded into their own / the partner
        sensor; None when the batch has no such row); host ints ``count/{sensor}``, ``count_self``,
        ``count_cross`` (rows per case); and for figures, all detached: ``masks`` {sensor: [B, h, w]},
        ``target_sensor`` {source: list of B target names}, ``predictions`` / ``targets`` /
        ``sample_index`` {source: {target: [n, C_t, H, W] / [n, C_t, H, W] / [n] (host)}}. ``masks`` and
        ``valid`` may live on the host; they are moved to the batch's device.
        """
        sensors = self._check_inputs(batch, group, masks, valid)
        B = batch[sensors[0]].shape[0]
        device = batch[sensors[0]].device
        if masks is None:
            masks = self.mask_generator.for_sensors(sensors, B, device=device)
        else:  # masks from data-loader workers may still be on the host
            masks = {s: masks[s].to(device, non_blocking=True) for s in sensors}
        if valid is not None:
            valid = {s: v.to(device, non_blocking=True) for s, v in valid.items()}

        tokens_BhwD = torch.cat([self.embed(batch[s], s, masks[s]) for s in sensors])  # [S*B, h, w, D]
        features_BhwF = self.encoder(tokens_BhwD)
        aux_loss = self.encoder.aux_loss()
        if aux_loss is None:
            aux_loss = features_BhwF.new_zeros(())
        masks_Bhw = torch.cat([masks[s] for s in sensors])  # row r = source_index * B + sample

        target_index = self._choose_targets(len(sensors), B)  # [S, B] host tensor, index into sensors

        def to_device(index: torch.Tensor) -> torch.Tensor:
            # Host index tensors: an async copy from pageable memory is staged at once, with no wait
            # for the device's queue (a blocking copy would synchronize the stream).
            return index.to(device, non_blocking=True)

        out: dict[str, Any] = {"masks": {s: masks[s].detach() for s in sensors},
                               "target_sensor": {s: [sensors[t] for t in target_index[i].tolist()]
                                                 for i, s in enumerate(sensors)},
                               "predictions": {s: {} for s in sensors}, "targets": {s: {} for s in sensors},
                               "sample_index": {s: {} for s in sensors}}
        target_losses, unused = [], []
        row_num, row_den, row_cross = [], [], []
        for t_idx, target in enumerate(sensors):
            source_idx, sample_idx = torch.nonzero(target_index == t_idx, as_tuple=True)  # host, no sync
            out[f"count/{target}"] = len(sample_idx)
            if not len(sample_idx):
                # No row decodes into this target: a zero term still gives D_target's parameters a
                # (zero) gradient, so every rank reduces the same set of gradients.
                unused.append(sum(p.sum() for p in self.decoders[target].parameters()) * 0.0)
                continue
            rows = source_idx * B + sample_idx
            pred_nCHW, target_nCHW, num_n, den_n = self._reconstruct(
                features_BhwF, masks_Bhw, batch, valid, target, to_device(rows), to_device(sample_idx))
            loss_t = num_n.sum() / den_n.sum().clamp(min=1.0)
            target_losses.append(loss_t)
            out[f"recon/{target}"] = loss_t.detach()
            row_num.append(num_n.detach())
            row_den.append(den_n.detach())
            row_cross.append(source_idx != t_idx)
            for s_idx, source in enumerate(sensors):  # figure material, split by source sensor
                pick = torch.nonzero(source_idx == s_idx).flatten()
                if len(pick):
                    pick_dev = to_device(pick)
                    out["predictions"][source][target] = pred_nCHW.detach().index_select(0, pick_dev)
                    out["targets"][source][target] = target_nCHW.detach().index_select(0, pick_dev)
                    out["sample_index"][source][target] = sample_idx[pick]

        recon_loss = torch.stack(target_losses).mean() + sum(unused)
        num, den, cross = torch.cat(row_num), torch.cat(row_den), torch.cat(row_cross)  # cross: host bools
        for case, chosen in (("self", ~cross), ("cross", cross)):
            picked = to_device(torch.nonzero(chosen).flatten())
            n_rows = int(chosen.sum())
            out[f"count_{case}"] = n_rows
            out[f"recon_{case}"] = (num.index_select(0, picked).sum() / den.index_select(0, picked).sum().clamp(
                min=1.0)) if n_rows else None
        out.update(loss=recon_loss + self.aux_loss_weight * aux_loss, recon_loss=recon_loss,
                   aux_loss=aux_loss)
        return out

    def _reconstruct(self, features_BhwF: torch.Tensor, masks_Bhw: torch.Tensor, batch: dict[str, torch.Tensor],
                     valid: dict[str, torch.Tensor] | None, target: str, rows: torch.Tensor,
                     samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode feature ``rows`` with D_target; per-row masked L1 sum and weight (pixels x channels)."""
        pred_nCHW = self.decoders[target](features_BhwF.index_select(0, rows))
        target_nCHW = batch[target].index_select(0, samples)
        weight_nCHW = upsample_mask(masks_Bhw.index_select(0, rows), self.patch_size)  # the SOURCE's mask
        if valid is not None and target in valid:
            weight_nCHW = weight_nCHW & valid[target].index_select(0, samples)
        # fp32 sums: a 16-bit sum over millions of pixels overflows (fp16) or loses digits (bf16).
        weight_nCHW = weight_nCHW.float().expand_as(pred_nCHW)
        num_n = ((pred_nCHW.float() - target_nCHW.float()).abs() * weight_nCHW).flatten(1).sum(1)
        return pred_nCHW, target_nCHW, num_n, weight_nCHW.flatten(1).sum(1)

    def _choose_targets(self, num_sensors: int, batch_size: int) -> torch.Tensor:
        """[S, B] target sensor index per (source, sample): the partner with prob. cross_rate (pairs only)."""
        own_SB = torch.arange(num_sensors).unsqueeze(1).expand(num_sensors, batch_size)
        if num_sensors == 1:
            return own_SB.clone()
        cross_SB = torch.rand(num_sensors, batch_size) < self.cross_rate
        return torch.where(cross_SB, 1 - own_SB, own_SB)

    # ------------------------------------------------------------------ input checks

    def _check_image(self, x: Any, sensor: str, where: str, exact_size: bool) -> None:
        if sensor not in self.embeddings:
            raise ValueError(f"{where}: sensor '{sensor}' has no embedding in this model; model sensors: "
                             f"{self.sensors} (model.sensors / the data groups' sensors)")
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{where}: expected a float tensor [B, C, H, W], got {shape}")
        spec = get_sensor(sensor)
        if x.shape[1] != spec.num_channels:
            raise ValueError(f"{where}: sensor '{sensor}' has {spec.num_channels} bands ({', '.join(spec.bands)}), "
                             f"got {x.shape[1]} channels (shape {list(x.shape)})")
        H, W = x.shape[-2:]
        if exact_size and (H, W) != (self.img_size, self.img_size):
            raise ValueError(f"{where}: image size {H}x{W} does not match model.img_size={self.img_size}; "
                             f"crop/resize the input or change model.img_size")
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"{where}: image size {H}x{W} is not a multiple of model.patch_size={self.patch_size}")
        self.encoder.check_grid(H // self.patch_size, W // self.patch_size)

    def _check_inputs(self, batch: Any, group: str, masks: Any, valid: Any) -> list[str]:
        if group not in self.groups:
            raise ValueError(f"unknown data group '{group}'; this model's groups (data.groups): {list(self.groups)}")
        sensors = self.groups[group]
        if not isinstance(batch, dict):
            raise ValueError(f"batch must map sensor name to a tensor, got {type(batch).__name__}")
        missing = [s for s in sensors if s not in batch]
        extra = [s for s in batch if s not in sensors]
        if missing or extra:
            raise ValueError(f"group '{group}' takes sensors {sensors}; batch has {list(batch)}"
                             + (f" (missing {missing})" if missing else "") + (f" (not in the group: {extra})"
                                                                               if extra else ""))
        for s in sensors:
            self._check_image(batch[s], s, f"batch['{s}']", exact_size=True)
        first = sensors[0]
        for s in sensors[1:]:
            if batch[s].shape[0] != batch[first].shape[0] or batch[s].shape[-2:] != batch[first].shape[-2:]:
                raise ValueError(f"paired group '{group}': sensors must share batch size and image size, got "
                                 f"'{first}' {list(batch[first].shape)} and '{s}' {list(batch[s].shape)}")
        B, H, W = batch[first].shape[0], *batch[first].shape[-2:]
        grid = [B, H // self.patch_size, W // self.patch_size]
        if masks is not None:
            for s in sensors:
                m = masks.get(s) if isinstance(masks, dict) else None
                if m is None or m.dtype != torch.bool or list(m.shape) != grid:
                    got = "missing" if m is None else f"{m.dtype} {list(m.shape)}"
                    raise ValueError(f"masks['{s}']: expected a bool tensor {grid} (True = masked), got {got}")
        if valid is not None:
            for s, v in valid.items():
                if s not in sensors:
                    raise ValueError(f"valid['{s}']: sensor '{s}' is not in group '{group}' ({sensors})")
                C = batch[s].shape[1]
                if v.dtype != torch.bool or v.ndim != 4 or v.shape[1] not in (1, C) or \
                        [v.shape[0], *v.shape[2:]] != [B, H, W]:
                    raise ValueError(f"valid['{s}']: expected a bool tensor [{B}, 1 or {C}, {H}, {W}], "
                                     f"got {v.dtype} {list(v.shape)}")
        return sensors


def build_pretrain_model(cfg: RunConfig) -> MsGFM:
    """The msGFM pretraining model of a run config (CPU, float32; no process group needed)."""
    if not isinstance(cfg, RunConfig):
        raise ValueError(f"build_pretrain_model takes a RunConfig (msgfm.config.load_config), got "
                         f"{type(cfg).__name__}")
    return MsGFM(cfg)
