"""The reader of one data group: a map-style torch Dataset over its shards.

HDF5 handles are opened lazily, in the process that reads, and cached per process id:
a DataLoader worker forked from the main process never touches a handle the parent
opened (h5py handles must not cross a fork), and each worker keeps its files open for
the whole run instead of opening one per sample. Reads are chunk-aligned (one sample is
one chunk); uncompressed chunks are copied straight into a numpy buffer
(``read_direct_chunk``), skipping HDF5's selection machinery.

A sample is raw: ``{"raw": {sensor: [C,H,W] stored dtype}, "box": CropBox, "normalizers":
{sensor: SensorNormalizer}, "size": S, "id": str}`` (plus, from ``__getitems__``, the batch
arrays its "raw" are rows of): the crop box and flips are drawn here,
from the sample's own augmentation seed, and applied with the normalization to whole
batches on the training device (msgfm.data.device_transforms: ``collate_raw`` then
``device_batch``). A sample that cannot be read is replaced by another one of the same
rank (so batch sizes stay equal on every rank) and reported in ``"corrupt"`` as (file,
index, error); the scheduler counts these and stops the run past
``data.max_corrupt_fraction``.

Legend: B batch, C channels, H x W stored side, S output side (model.img_size), N samples
in a shard.
"""
from __future__ import annotations

import bisect
import os
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from msgfm.data.format import ShardInfo, read_shard_info
from msgfm.data.scheduler import CorruptSampleError
from msgfm.data.stats import Stats
from msgfm.data.transforms import SampleTransform, SensorNormalizer
from msgfm.errors import UserError

# Open shards per process: random access touches every shard, and a worker must stay well
# under the usual 1024 file descriptors; the least recently used file is closed beyond it.
MAX_OPEN_FILES = 256
# Replacement attempts for one corrupt sample before giving up on the batch.
MAX_REPLACEMENT_TRIES = 16
# Only the errors reading a damaged file raises; anything else is a bug and must surface.
_READ_ERRORS = (OSError, RuntimeError, ValueError, KeyError)


class ShardHandles:
    """Read-only h5py handles of a list of shards, opened lazily by the process that reads.

    h5py handles must not cross a fork: a process that finds handles opened by another
    (its parent, before a DataLoader worker forked) forgets them without closing and opens
    its own. At most ``MAX_OPEN_FILES`` stay open; the least recently used closes first
    and ``on_close(shard)`` lets the owner drop what it cached from that file.
    """

    def __init__(self, paths: Sequence[Path], *, on_close: Callable[[int], None] | None = None,
                 **h5py_kwargs: Any) -> None:
        self.paths = list(paths)
        self.on_close = on_close
        self.h5py_kwargs = h5py_kwargs
        self.pid = -1  # the process that owns ``files``
        self.files: OrderedDict[int, h5py.File] = OrderedDict()  # in order of last use

    def is_current(self) -> bool:
        return self.pid == os.getpid()

    def get(self, shard: int) -> h5py.File:
        if not self.is_current():
            self.pid, self.files = os.getpid(), OrderedDict()
        f = self.files.get(shard)
        if f is None:
            if len(self.files) >= MAX_OPEN_FILES:
                old, old_file = self.files.popitem(last=False)
                if self.on_close is not None:
                    self.on_close(old)
                old_file.close()
            f = self.files[shard] = h5py.File(self.paths[shard], "r", **self.h5py_kwargs)
        self.files.move_to_end(shard)
        return f

    def close(self) -> None:
        if self.is_current():
            for f in self.files.values():
                f.close()
        self.files = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "pid": -1, "files": OrderedDict()}



def _fast_chunk_read(ds: h5py.Dataset) -> bool:
    """Can one sample be read as one raw chunk (no filters, one sample per chunk, native order)?"""
    return (ds.chunks == (1, *ds.shape[1:]) and ds.compression is None and not ds.shuffle
            and not ds.fletcher32 and ds.scaleoffset is None and ds.dtype.isnative)


class GroupDataset(Dataset):
    """Samples of one data group from a list of shards (all holding ``sensors``).

    ``sensors`` may be a subset of what the shards hold (the single-sensor ablation reads
    only ``s2`` from SAR + S2 shards). Items are sample indices over the shards in order, or
    ``(index, augmentation_seed)`` pairs as produced by the scheduler's batch samplers.
    ``replacement_pool`` lists the indices a corrupt sample may be replaced by (this rank's
    training samples); default: all.
    """

    def __init__(self, shards: Sequence[ShardInfo | str | Path], sensors: Sequence[str], stats: Stats,
                 transform: SampleTransform, *, name: str = "",
                 replacement_pool: Sequence[int] | np.ndarray | None = None) -> None:
        infos = [s if isinstance(s, ShardInfo) else read_shard_info(s, check_data=False) for s in shards]
        if not infos:
            raise UserError(f"group '{name}': no shards")
        for info in infos:
            missing = [s for s in sensors if s not in info.sensors]
            if missing:
                raise UserError(f"{info.path}: sensors {missing} of group '{name}' are not in this shard "
                                f"(it holds {list(info.sensors)})")
        self.name = name
        self.sensors = list(sensors)
        self.paths = [info.path for info in infos]
        self.transform = transform
        self.stats = stats
        counts = [info.num_samples for info in infos]
        self._starts = np.cumsum([0] + counts)
        self._start_list = self._starts.tolist()  # bisect on a list: cheaper than numpy per sample
        self._has_ids = [info.has_ids for info in infos]
        self._sample_layout = _common_layout(infos, self.sensors)
        self.normalizers = [{s: normalizer_for(info, s, stats) for s in self.sensors} for info in infos]
        self.replacement_pool = np.asarray(replacement_pool if replacement_pool is not None
                                           else np.arange(len(self)), dtype=np.int64)
        # No chunk cache: every chunk (= sample) is read once per epoch.
        self._handles = ShardHandles(self.paths, on_close=self._forget_shard, rdcc_nbytes=0)
        self._reset_process_state()

    # ---- per-process state ----------------------------------------------------------------------

    def _reset_process_state(self) -> None:
        self._datasets: dict[tuple[int, str], tuple[h5py.Dataset, bool]] = {}
        self._ids: dict[int, np.ndarray] = {}
        self._bad: set[int] = set()  # samples that failed to read in this process

    def _forget_shard(self, shard: int) -> None:
        for sensor in self.sensors:
            self._datasets.pop((shard, sensor), None)

    def _file(self, shard: int) -> h5py.File:
        if not self._handles.is_current():  # a new (forked or spawned) process: nothing cached is ours
            self._reset_process_state()
        return self._handles.get(shard)

    def _dataset(self, shard: int, sensor: str) -> tuple[h5py.Dataset, bool]:
        f = self._file(shard)
        key = (shard, sensor)
        if key not in self._datasets:
            ds = f[sensor]
            self._datasets[key] = (ds, _fast_chunk_read(ds))
        return self._datasets[key]

    @property
    def _files(self) -> OrderedDict:
        """The open handles of this process (diagnostics and tests)."""
        return self._handles.files

    @property
    def _pid(self) -> int:
        return self._handles.pid

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # the handles pickle empty: whoever unpickles reopens them
        state.update(_datasets={}, _ids={}, _bad=set())
        return state

    def close(self) -> None:
        """Close this process's handles (the next read reopens them)."""
        self._handles.close()
        self._reset_process_state()

    # ---- reading --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global sample index -> (shard number, index inside the shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"group '{self.name}': sample {index} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self._start_list, index) - 1
        return shard, index - self._start_list[shard]

    def read_raw(self, index: int, out: dict[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], str]:
        """The stored arrays (sensor -> [C,H,W] native dtype) and id of one sample, read into
        ``out`` (sensor -> a C-contiguous [C,H,W] array of the stored shape and dtype) if given."""
        shard, local = self.locate(index)
        raw = {}
        for sensor in self.sensors:
            ds, fast = self._dataset(shard, sensor)
            dest = out[sensor] if out is not None else np.empty(ds.shape[1:], dtype=ds.dtype.newbyteorder("="))
            if fast:
                _, view = ds.id.read_direct_chunk((local, 0, 0, 0), out=dest.reshape(-1).view(np.uint8))
                if view.nbytes != dest.nbytes:
                    raise OSError(f"chunk of {view.nbytes} bytes, expected {dest.nbytes}")
            else:
                ds.read_direct(dest, source_sel=np.s_[local])
            raw[sensor] = dest
        return raw, self._sample_id(shard, local)

    def _sample_id(self, shard: int, local: int) -> str:
        if not self._has_ids[shard]:
            return f"{self.paths[shard].stem}:{local}"
        if shard not in self._ids:
            self._ids[shard] = self._file(shard)["ids"].asstr()[()]
        return str(self._ids[shard][local])

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: Sequence[int | tuple[int, int]]) -> list[dict[str, Any]]:
        """Batched fetch (used by DataLoader): one sample per item, corrupt ones replaced.

        When every shard stores its sensors alike, the samples are read straight into one
        [B,C,H,W] array per sensor (``"batch_arrays"``; sample ``i`` is row ``"slot"`` = i),
        which ``collate_raw`` hands on without copying."""
        batch = None
        if self._sample_layout is not None:
            batch = {s: np.empty((len(items), *shape), dtype) for s, (shape, dtype) in self._sample_layout.items()}
        samples = []
        for slot, item in enumerate(items):
            index, aug_seed = (int(item[0]), int(item[1])) if isinstance(item, (tuple, list)) else (int(item), 0)
            out = None if batch is None else {s: rows[slot] for s, rows in batch.items()}
            sample = self._load(index, aug_seed, out)
            if batch is not None:
                sample.update(batch_arrays=batch, slot=slot)
            samples.append(sample)
        return samples

    def _load(self, index: int, aug_seed: int, out: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        rng = random.Random(aug_seed)
        corrupt: list[tuple[str, int, str]] = []
        for _ in range(MAX_REPLACEMENT_TRIES + 1):
            shard, local = self.locate(index)
            if index in self._bad:  # seen failing earlier in this process: skip without rereading
                corrupt.append((str(self.paths[shard]), local, "known corrupt (failed before)"))
            else:
                try:
                    raw, sample_id = self.read_raw(index, out)
                    break
                except _READ_ERRORS as err:
                    self._bad.add(index)
                    corrupt.append((str(self.paths[shard]), local, f"{type(err).__name__}: {err}"))
            index = self._replacement(rng)
        else:
            raise CorruptSampleError(f"group '{self.name}': {len(corrupt)} unreadable samples in a row, last "
                                     f"{corrupt[-1]}; the shards are badly damaged, convert them again")
        # the same draw, from the same stream, as the per-sample path made: a run's crops stay as they were
        box = self.transform.draw(raw, rng)
        sample: dict[str, Any] = {"raw": raw, "box": box, "normalizers": self.normalizers[shard],
                                  "size": self.transform.img_size, "id": sample_id}
        if corrupt:
            sample["corrupt"] = corrupt
        return sample

    def _replacement(self, rng: random.Random) -> int:
        """A random index of the replacement pool, avoiding the ones known to be corrupt."""
        pool = self.replacement_pool
        if not len(pool):
            raise CorruptSampleError(f"group '{self.name}': a corrupt sample and no other sample to replace it with")
        for _ in range(MAX_REPLACEMENT_TRIES):
            index = int(pool[rng.randrange(len(pool))])
            if index not in self._bad:
                return index
        return index


def _common_layout(infos: Sequence[ShardInfo], sensors: Sequence[str]
                   ) -> dict[str, tuple[tuple[int, ...], np.dtype]] | None:
    """Sensor -> (sample shape [C,H,W], dtype) when every shard stores each sensor alike, else None."""
    layouts = {tuple((s, tuple(info.sensors[s].shape[1:]), np.dtype(info.sensors[s].dtype).newbyteorder("="))
                     for s in sensors)
               for info in infos}
    if len(layouts) != 1:
        return None
    return {s: (shape, dtype) for s, shape, dtype in layouts.pop()}


def normalizer_for(info: ShardInfo, sensor: str, stats: Stats) -> SensorNormalizer:
    """The normalizer of ``sensor`` in a shard, checking the statistics are for the bands it stores."""
    spec = info.sensors[sensor]
    sensor_stats = stats.sensor(sensor)
    if sensor_stats.bands != spec.bands:
        raise UserError(f"{stats.path}: statistics of sensor '{sensor}' are for bands {list(sensor_stats.bands)}, "
                        f"{info.path} stores {list(spec.bands)}; run `msgfm stats` on these shards again")
    return SensorNormalizer.from_stats(sensor_stats.mean, sensor_stats.std, scale=spec.scale, offset=spec.offset,
                                       nodata=spec.nodata)


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Augmented samples (the per-sample host path that msgfm.bench.data compares with) -> batch
    ``{"images": {sensor: [B,C,S,S]}, "valid": {sensor: [B,C,S,S]}, "ids": [...], "corrupt": [...]}``."""
    sensors = list(samples[0]["images"])
    return {
        "images": {s: torch.stack([x["images"][s] for x in samples]) for s in sensors},
        "valid": {s: torch.stack([x["valid"][s] for x in samples]) for s in sensors},
        "ids": [x["id"] for x in samples],
        "corrupt": [rec for x in samples for rec in x.get("corrupt", ())],
    }
