"""The device side of the data pipeline against a training step, for ``msgfm.bench.data``.

For every data group of a run config (the paper's: rgb 128, sen12ms 32 SAR + S2, mdas 12
DSM + RGB per GPU, 192 px) it builds one raw batch of synthetic samples in the sensors'
stored dtypes (those of msgfm.bench.data, stored at the model size; crop boxes and flips
drawn as in training), pinned on a GPU as the DataLoader pins it, and times
on one device:

* ``device_batch`` (host-to-device copy of the stored bytes, normalization, validity masks,
  crop, resize, flips; output in the training dtype), median of ``repeats`` calls;
* a forward + backward of the config's model, dense (MoE off: the Swin-B/192 compute of a
  step, without expert communication), under autocast in bf16 (fp16 where the GPU has no
  bf16) on a GPU, float32 on the CPU; masks drawn as in training.

The share is augmentation / (augmentation + forward + backward), per group and for the
whole step; the optimizer step is left out, so the share is an upper bound. Device memory
after repeated calls shows whether ``device_batch`` holds on to anything.

Legend: B batch, C channels, S side.
"""
from __future__ import annotations

import functools
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import torch

from msgfm.bench.data import synthetic_samples
from msgfm.config import RunConfig, load_config
from msgfm.data.device_transforms import collate_raw, device_batch
from msgfm.data.transforms import SampleTransform, SensorNormalizer
from msgfm.tasks import CrossSensorSimMIM, build_pretrain_task


@dataclass(kw_only=True)
class GroupCost:
    """Median milliseconds of one group's batch on the device."""

    group: str
    sensors: list[str]
    batch_size: int
    augment_ms: float
    step_ms: float | None  # forward + backward; None when not measured


def synthetic_batch(sensors: list[str], batch_size: int, size: int, transform: SampleTransform,
                    rng: np.random.Generator) -> dict[str, Any]:
    """A raw batch as the DataLoader yields it: stored arrays [C,S,S], boxes drawn per sample."""
    arrays = {sensor: synthetic_samples(sensor, batch_size, size, rng) for sensor in sensors}
    normalizers = {s: SensorNormalizer.from_stats(a.mean(axis=(0, 2, 3)), a.std(axis=(0, 2, 3)))
                   for s, a in arrays.items()}
    samples = []
    for i in range(batch_size):
        raw = {s: a[i] for s, a in arrays.items()}
        samples.append({"raw": raw, "box": transform.draw(raw, random.Random(i)), "normalizers": normalizers,
                        "size": size, "id": str(i)})
    return collate_raw(samples)


def _median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def training_dtype(device: torch.device) -> torch.dtype | None:
    """What the trainer feeds the model: bf16 where the GPU has it, else fp16; float32 on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def measure(cfg: RunConfig, device: torch.device, *, model_step: bool, repeats: int, seed: int = 0
            ) -> tuple[list[GroupCost], list[float]]:
    """Per group of ``cfg``: device_batch and (optionally) forward + backward; and the device
    memory (MiB) allocated after each of several rounds of device_batch calls."""
    dtype = training_dtype(device)
    aug = cfg.data.augment
    transform = SampleTransform(img_size=cfg.model.img_size, train=True,
                                crop_scale=(aug.crop_scale[0], aug.crop_scale[1]),
                                crop_ratio=(aug.crop_ratio[0], aug.crop_ratio[1]), hflip=aug.hflip, vflip=aug.vflip)
    rng = np.random.default_rng(seed)
    model = None
    if model_step:
        model = build_pretrain_task(cfg).to(device).train()
    batches = {}
    for group in cfg.data.groups:
        if group.batch_size_per_gpu == "auto":
            raise ValueError(f"config group '{group.name}': batch_size_per_gpu is 'auto'; this benchmark needs "
                             f"fixed batch sizes (pass a config that sets them)")
        batch = synthetic_batch(list(group.sensors), int(group.batch_size_per_gpu), cfg.model.img_size, transform,
                                rng)
        if device.type == "cuda":  # as the DataLoader hands it over with pin_memory=True
            batch["sensors"] = {s: r.pin_memory() for s, r in batch["sensors"].items()}
        batches[group.name] = (group, batch)
    costs = []
    for name, (group, raw) in batches.items():
        augment_ms = _median_ms(functools.partial(device_batch, raw, device, dtype), device, repeats)
        step_ms = None
        if model is not None:
            step_ms = _median_ms(functools.partial(_forward_backward, model, raw, name, device, dtype), device,
                                 repeats)
        costs.append(GroupCost(group=name, sensors=list(group.sensors), batch_size=int(group.batch_size_per_gpu),
                               augment_ms=augment_ms, step_ms=step_ms))
    memory = []
    for _ in range(3):
        for _, raw in batches.values():
            for _ in range(repeats):
                device_batch(raw, device, dtype)
        memory.append(_allocated_mib(device))
    return costs, memory


def _forward_backward(model: CrossSensorSimMIM, raw: dict[str, Any], group: str, device: torch.device,
                      dtype: torch.dtype | None) -> None:
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(model.prepare(raw, group, device, dtype), group)
    out["loss"].backward()
    model.zero_grad(set_to_none=True)


def _allocated_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


def report(config: str, device: torch.device, *, model_step: bool, repeats: int) -> list[str]:
    """Markdown lines: the table per group and the step, and the memory line."""
    cfg = load_config(config, ["model.moe.enabled=false"])
    costs, memory = measure(cfg, device, model_step=model_step, repeats=repeats)
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{threads} thread{'s' * (threads > 1)}"
    dtype = training_dtype(device)
    lines = [f"Device side of one training step: {cfg.name} ({cfg.model.img_size} px, dense model for the step), "
             f"{device.type} ({name}), images in {dtype or torch.float32}, median of {repeats} calls, ms:", "",
             "| group | sensors | batch | device_batch | forward + backward | augmentation share |",
             "|---|---|---:|---:|---:|---:|"]
    for c in costs:
        lines.append(f"| {c.group} | {' + '.join(c.sensors)} | {c.batch_size} | {c.augment_ms:.2f} | "
                     f"{_ms(c.step_ms)} | {_share(c.augment_ms, c.step_ms)} |")
    augment = sum(c.augment_ms for c in costs)
    step = None if any(c.step_ms is None for c in costs) else sum(c.step_ms or 0.0 for c in costs)
    lines.append(f"| step | all groups | {sum(c.batch_size for c in costs)} | {augment:.2f} | {_ms(step)} | "
                 f"{_share(augment, step)} |")
    what = "allocated device memory" if device.type == "cuda" else "process RSS"
    lines += ["", f"{what} after each of 3 rounds of {repeats} device_batch calls per group: "
              + ", ".join(f"{m:.0f}" for m in memory) + " MiB"]
    return lines


def _ms(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.1f}"


def _share(augment_ms: float, step_ms: float | None) -> str:
    return "-" if step_ms is None else f"{100 * augment_ms / (augment_ms + step_ms):.2f}%"
