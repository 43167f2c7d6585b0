"""Reader throughput: ``python -m msgfm.bench.data``.

Writes synthetic 192 x 192 samples of each sensor (rgb uint8, s2 uint16 12 bands, sar
float32 2 bands, dsm float32 1 band; seeded random values) to HDF5 shards and, for the
comparison, the same samples as one GeoTIFF per sample and sensor. Then, in this process
with one torch thread (what one DataLoader worker does), it times reading + normalizing +
augmenting (random resized crop to 192, scale (0.67, 1), flips) + collating batches
("full"), and reading alone ("read only"), in samples/s; the last column is the speed
of ``write_stats`` (``msgfm stats``) on the same shard:

* ``hdf5``: :class:`msgfm.data.dataset.GroupDataset` over the shards;
* ``geotiff``: ``rasterio.open`` + ``read`` of each sample's file(s), then the very same
  transform, i.e. the cost of keeping the data as GeoTIFF tiles.

It also runs the HDF5 reader for several epochs and prints the process RSS after each
(there should be no growth). Prints a markdown table; nothing is asserted.
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
from msgfm.data.format import SensorArraySpec, ShardWriter
from msgfm.data.stats import load_stats, write_stats
from msgfm.data.transforms import SampleTransform
from msgfm.sensors import get_sensor

IMG_SIZE = 192
BATCH = 32
SENSORS = {"rgb": "uint8", "s2": "uint16", "sar": "float32", "dsm": "float32"}


def _synthetic(sensor: str, num: int, rng: np.random.Generator) -> np.ndarray:
    shape = (num, get_sensor(sensor).num_channels, IMG_SIZE, IMG_SIZE)
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
        data = _synthetic(sensor, num, rng)
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


def bench(folder: Path, num: int, epochs: int, compression: str | None, repeats: int) -> list[str]:
    inputs = write_inputs(folder, num, compression)
    rows = ["| sensor | dtype, bands | HDF5 full | GeoTIFF full | ratio | HDF5 read only | GeoTIFF read only | ratio "
            "| msgfm stats |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rss_lines = []
    for sensor, (shard, tiffs, stats_rate) in inputs.items():
        stats = load_stats(shard.parent / "stats.json")
        transform = SampleTransform(img_size=IMG_SIZE, train=True)
        dataset = GroupDataset([shard], [sensor], stats, transform, name=sensor)

        def hdf5_step(items: list[tuple[int, int]], dataset: GroupDataset = dataset) -> dict[str, Any]:
            return collate_samples(dataset.__getitems__(items))

        normalizers = dataset.normalizers[0]

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

        hdf5, tif = _rate(hdf5_step, num, epochs, repeats), _rate(geotiff_step, num, 1, repeats)
        hdf5_raw, tif_raw = _rate(hdf5_read, num, epochs, repeats), _rate(geotiff_read, num, 1, repeats)
        bands = get_sensor(sensor).num_channels
        rows.append(f"| {sensor} | {SENSORS[sensor]}, {bands} | {hdf5:,.0f} | {tif:,.0f} | {hdf5 / tif:.1f}x "
                    f"| {hdf5_raw:,.0f} | {tif_raw:,.0f} | {hdf5_raw / tif_raw:.1f}x | {stats_rate:,.0f} |")
        if sensor == "rgb":
            gc.collect()
            rss = []
            for _ in range(epochs):
                _rate(hdf5_step, num, 1)
                gc.collect()
                rss.append(_rss_mib())
            rss_lines.append(f"RSS after each of {epochs} more rgb epochs ({num} samples each): "
                             + ", ".join(f"{r:.0f}" for r in rss) + " MiB")
        dataset.close()
    return rows + [""] + rss_lines


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
    return (f"{cpu}, {psutil.cpu_count()} logical cores, {mem:.0f} GiB RAM; torch {torch.__version__} "
            f"with {torch.get_num_threads()} thread; load average {', '.join(f'{x:.1f}' for x in psutil.getloadavg())}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512, help="samples per sensor (default 512)")
    parser.add_argument("--epochs", type=int, default=3, help="timed HDF5 epochs, and RSS epochs (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes, the best is shown (default 3)")
    parser.add_argument("--compression", choices=["none", "lzf", "gzip"], default="none")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the inputs (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.samples < BATCH:
        parser.error(f"--samples must be >= {BATCH}")
    torch.set_num_threads(1)  # one DataLoader worker = one core
    warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
    compression = None if args.compression == "none" else args.compression
    print(f"machine: {machine()}")
    print(f"synthetic {IMG_SIZE}x{IMG_SIZE} samples, {args.samples} per sensor, HDF5 compression {args.compression}, "
          f"batches of {BATCH}, random resized crop to {IMG_SIZE} + flips, one process, best of "
          f"{args.repeats} passes, samples/s\n")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for line in bench(Path(tmp), args.samples, args.epochs, compression, args.repeats):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
