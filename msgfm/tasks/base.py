"""What every objective shares: the module DeepSpeed wraps is a Task around a backbone.

A task owns everything between a batch and a loss: it moves the batch to the device
(:meth:`Task.prepare`), runs the backbone and its own heads, computes its loss and the metrics
it reports, computed once (:meth:`Task.forward`). The trainer then needs four lines per batch::

    inputs = task.prepare(batch, group, device, dtype)
    out = engine(inputs, group)            # forward: out["loss"], out["metrics"]
    engine.backward(out["loss"])
    engine.step()

``out["loss"]`` is what is backpropagated: the task's objective plus the MoE load-balancing
loss times ``model.moe.aux_loss_weight`` (:meth:`Task.add_aux_loss`, the one place of that
rule). ``out["metrics"]`` maps names to detached scalars; a name a batch has no value for is
absent (a paired group's batch may decode no row into its partner). With ``keep_outputs``
the output also carries what figures are drawn from (:meth:`Task.figure_cases`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from msgfm.models.backbone import MsGFMBackbone

TaskOutput = dict[str, Any]


class Task(nn.Module):
    """An objective around a :class:`MsGFMBackbone`; subclasses define prepare, forward and metric keys."""

    def __init__(self, backbone: MsGFMBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def prepare(self, batch: dict[str, Any], group: str, device: torch.device,
                dtype: torch.dtype | None) -> dict[str, Any]:
        """The forward's inputs on ``device``; floating images in the engine's ``dtype``."""
        raise NotImplementedError

    def forward(self, inputs: dict[str, Any], group: str, keep_outputs: bool = False) -> TaskOutput:
        raise NotImplementedError

    def metric_keys(self, group: str) -> list[str]:
        """Every metric name a batch of ``group`` can report (validation reduces this fixed list)."""
        raise NotImplementedError

    def figure_cases(self, out: TaskOutput, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        """Figure material of one ``keep_outputs`` forward (none by default)."""
        return []

    def add_aux_loss(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(objective + aux_loss_weight x MoE aux loss, the aux loss); the aux loss is None without experts."""
        aux = self.backbone.aux_loss()
        if aux is None:
            return loss, None
        return loss + self.backbone.aux_loss_weight * aux, aux

    def no_weight_decay(self) -> set[str]:
        """Full parameter names exempt from weight decay: the backbone's, and every 1-D tensor of the heads."""
        names = {f"backbone.{name}" for name in self.backbone.no_weight_decay()}
        return names | {name for name, p in self.named_parameters() if p.ndim <= 1}


def to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` on ``device`` (asynchronously from pinned memory); floating tensors in ``dtype`` when given."""
    x = x.to(device, non_blocking=True)
    return x.to(dtype) if dtype is not None and x.is_floating_point() else x
