"""From a pretraining checkpoint to a fine-tuning encoder (the paper's Appendix C.2).

The pretrained msGFM has one patch embedding f_i per sensor and one shared Swin
encoder. A downstream task feeds it one or more sensors:

- method 2 (``stack``, the default): the task's sensors are concatenated along
  channels and go through one encoder with one patch embedding. That embedding
  starts from the pretrained per-sensor ones, concatenated along input channels
  and scaled by 1 / (number of sensors): the embedding of a stacked input is
  then the *mean* of what each pretrained f_i makes of its own bands, which is
  the scale the encoder saw in pretraining (a plain sum would be n times larger
  before the norm, and the norm's bias would no longer match). The norm after
  the projection is the mean of the sensors' norms. A sensor of the task that
  the checkpoint has no embedding for starts from random weights for its channels,
  with a warning.
- method 1 (``separate``): every sensor keeps its own pretrained embedding and goes
  through the shared encoder on its own; the heads see the features of all
  sensors concatenated along channels.

Nothing is masked at transfer. The encoder is built from the checkpoint's own
model config (so a checkpoint always meets an encoder of its architecture);
only what fine-tuning may change is taken from the task config: image size,
window size (relative position bias tables are interpolated bicubically),
drop path, and the MoE expert-parallel size (fine-tuning keeps every expert on
every rank: ``expert_parallel_size=1``).

Legend: D embedding width, C_i channels of sensor i, p patch size, T = (2w-1)^2
bias table rows for window w, nH heads.
"""
from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from msgfm.errors import UserError

log = logging.getLogger(__name__)

ENCODER_PREFIX = "encoder."
# Per-sensor patch embeddings in a pretraining state dict: "embeddings.<sensor>.proj.weight" (MsGFM).
_SENSOR_EMBED = re.compile(r"^(?:.*\.)?(?:embeddings|embeds|patch_embeds)\.(?P<sensor>\w+)\."
                           r"(?P<param>proj\.weight|proj\.bias|norm\.weight|norm\.bias)$")
BIAS_TABLE = "relative_position_bias_table"


class TransferError(UserError):
    """A checkpoint that cannot initialise the requested fine-tuning model; the message says why."""


@dataclass
class TransferReport:
    """What :func:`load_pretrained` did, for the log and MLflow."""

    loaded: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint (stay initialised)
    unused: list[str] = field(default_factory=list)  # in the checkpoint, not needed (decoders, mask token...)
    embeddings_from: dict[str, str] = field(default_factory=dict)  # task sensor -> "pretrained" / "random"

    def summary(self) -> str:
        lines = [f"transfer: {len(self.loaded)} tensors loaded ({len(self.interpolated)} interpolated), "
                 f"{len(self.missing)} new, {len(self.unused)} unused",
                 f"  sensor embeddings: {self.embeddings_from}"]
        if self.missing:
            lines.append(f"  new (not in the checkpoint): {_short(self.missing)}")
        if self.unused:
            lines.append(f"  unused checkpoint keys: {_short(self.unused)}")
        return "\n".join(lines)


def _short(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def interpolate_bias_table(table_TH: torch.Tensor, window_size: int) -> torch.Tensor:
    """Resample a [(2w-1)^2, nH] relative position bias table to another window (bicubic, in torch)."""
    rows, heads = table_TH.shape
    side = int(round(rows**0.5))
    if side * side != rows:
        raise TransferError(f"relative position bias table with {rows} rows is not square ((2w-1)^2)")
    new_side = 2 * window_size - 1
    if new_side == side:
        return table_TH
    grid_1HSS = table_TH.T.reshape(1, heads, side, side).float()
    resized = F.interpolate(grid_1HSS, size=(new_side, new_side), mode="bicubic", align_corners=True)
    return resized.reshape(heads, new_side * new_side).T.contiguous().to(table_TH.dtype)


def embedding_sensor(key: str) -> str | None:
    """The sensor of a per-sensor patch embedding key (``embeddings.s2.proj.weight`` -> ``s2``), else None."""
    match = _SENSOR_EMBED.match(key)
    return match["sensor"] if match else None


def sensor_embeddings(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Per-sensor patch embedding tensors of a pretraining state dict: sensor -> {proj.weight, ...}."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if match := _SENSOR_EMBED.match(key):
            found.setdefault(match["sensor"], {})[match["param"]] = value
    return found


def stack_embeddings(pretrained: Mapping[str, Mapping[str, torch.Tensor]], sensors: Sequence[str],
                     channels: Mapping[str, int], target: Mapping[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Method 2: one embedding for the channel-stacked ``sensors`` from their pretrained embeddings.

    ``target`` is the freshly initialised stacked embedding (``proj.weight`` [D, sum C_i, p, p],
    ``proj.bias``, ``norm.weight``, ``norm.bias``); its slices stay random for sensors without a
    pretrained embedding. Returns the new tensors and where each sensor's came from.
    """
    out = {k: v.detach().clone() for k, v in target.items()}
    scale = 1.0 / len(sensors)
    origin: dict[str, str] = {}
    have = [s for s in sensors if s in pretrained]
    start = 0
    for sensor in sensors:
        width = channels[sensor]
        if sensor in pretrained:
            weight = pretrained[sensor]["proj.weight"]
            expected = (out["proj.weight"].shape[0], width, *out["proj.weight"].shape[2:])
            if tuple(weight.shape) != expected:
                raise TransferError(f"pretrained embedding of sensor '{sensor}' has shape {tuple(weight.shape)}, the "
                                    f"task needs {expected} (embed dim, bands, patch): a checkpoint of another "
                                    f"architecture or a sensor with other bands")
            out["proj.weight"][:, start:start + width] = weight * scale
            origin[sensor] = "pretrained"
        else:
            origin[sensor] = "random"
        start += width
    if have:
        # bias and norm: the mean over the sensors that have them (the mean of the embeddings, see above)
        for param in ("proj.bias", "norm.weight", "norm.bias"):
            values = [pretrained[s][param] for s in have if param in pretrained[s]]
            if values:
                out[param] = torch.stack(values).mean(0).to(out[param].dtype)
    missing = [s for s, o in origin.items() if o == "random"]
    if missing:
        warnings.warn(f"the checkpoint has no patch embedding for sensor(s) {missing} (it has "
                      f"{sorted(pretrained)}); their input channels start from random weights", stacklevel=2)
    return out, origin


def adapt_encoder_state(checkpoint: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor],
                        report: TransferReport, *, prefix: str = ENCODER_PREFIX) -> dict[str, torch.Tensor]:
    """The encoder tensors of ``checkpoint`` that fit ``model_state``; bias tables interpolated.

    A checkpoint whose encoder differs from the model's in anything but the window size
    (other depths, widths, heads, MoE layout) raises :class:`TransferError` naming the keys.
    """
    ckpt = {k: v for k, v in checkpoint.items() if k.startswith(prefix)}
    model = {k: v for k, v in model_state.items() if k.startswith(prefix)}
    if not ckpt:
        raise TransferError(f"the checkpoint has no '{prefix}*' tensors (keys start with "
                            f"{sorted({k.split('.')[0] for k in checkpoint})[:8]}): not an msgfm pretraining "
                            f"checkpoint")
    absent = sorted(set(model) - set(ckpt))
    extra = sorted(set(ckpt) - set(model))
    mismatched = [k for k in sorted(set(ckpt) & set(model))
                  if ckpt[k].shape != model[k].shape and not k.endswith(BIAS_TABLE)]
    if absent or extra or mismatched:
        details = []
        if absent:
            details.append(f"missing from the checkpoint: {_short(absent, 5)}")
        if extra:
            details.append(f"in the checkpoint only: {_short(extra, 5)}")
        if mismatched:
            details.append("other shapes: " + _short([f"{k} {tuple(ckpt[k].shape)} vs {tuple(model[k].shape)}"
                                                      for k in mismatched], 5))
        raise TransferError("the checkpoint's encoder has another architecture than the fine-tuning model ("
                            + "; ".join(details) + "). Build the fine-tuning encoder from the checkpoint's "
                            "model config (msgfm does this unless model settings are overridden)")
    out = {}
    for key, value in ckpt.items():
        if value.shape != model[key].shape:  # a relative position bias table of another window
            window = (int(round(model[key].shape[0] ** 0.5)) + 1) // 2
            value = interpolate_bias_table(value, window)
            report.interpolated.append(key)
        out[key] = value
    return out
