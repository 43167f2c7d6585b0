"""Training metrics kept on the device between logging intervals.

Per step only tensor additions happen (no ``.item()``, so no device sync);
:meth:`IntervalMetrics.flush` moves everything to the host in one transfer
at a logging step and returns interval averages.
"""
from __future__ import annotations

import resource
import time
from collections import defaultdict

import torch

# Scalar entries of the model's output dict that are logged per group (besides "recon/<sensor>..." keys).
LOSS_KEYS = ("loss", "recon_loss", "aux_loss", "recon_self", "recon_cross")


def loss_terms(out: dict) -> dict[str, torch.Tensor]:
    """The scalar loss terms of one model output, detached."""
    terms = {}
    for key, value in out.items():
        if (key in LOSS_KEYS or key.startswith("recon/")) and isinstance(value, torch.Tensor) and value.ndim == 0:
            terms[key] = value.detach().float()
    return terms


def self_cross_terms(out: dict, valid: dict[str, torch.Tensor] | None, patch_size: int) -> dict[str, torch.Tensor]:
    """Reconstruction L1 per target sensor, split by where the rows came from:
    ``recon_self/<sensor>`` (decoded from the sensor's own masked image) and ``recon_cross/<sensor>``
    (from its partner's). Same definition as the model's ``recon/<sensor>`` (masked, valid pixels),
    computed from the detached predictions it returns: elementwise work on the decoder outputs only,
    no device sync."""
    from msgfm.data.masking import upsample_mask

    sums: dict[str, list[torch.Tensor]] = {}
    for source, by_target in out.get("predictions", {}).items():
        for target, pred_nCHW in by_target.items():
            if pred_nCHW is None or len(pred_nCHW) == 0:
                continue
            samples = out["sample_index"][source][target].to(pred_nCHW.device, non_blocking=True)
            weight_nCHW = upsample_mask(out["masks"][source].index_select(0, samples), patch_size)
            if valid is not None and target in valid:
                weight_nCHW = weight_nCHW & valid[target].index_select(0, samples)
            weight_nCHW = weight_nCHW.float().expand_as(pred_nCHW)
            diff = (pred_nCHW.float() - out["targets"][source][target].float()).abs()
            key = f"recon_{'self' if source == target else 'cross'}/{target}"
            num, den = (diff * weight_nCHW).sum(), weight_nCHW.sum()
            acc = sums.setdefault(key, [num.new_zeros(()), num.new_zeros(())])
            acc[0], acc[1] = acc[0] + num, acc[1] + den
    return {key: num / den.clamp(min=1.0) for key, (num, den) in sums.items()}


class IntervalMetrics:
    """Sums of device scalars and host counters since the last flush."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self.samples: dict[str, int] = defaultdict(int)
        self.group_time: dict[str, float] = defaultdict(float)
        self.data_wait = 0.0
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, key: str, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
            if value.ndim:
                value = value.reshape(())
        prev = self.sums.get(key)
        self.sums[key] = value if prev is None else prev + value
        self.counts[key] += 1

    def flush(self) -> dict[str, float]:
        """Interval averages (one device-to-host copy for all tensors), then reset."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        keys = list(self.sums)
        tensors = [v for v in self.sums.values() if isinstance(v, torch.Tensor)]
        host = iter(torch.stack([t.cpu() if t.device.type != "cpu" else t for t in tensors]).tolist()
                    if tensors else [])
        out: dict[str, float] = {}
        for key in keys:
            value = self.sums[key]
            total = next(host) if isinstance(value, torch.Tensor) else float(value)
            out[key] = total / self.counts[key]
        for group, n in self.samples.items():
            out[f"throughput/{group}_samples_per_s"] = n / max(self.group_time[group], 1e-9)
        out["throughput/samples_per_s"] = sum(self.samples.values()) / elapsed
        out["time/data_wait_fraction"] = self.data_wait / elapsed
        out["time/step_s"] = elapsed / max(self.steps, 1)
        out.update(device_memory())
        self.reset()
        return out


def device_memory() -> dict[str, float]:
    """Allocated and peak device memory in GiB (CUDA), or this process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return {"memory/allocated_gib": torch.cuda.memory_allocated() / 2**30,
                "memory/peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
