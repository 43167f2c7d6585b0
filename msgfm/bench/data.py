"""Reader throughput: ``python -m msgfm.bench.data``.

Writes synthetic 192 x 192 samples of each sensor (rgb uint8, s2 uint16 12 bands, sar
float32 2 bands, dsm float32 1 band; seeded random values) to HDF5 shards and, for the
comparison, the same samples as one GeoTIFF per sample and sensor. Then, in this process
with one torch thread (what one DataLoader worker does), it times in samples/s:

* the old host path, "full": reading + normalizing + augmenting (random resized crop to
  192, scale (0.67, 1), flips; :func:`msgfm.data.transforms.apply_box` per sample) +
  collating, from HDF5 (:class:`msgfm.data.dataset.GroupDataset`) and from GeoTIFF
  (``rasterio.open`` + ``read``, then the very same transform);
* reading alone ("read only"), and ``write_stats`` (``msgfm stats``) on the same shard;
* the new host path, what a worker does now: reading + drawing the crop box + stacking the
  stored arrays (:func:`msgfm.data.device_transforms.collate_raw`), and next to it the
  batched normalization and augmentation (``device_batch``) run on this CPU, per sample.

It also runs the new path for several epochs and prints the process RSS after each (there
should be no growth). ``--device cuda`` (or ``--device cpu --model-step``) adds the device
side: ``device_batch`` on one batch of every group of a run config against a forward +
backward of its model (msgfm.bench.device_augment). Prints markdown tables; nothing is
asserted.
"""
from __future__ import annotations

import argparse
import gc
import platform
import random
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import rasterio
import torch
from rasterio.transform import from_origin

from msgfm.data.dataset import GroupDataset, collate_samples
from msgfm.data.device_transforms import collate_raw, device_batch
from msgfm.data.format import SensorArraySpec, ShardWriter
from msgfm.data.stats import load_stats, write_stats
from msgfm.data.transforms import SampleTransform, apply_box
from msgfm.sensors import get_sensor

IMG_SIZE = 192
BATCH = 32
SENSORS = {"rgb": "uint8", "s2": "uint16", "sar": "float32", "dsm": "float32"}


def synthetic_samples(sensor: str, num: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """[num, C, size, size] seeded random values of ``sensor`` in its dtype of ``SENSORS``."""
    shape = (num, get_sensor(sensor).num_channels, size, size)
    if sensor == "rgb":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if sensor == "s2":
        return rng.integers(1, 10000, shape, dtype=np.uint16)
    if sensor == "sar":
        return rng.normal(-12.0, 4.0, shape).astype(np.float32)
    return rng.normal(100.0, 30.0, shape).astype(np.float32)


def write_inputs(folder: Path, num: int, compression: str | None, seed: int = 0
                 ) -> dict[str, tuple[Path, list[Path], float]]:
    """Per sensor: one HDF5 shard of ``num`` samples, ``num`` single-sample GeoTIFFs, and the
    samples/s of ``write_stats`` over the shard."""
    rng = np.random.default_rng(seed)
    out = {}
    for sensor, dtype in SENSORS.items():
        data = synthetic_samples(sensor, num, IMG_SIZE, rng)
        shard = folder / sensor / "shard0.h5"
        spec = SensorArraySpec(dtype=dtype, channels=data.shape[1], height=IMG_SIZE, width=IMG_SIZE)
        with ShardWriter(shard, sensor, {sensor: spec}, compression=compression) as writer:
            for i in range(num):
                writer.append({sensor: data[i]}, f"{sensor}_{i}")
        start = time.perf_counter()
        write_stats([shard], progress=False)
        stats_rate = num / (time.perf_counter() - start)
        tiffs = []
        for i in range(num):
            path = folder / sensor / "tif" / f"{i:05d}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            with rasterio.open(path, "w", driver="GTiff", width=IMG_SIZE, height=IMG_SIZE, count=data.shape[1],
                               dtype=dtype, crs="EPSG:32632", transform=from_origin(500000, 5000000, 10, 10)) as dst:
                dst.write(data[i])
            tiffs.append(path)
        out[sensor] = (shard, tiffs, stats_rate)
    return out


def _rate(step: Callable[[list[tuple[int, int]]], object], num: int, epochs: int, repeats: int = 1) -> float:
    """Samples per second of ``step`` over shuffled batches of (index, augmentation seed); the
    best of ``repeats`` passes of ``epochs`` epochs (on a shared machine the best is the least
    disturbed)."""
    order = np.random.default_rng(1).permutation(num)
    step([(int(i), 0) for i in order[:BATCH]])  # warm-up: opens files, first allocations
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        done = 0
        for epoch in range(epochs):
            for b in range(0, num - BATCH + 1, BATCH):
                step([(int(i), epoch * num + int(i)) for i in order[b:b + BATCH]])
                done += BATCH
        best = max(best, done / (time.perf_counter() - start))
    return best


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _host_path(dataset: GroupDataset, items: list[tuple[int, int]]) -> dict:
    """The old worker: read, then normalize and augment every sample on the host, collate."""
    samples = []
    for sample in dataset.__getitems__(items):
        images, valid = {}, {}
        for sensor, raw in sample["raw"].items():
            images[sensor], valid[sensor] = apply_box(raw, sample["normalizers"][sensor], sample["box"], IMG_SIZE)
        samples.append({"images": images, "valid": valid, "id": sample["id"]})
    return collate_samples(samples)


def _device_rate(dataset: GroupDataset, num: int, repeats: int) -> float:
    """Samples/s of ``device_batch`` on this CPU over one epoch of raw batches (collated before timing)."""
    order = np.random.default_rng(1).permutation(num)
    batches = [collate_raw(dataset.__getitems__([(int(i), int(i)) for i in order[b:b + BATCH]]))
               for b in range(0, num - BATCH + 1, BATCH)]
    device_batch(batches[0], "cpu")
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            device_batch(batch, "cpu")
        best = max(best, len(batches) * BATCH / (time.perf_counter() - start))
    return best


def bench(folder: Path, num: int, epochs: int, compression: str | None, repeats: int) -> list[str]:
    inputs = write_inputs(folder, num, compression)
    old = ["| sensor | dtype, bands | HDF5 full | GeoTIFF full | ratio | HDF5 read only | GeoTIFF read only | ratio "
           "| msgfm stats |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    new = ["| sensor | dtype, bands | HDF5 read only | old: read + augment on the host | new: read + draw + stack "
           "| new / old | device_batch on this CPU |", "|---|---|---:|---:|---:|---:|---:|"]
    rss_lines = []
    for sensor, (shard, tiffs, stats_rate) in inputs.items():
        stats = load_stats(shard.parent / "stats.json")
        transform = SampleTransform(img_size=IMG_SIZE, train=True)
        dataset = GroupDataset([shard], [sensor], stats, transform, name=sensor)
        normalizers = dataset.normalizers[0]

        def host_step(items: list[tuple[int, int]], dataset: GroupDataset = dataset) -> dict[str, Any]:
            return _host_path(dataset, items)

        def raw_step(items: list[tuple[int, int]], dataset: GroupDataset = dataset) -> dict[str, Any]:
            return collate_raw(dataset.__getitems__(items))

        def geotiff_step(items: list[tuple[int, int]], tiffs: list[Path] = tiffs, sensor: str = sensor,
                         transform: SampleTransform = transform, normalizers: Any = normalizers) -> dict[str, Any]:
            samples = []
            for index, seed in items:
                with rasterio.open(tiffs[index]) as src:
                    raw = {sensor: src.read()}
                images, valid = transform(raw, normalizers, random.Random(seed))
                samples.append({"images": images, "valid": valid, "id": str(index)})
            return collate_samples(samples)

        def hdf5_read(items: list[tuple[int, int]], dataset: GroupDataset = dataset) -> list[Any]:
            return [dataset.read_raw(index) for index, _ in items]

        def geotiff_read(items: list[tuple[int, int]], tiffs: list[Path] = tiffs) -> list[Any]:
            out = []
            for index, _ in items:
                with rasterio.open(tiffs[index]) as src:
                    out.append(src.read())
            return out

        hdf5, tif = _rate(host_step, num, epochs, repeats), _rate(geotiff_step, num, 1, repeats)
        hdf5_raw, tif_raw = _rate(hdf5_read, num, epochs, repeats), _rate(geotiff_read, num, 1, repeats)
        raw_rate, device_rate = _rate(raw_step, num, epochs, repeats), _device_rate(dataset, num, repeats)
        bands = get_sensor(sensor).num_channels
        old.append(f"| {sensor} | {SENSORS[sensor]}, {bands} | {hdf5:,.0f} | {tif:,.0f} | {hdf5 / tif:.1f}x "
                   f"| {hdf5_raw:,.0f} | {tif_raw:,.0f} | {hdf5_raw / tif_raw:.1f}x | {stats_rate:,.0f} |")
        new.append(f"| {sensor} | {SENSORS[sensor]}, {bands} | {hdf5_raw:,.0f} | {hdf5:,.0f} | {raw_rate:,.0f} "
                   f"| {raw_rate / hdf5:.1f}x | {device_rate:,.0f} |")
        if sensor == "rgb":
            gc.collect()
            rss = []
            for _ in range(epochs):  # the new path end to end: the worker's part, then the device's
                _rate(lambda items: device_batch(raw_step(items), "cpu"), num, 1)
                gc.collect()
                rss.append(_rss_mib())
            rss_lines.append(f"RSS after each of {epochs} more rgb epochs of the new path (read + draw + stack + "
                             f"device_batch on this CPU, {num} samples each): "
                             + ", ".join(f"{r:.0f}" for r in rss) + " MiB")
        dataset.close()
    return (["Old path (normalization and augmentation in the worker) against GeoTIFF, samples/s:", ""] + old
            + ["", "New path: the worker reads, draws the crop box and stacks stored arrays; normalization, crop, "
               "resize and flips run batched on the training device (here: this CPU), samples/s:", ""] + new
            + [""] + rss_lines)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return (f"{cpu}, {psutil.cpu_count()} logical cores, {mem:.0f} GiB RAM; torch {torch.__version__}; "
            f"load average {', '.join(f'{x:.1f}' for x in psutil.getloadavg())}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512, help="samples per sensor (default 512)")
    parser.add_argument("--epochs", type=int, default=3, help="timed HDF5 epochs, and RSS epochs (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes, the best is shown (default 3)")
    parser.add_argument("--compression", choices=["none", "lzf", "gzip"], default="none")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the inputs (default: a temp dir)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the device-side table (default: cuda when there is one)")
    parser.add_argument("--config", default="msgfm_swinb_192",
                        help="run config whose groups, batch sizes and model the device-side table uses")
    parser.add_argument("--model-step", action=argparse.BooleanOptionalAction, default=None,
                        help="time a forward + backward of the model too (default: on cuda only)")
    parser.add_argument("--device-repeats", type=int, default=10, help="timed calls per device measurement")
    parser.add_argument("--skip-host", action="store_true", help="only the device-side table")
    args = parser.parse_args(argv)
    if args.samples < BATCH:
        parser.error(f"--samples must be >= {BATCH}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.set_num_threads(1)  # one DataLoader worker = one core
    warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
    compression = None if args.compression == "none" else args.compression
    print(f"machine: {machine()}")
    if not args.skip_host:
        print(f"synthetic {IMG_SIZE}x{IMG_SIZE} samples, {args.samples} per sensor, HDF5 compression "
              f"{args.compression}, batches of {BATCH}, random resized crop to {IMG_SIZE} + flips, one process, "
              f"best of {args.repeats} passes\n")
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            for line in bench(Path(tmp), args.samples, args.epochs, compression, args.repeats):
                print(line)
        print()
    from msgfm.bench.device_augment import report  # it imports this module

    device = torch.device(args.device)
    model_step = args.model_step if args.model_step is not None else device.type == "cuda"
    for line in report(args.config, device, model_step=model_step, repeats=args.device_repeats):
        print(line)
    print(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in psutil.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
