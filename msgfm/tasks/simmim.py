"""msGFM pretraining: SimMIM masked reconstruction with cross-sensor targets (Section 3 of the paper).

One forward handles one data group. Every sensor image of the group is masked SimMIM-style
(masked patch embeddings replaced by the backbone's mask token); all masked images go through
the encoder in ONE pass (concatenated along the batch, so every rank runs the same MoE calls
and fewer kernels); each sample's features are decoded by the decoder D_t of its *target*
sensor t: itself for unpaired groups (Eq. 2); for a paired group (a, b), the partner with
probability ``pretrain.cross_rate`` and itself otherwise, drawn per sample and per source
sensor (Eq. 1).

Loss (exact definition). For a target sensor t, let R_t be the (source, sample) rows decoded
into t, M the source's mask upsampled to pixels and V the target's valid-pixel mask (all True
when ``valid`` is not given). Then

    recon/t    = sum_{rows in R_t} sum_{c,y,x} |D_t(z) - x_t| * M * V  /  sum_{rows in R_t} sum_{c,y,x} M * V
    recon_loss = mean of recon/t over the targets with R_t non-empty
    loss       = recon_loss + model.moe.aux_loss_weight * aux_loss   (aux_loss: sum over MoE layers)

so each target's L1 is the mean over its masked (and valid) pixels and its channels, as in
SimMIM. ``recon_self/t`` and ``recon_cross/t`` are the same ratio over the rows of R_t decoded
from t itself and from its partner; ``recon_self`` / ``recon_cross`` pool them over the targets.
The target of every row is drawn on the host (a tiny CPU tensor) after the encoder, so routing
costs no device sync. A decoder of the group that no row targets in a batch adds a zero term,
so all its parameters still receive a (zero) gradient on every rank.

Legend: B batch, C channels, H/W image size, h/w = H/p, W/p patch grid, D embed width,
F = num_features (final width), S sensors of the group, n rows decoded into one target.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from msgfm.config import MaskingConfig, RunConfig
from msgfm.data.device_transforms import device_batch
from msgfm.errors import UserError
from msgfm.models.backbone import MsGFMBackbone
from msgfm.sensors import get_sensor
from msgfm.tasks.base import Task, TaskOutput
from msgfm.tasks.heads import SimMIMDecoder
from msgfm.tasks.masking import SimMIMMaskGenerator, upsample_mask

# Scalar metrics of every group; the per-target ones are "<kind>/<sensor>" for these kinds.
GROUP_METRICS = ("loss", "recon_loss", "aux_loss", "recon_self", "recon_cross")
TARGET_METRICS = ("recon", "recon_self", "recon_cross")


class CrossSensorSimMIM(Task):
    """The pretraining objective around the backbone: masks, target choice, decoders D_i, loss."""

    def __init__(self, backbone: MsGFMBackbone, groups: dict[str, list[str]], masking: MaskingConfig,
                 cross_rate: float) -> None:
        super().__init__(backbone)
        model_cfg = backbone.model_cfg
        self.groups = {name: list(sensors) for name, sensors in groups.items()}
        self.cross_rate = cross_rate
        self.patch_size = model_cfg.patch_size
        self.decoders = nn.ModuleDict({
            s: SimMIMDecoder(model_cfg.num_features, channels, model_cfg.encoder_stride)
            for s, channels in backbone.channels.items()})
        self.mask_generator = SimMIMMaskGenerator.from_config(model_cfg, masking)

    # ------------------------------------------------------------------ the Task protocol

    def prepare(self, batch: dict[str, Any], group: str, device: torch.device,
                dtype: torch.dtype | None) -> dict[str, Any]:
        """A raw batch of the data pipeline (stored arrays, crop boxes, flips) normalized, cropped and flipped
        on the device (:func:`~msgfm.data.device_transforms.device_batch`): images in the engine's dtype and
        the validity masks. The masks are drawn in forward."""
        ready = device_batch(batch, device, dtype)
        return {"images": ready["images"], "valid": ready["valid"] or None}

    def metric_keys(self, group: str) -> list[str]:
        sensors = self.groups[group]
        return [*GROUP_METRICS, *(f"{kind}/{s}" for kind in TARGET_METRICS for s in sensors)]

    def forward(self, inputs: dict[str, Any], group: str, keep_outputs: bool = False) -> TaskOutput:
        """One group's loss. ``inputs``: ``images`` {sensor: float [B, C, H, W]} (exactly the group's
        sensors, sharing B, H, W), optional ``valid`` {sensor: bool [B, C or 1, H, W]} (False where the
        target has no data) and ``masks`` {sensor: bool [B, h, w]} (True = masked; drawn with
        ``masking.*`` when absent; may live on the host).

        Returns ``loss`` (backpropagate this), ``metrics`` (see the module docstring; detached),
        ``counts`` (host ints: rows decoded into each target ``<sensor>``, ``self``, ``cross``),
        ``masks`` {sensor: [B, h, w]} and ``target_sensor`` {source: list of B target names}. With
        ``keep_outputs``, also ``predictions`` / ``targets`` / ``sample_index``
        {source: {target: [n, C_t, H, W] / [n, C_t, H, W] / [n] (host)}}, detached, for figures.
        """
        batch, masks, valid = inputs["images"], inputs.get("masks"), inputs.get("valid")
        sensors = self._check_inputs(batch, group, masks, valid)
        B = batch[sensors[0]].shape[0]
        device = batch[sensors[0]].device
        if masks is None:
            masks = self.mask_generator.for_sensors(sensors, B, device=device)
        else:  # masks from data-loader workers may still be on the host
            masks = {s: masks[s].to(device, non_blocking=True) for s in sensors}
        if valid is not None:
            valid = {s: v.to(device, non_blocking=True) for s, v in valid.items()}

        backbone = self.backbone
        tokens_BhwD = torch.cat([backbone.embed(batch[s], s, masks[s]) for s in sensors])  # [S*B, h, w, D]
        features_BhwF = backbone.encoder(tokens_BhwD)
        masks_Bhw = torch.cat([masks[s] for s in sensors])  # row r = source_index * B + sample
        target_index = self._choose_targets(len(sensors), B)  # [S, B] host tensor, index into sensors

        def on_device(index: torch.Tensor) -> torch.Tensor:
            # Host index tensors: an async copy from pageable memory is staged at once, with no wait
            # for the device's queue (a blocking copy would synchronize the stream).
            return index.to(device, non_blocking=True)

        out: TaskOutput = {"masks": {s: masks[s].detach() for s in sensors},
                           "target_sensor": {s: [sensors[t] for t in target_index[i].tolist()]
                                             for i, s in enumerate(sensors)}}
        metrics: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        if keep_outputs:
            out.update(predictions={s: {} for s in sensors}, targets={s: {} for s in sensors},
                       sample_index={s: {} for s in sensors})
        target_losses, unused = [], []
        row_num, row_den, row_cross = [], [], []
        for t_idx, target in enumerate(sensors):
            source_idx, sample_idx = torch.nonzero(target_index == t_idx, as_tuple=True)  # host, no sync
            counts[target] = len(sample_idx)
            if not len(sample_idx):
                # No row decodes into this target: a zero term still gives D_target's parameters a
                # (zero) gradient, so every rank reduces the same set of gradients.
                unused.append(sum(p.sum() for p in self.decoders[target].parameters()) * 0.0)
                continue
            rows = source_idx * B + sample_idx
            pred_nCHW, target_nCHW, num_n, den_n = self._reconstruct(
                features_BhwF, masks_Bhw, batch, valid, target, on_device(rows), on_device(sample_idx))
            loss_t = num_n.sum() / den_n.sum().clamp(min=1.0)
            target_losses.append(loss_t)
            metrics[f"recon/{target}"] = loss_t.detach()
            cross_n = source_idx != t_idx  # host bools
            for case, chosen in (("self", ~cross_n), ("cross", cross_n)):
                if chosen.any():
                    metrics[f"recon_{case}/{target}"] = _ratio(num_n.detach(), den_n.detach(), on_device(
                        torch.nonzero(chosen).flatten()))
            row_num.append(num_n.detach())
            row_den.append(den_n.detach())
            row_cross.append(cross_n)
            if keep_outputs:
                for s_idx, source in enumerate(sensors):  # figure material, split by source sensor
                    pick = torch.nonzero(source_idx == s_idx).flatten()
                    if len(pick):
                        pick_dev = on_device(pick)
                        out["predictions"][source][target] = pred_nCHW.detach().index_select(0, pick_dev)
                        out["targets"][source][target] = target_nCHW.detach().index_select(0, pick_dev)
                        out["sample_index"][source][target] = sample_idx[pick]

        recon_loss = torch.stack(target_losses).mean() + sum(unused)
        num, den, cross = torch.cat(row_num), torch.cat(row_den), torch.cat(row_cross)
        for case, chosen in (("self", ~cross), ("cross", cross)):
            counts[case] = int(chosen.sum())
            if counts[case]:
                metrics[f"recon_{case}"] = _ratio(num, den, on_device(torch.nonzero(chosen).flatten()))
        loss, aux_loss = self.add_aux_loss(recon_loss)
        metrics.update(loss=loss.detach(), recon_loss=recon_loss.detach())
        if aux_loss is not None:
            metrics["aux_loss"] = aux_loss.detach()
        out.update(loss=loss, metrics=metrics, counts=counts)
        return out

    def figure_cases(self, out: TaskOutput, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        """The first sample of every (source, target) case of a ``keep_outputs`` forward, on the CPU."""
        cases = []
        for source, by_target in out.get("predictions", {}).items():
            for target, pred_nCHW in by_target.items():
                index = int(out["sample_index"][source][target][0])
                cases.append({
                    "source": source, "target": target,
                    "input_CHW": inputs["images"][source][index].detach().float().cpu(),
                    "mask_hw": out["masks"][source][index].detach().cpu(),
                    "prediction_CHW": pred_nCHW[0].detach().float().cpu(),
                    "target_CHW": out["targets"][source][target][0].detach().float().cpu(),
                })
        return cases

    # ------------------------------------------------------------------ the objective

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

    def _check_inputs(self, batch: Any, group: str, masks: Any, valid: Any) -> list[str]:
        if group not in self.groups:
            raise UserError(f"unknown data group '{group}'; this model's groups (data.groups): {list(self.groups)}")
        sensors = self.groups[group]
        if not isinstance(batch, dict):
            raise UserError(f"batch must map sensor name to a tensor, got {type(batch).__name__}")
        missing = [s for s in sensors if s not in batch]
        extra = [s for s in batch if s not in sensors]
        if missing or extra:
            raise UserError(f"group '{group}' takes sensors {sensors}; batch has {list(batch)}"
                             + (f" (missing {missing})" if missing else "") + (f" (not in the group: {extra})"
                                                                               if extra else ""))
        for s in sensors:
            self.backbone.check_image(batch[s], s, f"batch['{s}']", exact_size=True)
        first = sensors[0]
        for s in sensors[1:]:
            if batch[s].shape[0] != batch[first].shape[0] or batch[s].shape[-2:] != batch[first].shape[-2:]:
                raise UserError(f"paired group '{group}': sensors must share batch size and image size, got "
                                f"'{first}' {list(batch[first].shape)} and '{s}' {list(batch[s].shape)}")
        B, H, W = batch[first].shape[0], batch[first].shape[-2], batch[first].shape[-1]
        grid = [B, H // self.patch_size, W // self.patch_size]
        if masks is not None:
            for s in sensors:
                m = masks.get(s) if isinstance(masks, dict) else None
                if m is None or m.dtype != torch.bool or list(m.shape) != grid:
                    got = "missing" if m is None else f"{m.dtype} {list(m.shape)}"
                    raise UserError(f"masks['{s}']: expected a bool tensor {grid} (True = masked), got {got}")
        if valid is not None:
            for s, v in valid.items():
                if s not in sensors:
                    raise UserError(f"valid['{s}']: sensor '{s}' is not in group '{group}' ({sensors})")
                C = batch[s].shape[1]
                if v.dtype != torch.bool or v.ndim != 4 or v.shape[1] not in (1, C) or \
                        [v.shape[0], *v.shape[2:]] != [B, H, W]:
                    raise UserError(f"valid['{s}']: expected a bool tensor [{B}, 1 or {C}, {H}, {W}], "
                                     f"got {v.dtype} {list(v.shape)}")
        return sensors


def _ratio(num_n: torch.Tensor, den_n: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """sum(num[rows]) / sum(den[rows]): the masked L1 over those rows' pixels."""
    return num_n.index_select(0, rows).sum() / den_n.index_select(0, rows).sum().clamp(min=1.0)


def build_pretrain_task(cfg: RunConfig) -> CrossSensorSimMIM:
    """The pretraining task of a run config: a backbone for ``cfg.sensors_in_model`` and the SimMIM objective
    (CPU, float32; no process group needed)."""
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"build_pretrain_task takes a RunConfig (msgfm.config.load_config), got "
                        f"{type(cfg).__name__}")
    for sensor in cfg.sensors_in_model:
        get_sensor(sensor)  # an unregistered sensor fails here, with its name
    backbone = MsGFMBackbone(cfg.model, cfg.kernels, cfg.sensors_in_model)
    return CrossSensorSimMIM(backbone, {g.name: list(g.sensors) for g in cfg.data.groups}, cfg.masking,
                             cfg.pretrain.cross_rate)
