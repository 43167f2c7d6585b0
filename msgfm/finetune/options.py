"""Fine-tuning options the field expects: linear LR scaling, layer-wise LR decay, train fractions,
frozen encoders.

Linear LR scaling (GFM's fine-tuning convention, which msGFM follows): with
``train.lr_reference_batch`` set, every configured rate (``train.lr``,
``schedule.warmup_start_lr``, ``schedule.min_lr``) is multiplied by the global batch
(``data.batch_size_per_gpu`` x ranks) / ``lr_reference_batch``; see :func:`scaled_rates`.

Layer ids follow SimMIM / BEiT for Swin: the patch embedding is layer 0, block j
of stage i is layer ``sum(depths[:i]) + j + 1``, the patch merging that opens
stage i (timm's ``layers.i.downsample``) shares the id of the last block before
it, the final norm and everything outside the encoder (the head) is the top
layer ``sum(depths) + 1``. Parameter group ``lr_scale`` = decay ** (top - id); the
trainer multiplies each group's LR by it (msgfm.train.optim.set_lr).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from msgfm.config import FinetuneConfig, ScheduleConfig
from msgfm.errors import UserError

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.blocks\.(\d+)\.")
_DOWNSAMPLE = re.compile(r"(?:^|\.)layers\.(\d+)\.downsample\.")
_EMBED = re.compile(r"(?:^|\.)(patch_embed|embeddings|embeds?|mask_token)(\.|$)")
ENCODER_PREFIX = "backbone.encoder."  # the shared encoder's parameters in a task module


def swin_layer_id(name: str, depths: Sequence[int], encoder_prefix: str = ENCODER_PREFIX) -> int:
    """The layer-decay id of a parameter name (see the module docstring)."""
    top = sum(depths) + 1
    if _EMBED.search(name):
        return 0
    if not name.startswith(encoder_prefix):
        return top  # task head
    if match := _BLOCK.search(name):
        stage, block = int(match.group(1)), int(match.group(2))
        return sum(depths[:stage]) + block + 1
    if match := _DOWNSAMPLE.search(name):
        return sum(depths[:int(match.group(1))])
    return top  # final norm


@dataclass(frozen=True)
class ScaledRates:
    """The rates a fine-tuning run uses: the configured ones x ``factor``."""

    lr: float
    schedule: ScheduleConfig  # warmup_start_lr and min_lr scaled like lr
    factor: float  # global_batch / reference_batch, 1 without scaling
    global_batch: int
    reference_batch: int | None

    def describe(self, base_lr: float) -> str:
        s = self.schedule
        rule = (f"base {base_lr:g} x global batch {self.global_batch} / {self.reference_batch} = {self.lr:g}"
                if self.reference_batch else f"{self.lr:g} as configured (train.lr_reference_batch: null)")
        return (f"LR: {rule}; warm-up from {s.warmup_start_lr:g}"
                + (f", cosine floor {s.min_lr:g}" if s.kind == "cosine" else ""))


def scaled_rates(cfg: FinetuneConfig, world_size: int) -> ScaledRates:
    """The rates in effect for ``world_size`` ranks: each configured rate x global batch / reference batch."""
    global_batch = cfg.data.batch_size_per_gpu * world_size
    reference = cfg.train.lr_reference_batch
    factor = global_batch / reference if reference else 1.0
    schedule = dataclasses.replace(cfg.schedule, warmup_start_lr=cfg.schedule.warmup_start_lr * factor,
                                   min_lr=cfg.schedule.min_lr * factor)
    return ScaledRates(lr=cfg.train.lr * factor, schedule=schedule, factor=factor, global_batch=global_batch,
                       reference_batch=reference)


def param_groups(model: nn.Module, *, weight_decay: float, layer_decay: float, depths: Sequence[int],
                 no_weight_decay: Iterable[str] = (), encoder_prefix: str = ENCODER_PREFIX) -> list[dict]:
    """AdamW parameter groups: no decay on 1-D tensors (norms, biases) and on ``no_weight_decay`` names
    (relative position tables, mask token), and an ``lr_scale`` per layer when ``layer_decay`` < 1.

    Frozen parameters (``requires_grad=False``) are left out. MoE expert parameters are then
    moved into groups of their own, as DeepSpeed's ZeRO needs (see msgfm/train/optim.py).
    """
    if not 0 < layer_decay <= 1:
        raise UserError(f"layer_decay must be in (0, 1], got {layer_decay}")
    skip = set(no_weight_decay)
    top = sum(depths) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or any(s in name for s in skip))
        layer = swin_layer_id(name, depths, encoder_prefix) if layer_decay < 1 else top
        group = groups.setdefault((layer, decay), {
            "name": f"layer{layer}_{'decay' if decay else 'no_decay'}", "params": [],
            "weight_decay": weight_decay if decay else 0.0, "lr_scale": layer_decay ** (top - layer),
            "layer_id": layer})
        group["params"].append(param)
    ordered = [groups[key] for key in sorted(groups)]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(ordered) if g["params"]]


def freeze(module: nn.Module) -> int:
    """Stop gradients into ``module`` (linear probing); returns the number of parameters frozen."""
    count = 0
    for param in module.parameters():
        param.requires_grad_(False)
        count += param.numel()
    return count


def select_train_fraction(ids: Sequence[str], fraction: float, seed: int, path: str | Path) -> list[str]:
    """Draw ``fraction`` of ``ids`` with a fixed seed and save them to ``path`` (one id per line).

    If ``path`` exists it is read back instead (so a resumed or repeated run trains on
    the same subset), after checking that it was drawn with the same fraction and seed
    and that every id it lists is in ``ids``. The draw is a seeded permutation of the
    ids in the order given, so it depends only on the dataset and the seed.
    """
    if not 0 < fraction <= 1:
        raise UserError(f"train fraction must be in (0, 1], got {fraction}")
    if not ids:
        raise UserError("select_train_fraction: the training set is empty")
    path = Path(path)
    header = f"# msgfm train subset: fraction={fraction} seed={seed} of {len(ids)} ids"
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()
        if not lines or lines[0] != header:
            raise UserError(f"{path} was drawn with other settings ('{lines[0] if lines else ''}', now "
                            f"'{header}'); delete it or use another output folder")
        chosen = lines[1:]
        unknown = sorted(set(chosen) - set(ids))
        if unknown:
            raise UserError(f"{path} lists ids not in the training set, e.g. {unknown[:3]}; delete the file")
        return chosen
    count = max(1, int(math.floor(fraction * len(ids) + 0.5)))
    order = np.random.default_rng(seed).permutation(len(ids))[:count]
    chosen = [ids[i] for i in sorted(order)]
    path.parent.mkdir(parents=True, exist_ok=True)
    # every rank draws the same ids and writes them; a temporary name of its own per writer (not the pid:
    # ranks of two nodes on a shared filesystem may have the same pid and would move each other's file)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join([header, *chosen]) + "\n")
    os.replace(tmp_name, path)
    return chosen

