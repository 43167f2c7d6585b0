"""The msgfm HDF5 shard format, version 2: writer, validating reader of the layout (reads v1 too).

One shard file holds N samples of one data group (see docs/data_format.md for
the layout, written so that anyone can produce shards with plain h5py)::

    /                       attrs: msgfm_format_version=2, group, sensors, source, created_by, msgfm_version
    /<sensor>               (N, C, H, W) native dtype, chunks (1, C, H, W)
                            attrs: bands, wavelengths_nm, gsd_m, [nodata], scale, offset
    /ids                    (N,) utf-8 strings
    /lat, /lon              (N,) float64, optional (NaN where unknown)
    /time                   (N,) ISO-8601 utf-8 strings, optional ("" where unknown)
    /crs, /transform        (N,) utf-8 CRS, (N, 6) float64 affine of the sample's grid, optional
                            (format v2; see msgfm/data/georef.py)
    /labels/<name>          (N, ...) optional task labels; attrs describe them
                            (multilabel: class_names; segmentation: class_names, ignore_index)

Samples of a paired group share the index: sample i of every sensor dataset is
the same place on the ground, on the same H x W grid. Physical values are
``raw * scale + offset``.

Legend: N samples, C channels (bands), H x W pixels, K classes.
"""
from __future__ import annotations

import datetime as _dt
import errno
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from msgfm import __version__ as _msgfm_version
from msgfm.data.georef import CRS_DATASET, TRANSFORM_DATASET, TRANSFORM_LENGTH, Georef, georef_arrays
from msgfm.errors import UserError
from msgfm.sensors import SensorSpec, UnknownSensorError, get_sensor

# Version 2 added the per-sample georeference (/crs, /transform); version 1 files read as before.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
VERSION_ATTR = "msgfm_format_version"
LABELS_GROUP = "labels"
# Dtypes a sensor dataset may have: what the sources deliver natively (no widening on disk).
SENSOR_DTYPES = ("uint8", "uint16", "int16", "float16", "float32")
COMPRESSIONS = (None, "lzf", "gzip")
# Datasets at the root that are not sensors.
_RESERVED_NAMES = frozenset({"ids", "lat", "lon", "time", CRS_DATASET, TRANSFORM_DATASET, LABELS_GROUP})
# How many samples a writer adds to a dataset at once; the tail is trimmed on close.
_GROW_BY = 64


class ShardError(UserError):
    """A shard that cannot be used as it is; the message names the file and what to do."""


@dataclass(frozen=True, kw_only=True)
class SensorArraySpec:
    """How one sensor is stored in a shard: dtype, array shape per sample and the raw-value conventions.

    ``channels`` must equal the number of bands of the registered sensor; band names,
    wavelengths and GSD come from the registry (``gsd_m`` may override the registry's
    value, e.g. for RGB imagery whose resolution the registry leaves open).
    """

    dtype: str
    channels: int
    height: int
    width: int
    nodata: float | None = None
    scale: float = 1.0
    offset: float = 0.0
    gsd_m: float | None = None

    def __post_init__(self) -> None:
        if np.dtype(self.dtype).name not in SENSOR_DTYPES:
            raise UserError(f"sensor dtype '{self.dtype}' is not supported; use one of {list(SENSOR_DTYPES)}")
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        for key in ("channels", "height", "width"):
            if int(getattr(self, key)) <= 0:
                raise UserError(f"SensorArraySpec.{key} must be > 0, got {getattr(self, key)}")
        if self.scale == 0:
            raise UserError("SensorArraySpec.scale must not be 0 (physical = raw * scale + offset)")

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass(frozen=True, kw_only=True)
class LabelSpec:
    """A per-sample label array stored as ``labels/<name>``, shape (N, *shape).

    ``attrs`` travel as HDF5 attributes (e.g. class_names, ignore_index). Use
    :func:`multilabel_spec` and :func:`segmentation_spec` for the two standard kinds;
    downstream tasks may declare their own (a regression target, a mask of another size).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise UserError(f"label name '{self.name}' must be non-empty and contain no '/'")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)


def multilabel_spec(class_names: Sequence[str]) -> LabelSpec:
    """labels/multilabel: (N, K) uint8 0/1 vectors, attr class_names."""
    return LabelSpec(name="multilabel", shape=(len(class_names),), dtype="uint8",
                     attrs={"class_names": list(class_names)})


def segmentation_spec(class_names: Sequence[str], height: int, width: int, ignore_index: int = 255) -> LabelSpec:
    """labels/segmentation: (N, H, W) uint8 class indices, attrs class_names and ignore_index."""
    if len(class_names) > 255:
        raise UserError(f"segmentation labels are uint8: at most 255 classes, got {len(class_names)}")
    return LabelSpec(name="segmentation", shape=(height, width), dtype="uint8",
                     attrs={"class_names": list(class_names), "ignore_index": int(ignore_index)})


def _registry_spec(sensor: str, where: str) -> SensorSpec:
    try:
        return get_sensor(sensor)
    except UnknownSensorError as err:
        raise ShardError(f"{where}: {err}") from None


def _partial_path(path: Path) -> Path:
    # Hidden and without the .h5 suffix, so that shard globs never pick up an unfinished file.
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


_PARTIAL = re.compile(r"\..+\.partial-(\d+)")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_own_partials(folder: Path) -> list[Path]:
    """Remove the unfinished shard files of this process in ``folder`` (a writer renames its file when it
    closes, so any left is unfinished): the cleanup after an interruption, which may come between a
    writer's creation and the moment its caller holds it."""
    removed = []
    for path in folder.glob(f".*.partial-{os.getpid()}"):
        if _PARTIAL.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the hidden ``.<shard>.partial-<pid>`` files that writers killed before closing left in
    ``folder`` (their process is gone); files of a writer still running are left alone. The process
    ids are this machine's: folders written by several machines at once must not share shard names."""
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = _PARTIAL.fullmatch(path.name)
        if match and path.is_file() and not _process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class ShardWriter:
    """Writes one shard; use as a context manager.

    Data go to a hidden temporary file that is renamed to ``path`` only when the writer
    closes without error, so a crash never leaves a file that looks complete::

        with ShardWriter(out, "sen12ms", {"sar": sar_spec, "s2": s2_spec}) as writer:
            writer.append({"sar": sar_CHW, "s2": s2_CHW}, sample_id="patch_1")
    """

    def __init__(self, path: str | Path, group: str, sensors: Mapping[str, SensorArraySpec], *,
                 compression: str | None = None, labels: Sequence[LabelSpec] | None = None,
                 source: str = "", created_by: str = "msgfm") -> None:
        self.path = Path(path)
        if not sensors:
            raise UserError(f"{self.path}: a shard needs at least one sensor")
        if compression not in COMPRESSIONS:
            raise UserError(f"compression '{compression}' is not supported; use one of {list(COMPRESSIONS)}")
        shapes = {(spec.height, spec.width) for spec in sensors.values()}
        if len(shapes) > 1:
            raise UserError(f"{self.path}: paired sensors must share H x W, got "
                            f"{ {name: (s.height, s.width) for name, s in sensors.items()} }")
        for name, spec in sensors.items():
            if name in _RESERVED_NAMES:
                raise UserError(f"sensor name '{name}' clashes with a reserved dataset name {sorted(_RESERVED_NAMES)}")
            registry = _registry_spec(name, str(self.path))
            if registry.num_channels != spec.channels:
                raise UserError(f"{self.path}: sensor '{name}' has {registry.num_channels} bands "
                                f"{list(registry.bands)} in the registry but the spec says {spec.channels} channels")
        self.group = group
        self.sensors = dict(sensors)
        self.label_specs = {spec.name: spec for spec in (labels or ())}
        self.num_samples = 0
        self._ids: list[str] = []
        self._lat: list[float] = []
        self._lon: list[float] = []
        self._time: list[str] = []
        self._georefs: list[Georef | None] = []
        self._capacity = 0
        self._tmp_path = _partial_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: h5py.File | None = h5py.File(self._tmp_path, "w")
        try:
            self._write_layout(compression, source, created_by)
        except BaseException:
            self.abort()
            raise

    def _write_layout(self, compression: str | None, source: str, created_by: str) -> None:
        f = self._open_file()
        f.attrs[VERSION_ATTR] = FORMAT_VERSION
        f.attrs["group"] = self.group
        f.attrs["sensors"] = list(self.sensors)
        f.attrs["source"] = source
        f.attrs["created_by"] = created_by
        f.attrs["msgfm_version"] = _msgfm_version
        f.attrs["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for name, spec in self.sensors.items():
            registry = get_sensor(name)
            ds = f.create_dataset(name, shape=(0, *spec.sample_shape), maxshape=(None, *spec.sample_shape),
                                  dtype=spec.dtype, chunks=(1, *spec.sample_shape), compression=compression)
            ds.attrs["bands"] = list(registry.bands)
            wavelengths = registry.wavelengths_nm or (None,) * registry.num_channels
            ds.attrs["wavelengths_nm"] = np.array([math.nan if w is None else w for w in wavelengths], "f8")
            gsd = spec.gsd_m if spec.gsd_m is not None else registry.gsd_m
            ds.attrs["gsd_m"] = math.nan if gsd is None else float(gsd)
            if spec.nodata is not None:
                ds.attrs["nodata"] = np.array(spec.nodata, dtype="f8")
            ds.attrs["scale"] = float(spec.scale)
            ds.attrs["offset"] = float(spec.offset)
        if self.label_specs:
            group = f.create_group(LABELS_GROUP)
            for label in self.label_specs.values():
                chunks = (1, *label.shape) if label.shape else None
                ds = group.create_dataset(label.name, shape=(0, *label.shape), maxshape=(None, *label.shape),
                                          dtype=label.dtype, chunks=chunks or True, compression=compression)
                for key, value in label.attrs.items():
                    ds.attrs[key] = value

    def append(self, images: Mapping[str, np.ndarray], sample_id: str, *,
               labels: Mapping[str, np.ndarray] | None = None, lat: float | None = None,
               lon: float | None = None, time: str | None = None, georef: Georef | None = None) -> int:
        """Add one sample: ``images[sensor]`` is a (C, H, W) array; returns the sample's index.

        ``georef`` is the CRS and transform of the sample's grid (shared by its sensors).
        """
        if self._file is None:
            raise UserError(f"{self.path}: writer is closed")
        if set(images) != set(self.sensors):
            raise UserError(f"sample '{sample_id}': got sensors {sorted(images)}, shard {self.path.name} "
                            f"holds {sorted(self.sensors)}")
        labels = dict(labels or {})
        if set(labels) != set(self.label_specs):
            raise UserError(f"sample '{sample_id}': got labels {sorted(labels)}, shard {self.path.name} "
                            f"declares {sorted(self.label_specs)}")
        arrays = {name: _checked(np.asarray(images[name]), spec.sample_shape, spec.dtype, f"sensor '{name}'",
                                 sample_id) for name, spec in self.sensors.items()}
        label_arrays = {name: _checked(np.asarray(labels[name]), spec.shape, spec.dtype, f"label '{name}'",
                                       sample_id) for name, spec in self.label_specs.items()}
        index = self.num_samples
        if index == self._capacity:
            self._resize(self._capacity + _GROW_BY)
        for name, array in arrays.items():
            self._file[name][index] = array
        for name, array in label_arrays.items():
            self._file[LABELS_GROUP][name][index] = array
        self._ids.append(str(sample_id))
        self._lat.append(math.nan if lat is None else float(lat))
        self._lon.append(math.nan if lon is None else float(lon))
        self._time.append("" if time is None else str(time))
        self._georefs.append(georef)
        self.num_samples += 1
        return index

    def _resize(self, size: int) -> None:
        f = self._open_file()
        for name in self.sensors:
            f[name].resize(size, axis=0)
        for name in self.label_specs:
            f[LABELS_GROUP][name].resize(size, axis=0)
        self._capacity = size

    def _open_file(self) -> h5py.File:
        if self._file is None:
            raise RuntimeError(f"{self.path}: the shard writer is already closed")
        return self._file

    def close(self) -> Path:
        """Finish the file (trim, write ids/coordinates) and move it to its final name."""
        if self._file is None:
            return self.path
        if self.num_samples == 0:
            self.abort()
            raise UserError(f"{self.path}: no samples were appended; an empty shard is not written")
        self._resize(self.num_samples)
        f = self._file
        f.create_dataset("ids", data=np.array(self._ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        if not all(math.isnan(v) for v in self._lat + self._lon):
            f.create_dataset("lat", data=np.array(self._lat, dtype="f8"))
            f.create_dataset("lon", data=np.array(self._lon, dtype="f8"))
        if any(self._time):
            f.create_dataset("time", data=np.array(self._time, dtype=object), dtype=h5py.string_dtype("utf-8"))
        if any(g is not None for g in self._georefs):
            crs, transform = georef_arrays(self._georefs)
            f.create_dataset(CRS_DATASET, data=crs, dtype=h5py.string_dtype("utf-8"))
            f.create_dataset(TRANSFORM_DATASET, data=transform)
        f.close()
        self._file = None
        os.replace(self._tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the unfinished file; ``path`` is left as it was."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _checked(array: np.ndarray, shape: tuple[int, ...], dtype: str, what: str, sample_id: str) -> np.ndarray:
    if array.shape != tuple(shape):
        raise UserError(f"sample '{sample_id}': {what} has shape {array.shape}, expected {tuple(shape)}")
    target = np.dtype(dtype)
    if array.dtype != target:
        # Widening is always fine; float64 -> float32 is what numpy arithmetic produces, also fine.
        both_float = array.dtype.kind == "f" and target.kind == "f"
        if not (np.can_cast(array.dtype, target, "safe") or both_float):
            raise UserError(f"sample '{sample_id}': {what} is {array.dtype}, the shard stores {target}; "
                            f"convert it explicitly (clip and cast) before appending")
        array = array.astype(target)
    return array


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True, kw_only=True)
class SensorInfo:
    """One sensor dataset of a shard, as found on disk."""

    name: str
    dtype: np.dtype
    shape: tuple[int, int, int, int]  # (N, C, H, W)
    bands: tuple[str, ...]
    wavelengths_nm: tuple[float, ...]
    gsd_m: float | None
    nodata: float | None
    scale: float
    offset: float
    compression: str | None

    @property
    def channels(self) -> int:
        return self.shape[1]


@dataclass(frozen=True, kw_only=True)
class LabelInfo:
    """One ``labels/<name>`` dataset: its per-sample shape, dtype and attributes."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # (N, ...)
    attrs: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    """What :func:`read_shard_info` found in a valid shard."""

    path: Path
    format_version: int
    group: str
    sensors: dict[str, SensorInfo]
    num_samples: int
    has_ids: bool
    has_latlon: bool
    has_time: bool
    has_georef: bool  # /crs and /transform (format v2)
    labels: dict[str, LabelInfo]
    attrs: dict[str, Any]  # all root attributes (source, created_by, msgfm_version, ...)

    @property
    def has_labels(self) -> bool:
        return bool(self.labels)


def _attr_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _attr_list(value: Any) -> list[str]:
    if isinstance(value, (str, bytes)):
        return [_attr_str(value)]
    return [_attr_str(v) for v in np.atleast_1d(value)]


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_shard_info(path: str | Path, *, check_data: bool = True) -> ShardInfo:
    """Open a shard, check it against the format (v1 or v2) and the sensor registry, and describe it.

    Raises :class:`ShardError` naming the file (and sensor) for: a missing, unreadable,
    corrupt or truncated file; another format version; a sensor listed but missing; a
    channel count or band list that differs from the registry; paired datasets of
    different length or grid; ids or labels of the wrong length; an empty shard. With
    ``check_data`` the first and last sample of each sensor are read, which catches
    files cut short after their metadata.
    """
    path = Path(path)
    _check_readable(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ShardError(f"{path}: cannot be opened as HDF5 ({err}); the file is corrupt or truncated; "
                         f"convert it again") from None
    with f:
        return _describe(f, path, check_data)


def _check_readable(path: Path) -> None:
    """ShardError for a path that is no readable file, saying why (before h5py hides the reason)."""
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ShardError(f"{path}: a symbolic link loop (the link points back to itself); fix or remove the "
                             f"link") from None
        if err.errno == errno.EACCES:
            raise ShardError(f"{path}: permission denied on a folder on the way to the shard; fix its "
                             f"permissions") from None
        if path.is_symlink():
            raise ShardError(f"{path}: a broken symbolic link (its target {os.readlink(path)} does not exist); "
                             f"fix or remove the link") from None
        raise ShardError(f"{path}: no such shard file") from None
    if not path.is_file():
        raise ShardError(f"{path}: not a shard file (a folder or a device)")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise ShardError(f"{path}: permission denied: this user cannot read the shard; fix its permissions "
                         f"(e.g. chmod a+r)") from None


def _describe(f: h5py.File, path: Path, check_data: bool) -> ShardInfo:
    if VERSION_ATTR not in f.attrs:
        raise ShardError(f"{path}: not an msgfm shard (root attribute '{VERSION_ATTR}' is missing); "
                         f"write shards with `msgfm convert` or follow docs/data_format.md")
    version = int(f.attrs[VERSION_ATTR])
    if version not in READABLE_VERSIONS:
        raise ShardError(f"{path}: shard format version {version}, but this msgfm ({_msgfm_version}) reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))}; convert the data again with this "
                         f"msgfm or use the msgfm release that wrote it")
    for key in ("group", "sensors"):
        if key not in f.attrs:
            raise ShardError(f"{path}: root attribute '{key}' is missing (see docs/data_format.md)")
    names = _attr_list(f.attrs["sensors"])
    if not names:
        raise ShardError(f"{path}: the 'sensors' attribute lists no sensor")
    sensors = {name: _sensor_info(f, path, name) for name in names}
    lengths = {name: info.shape[0] for name, info in sensors.items()}
    if len(set(lengths.values())) > 1:
        raise ShardError(f"{path}: paired sensor datasets differ in length {lengths}; every sensor needs one "
                         f"entry per sample; convert the data again")
    grids = {name: info.shape[2:] for name, info in sensors.items()}
    if len(set(grids.values())) > 1:
        raise ShardError(f"{path}: paired sensor datasets differ in H x W {grids}; paired sensors must share "
                         f"the grid")
    num_samples = next(iter(lengths.values()))
    if num_samples == 0:
        raise ShardError(f"{path}: the shard holds no samples; remove it or convert again")
    for name in ("ids", "lat", "lon", "time", CRS_DATASET):
        if name in f and f[name].shape != (num_samples,):
            raise ShardError(f"{path}: dataset '{name}' has shape {f[name].shape}, expected ({num_samples},)")
    if TRANSFORM_DATASET in f and f[TRANSFORM_DATASET].shape != (num_samples, TRANSFORM_LENGTH):
        raise ShardError(f"{path}: dataset '{TRANSFORM_DATASET}' has shape {f[TRANSFORM_DATASET].shape}, expected "
                         f"({num_samples}, {TRANSFORM_LENGTH})")
    if (CRS_DATASET in f) != (TRANSFORM_DATASET in f):
        raise ShardError(f"{path}: has only one of '{CRS_DATASET}' and '{TRANSFORM_DATASET}'; a georeference "
                         f"needs both (see docs/data_format.md)")
    labels: dict[str, LabelInfo] = {}
    if LABELS_GROUP in f:
        for name, ds in f[LABELS_GROUP].items():
            if ds.shape[:1] != (num_samples,):
                raise ShardError(f"{path}: labels/{name} has {ds.shape[0] if ds.shape else 0} entries for "
                                 f"{num_samples} samples")
            labels[name] = LabelInfo(name=name, dtype=ds.dtype, shape=tuple(ds.shape),
                                     attrs={k: _plain(v) for k, v in ds.attrs.items()})
    if check_data:
        for name in sensors:
            for index in {0, num_samples - 1}:
                try:
                    f[name][index]
                except (OSError, RuntimeError) as err:
                    raise ShardError(f"{path}: sensor '{name}' sample {index} cannot be read ({err}); the file is "
                                     f"corrupt or truncated; convert it again") from None
    return ShardInfo(path=path, format_version=version, group=_attr_str(f.attrs["group"]), sensors=sensors,
                     num_samples=num_samples, has_ids="ids" in f, has_latlon="lat" in f and "lon" in f,
                     has_time="time" in f, has_georef=CRS_DATASET in f, labels=labels,
                     attrs={k: _plain(v) for k, v in f.attrs.items()})


def _sensor_info(f: h5py.File, path: Path, name: str) -> SensorInfo:
    registry = _registry_spec(name, f"{path}: sensor '{name}'")
    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise ShardError(f"{path}: sensor '{name}' is listed in the 'sensors' attribute but its dataset is "
                         f"missing; the file is incomplete; convert it again")
    ds = f[name]
    if ds.ndim != 4:
        raise ShardError(f"{path}: sensor '{name}' has shape {ds.shape}; expected (N, C, H, W)")
    if ds.dtype.name not in SENSOR_DTYPES:
        raise ShardError(f"{path}: sensor '{name}' has dtype {ds.dtype}; supported: {list(SENSOR_DTYPES)}")
    if ds.shape[1] != registry.num_channels:
        raise ShardError(f"{path}: sensor '{name}' has {ds.shape[1]} channels but the sensor spec expects "
                         f"{registry.num_channels} {list(registry.bands)}; convert with the matching sensor "
                         f"(e.g. s2 = 12 bands, s2_l1c = 13) or register a sensor with these bands")
    bands = tuple(_attr_list(ds.attrs["bands"])) if "bands" in ds.attrs else registry.bands
    if bands != registry.bands:
        raise ShardError(f"{path}: sensor '{name}' stores bands {list(bands)} but the sensor spec has "
                         f"{list(registry.bands)}; band order and names must match the registry")
    wavelengths = tuple(float(w) for w in np.atleast_1d(ds.attrs.get("wavelengths_nm", [math.nan] * len(bands))))
    gsd = float(ds.attrs.get("gsd_m", math.nan))
    nodata = float(ds.attrs["nodata"]) if "nodata" in ds.attrs else None
    return SensorInfo(name=name, dtype=ds.dtype, shape=tuple(ds.shape), bands=bands, wavelengths_nm=wavelengths,
                      gsd_m=None if math.isnan(gsd) else gsd, nodata=nodata,
                      scale=float(ds.attrs.get("scale", 1.0)), offset=float(ds.attrs.get("offset", 0.0)),
                      compression=ds.compression)
