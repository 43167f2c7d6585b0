"""Sensor specs and their registry: the one place that knows each sensor's bands.

Built-in sensors cover the paper's four (``rgb``, ``s2``, ``sar``, ``dsm``), the
13-band Sentinel-2 L1C variant (``s2_l1c``) and the WorldView panchromatic and
multispectral bands of the SpaceNet pan-sharpening task: ``pan``, the 8-band
WorldView-3 ``wv3_ms`` (SpaceNet 2, the paper's setup) and the 4-band ``wv2_ms`` (data
with only those four bands, e.g. SpaceNet 6). A new sensor needs
no code: declare it in a YAML file and pass ``--sensors FILE.yaml`` to any ``msgfm``
command (:func:`add_sensors_arg`, :func:`load_sensors_file`), and under ``sensors:``
in the run config the launchers take::

    hls:
      bands: [B02, B03, B04, B8A, B11, B12]
      wavelengths_nm: [490, 560, 665, 865, 1610, 2190]
      gsd_m: 30
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msgfm.errors import MissingFileError, UserError


class UnknownSensorError(UserError, KeyError):
    """A sensor name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True, kw_only=True)
class SensorSpec:
    """What msgfm needs to know about a sensor: its bands, in storage order."""

    name: str
    bands: tuple[str, ...]
    # Centre wavelength of each band in nanometres; None where it does not apply (SAR, elevation).
    wavelengths_nm: tuple[float | None, ...] | None = None
    # Nominal ground sample distance in metres; None for sources of mixed resolution.
    gsd_m: float | None = None
    # Indices of the bands to show as red, green, blue in figures (one index: greyscale).
    rgb_bands: tuple[int, ...] = field(default=(0,))
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise UserError(f"sensor name '{self.name}' must be a non-empty identifier (letters, digits, _)")
        if not self.bands:
            raise UserError(f"sensor '{self.name}': needs at least one band")
        if len(set(self.bands)) != len(self.bands):
            raise UserError(f"sensor '{self.name}': repeated band names in {list(self.bands)}")
        if self.wavelengths_nm is not None and len(self.wavelengths_nm) != len(self.bands):
            raise UserError(f"sensor '{self.name}': {len(self.wavelengths_nm)} wavelengths for "
                            f"{len(self.bands)} bands; give one per band (null where none applies)")
        if self.gsd_m is not None and self.gsd_m <= 0:
            raise UserError(f"sensor '{self.name}': gsd_m must be > 0, got {self.gsd_m}")
        if len(self.rgb_bands) not in (1, 3) or not all(0 <= i < len(self.bands) for i in self.rgb_bands):
            raise UserError(f"sensor '{self.name}': rgb_bands {list(self.rgb_bands)} must be 1 or 3 "
                            f"indices into its {len(self.bands)} bands")

    @property
    def num_channels(self) -> int:
        return len(self.bands)

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> SensorSpec:
        allowed = {"bands", "wavelengths_nm", "gsd_m", "rgb_bands", "description"}
        if not isinstance(data, dict):
            raise UserError(f"sensor '{name}': expected a mapping with keys {sorted(allowed)}, got {data!r}")
        unknown = set(data) - allowed
        if unknown:
            raise UserError(f"sensor '{name}': unknown keys {sorted(unknown)}; valid keys: {sorted(allowed)}")
        if "bands" not in data:
            raise UserError(f"sensor '{name}': 'bands' is required (a list of band names)")
        wavelengths = data.get("wavelengths_nm")
        return cls(
            name=name,
            bands=tuple(str(b) for b in data["bands"]),
            wavelengths_nm=None if wavelengths is None else tuple(wavelengths),
            gsd_m=data.get("gsd_m"),
            rgb_bands=tuple(data.get("rgb_bands", (0,))),
            description=str(data.get("description", "")),
        )


_S2_L1C_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
# Sentinel-2A centre wavelengths (ESA Sentinel-2 MSI spectral response, nm).
_S2_L1C_WAVELENGTHS = (442.7, 492.4, 559.8, 664.6, 704.1, 740.5, 782.8, 832.8, 864.7, 945.1, 1373.5, 1613.7, 2202.4)
# Native resolution of each band in metres; converters resample all to 10 m.
S2_NATIVE_GSD_M = dict(zip(_S2_L1C_BANDS, (60, 10, 10, 10, 20, 20, 20, 10, 20, 60, 60, 20, 20)))
_S2_L2A = [(b, w) for b, w in zip(_S2_L1C_BANDS, _S2_L1C_WAVELENGTHS) if b != "B10"]  # L2A drops cirrus B10

_BUILTIN = (
    SensorSpec(name="rgb", bands=("red", "green", "blue"), wavelengths_nm=(650.0, 550.0, 470.0), gsd_m=None,
               rgb_bands=(0, 1, 2), description="Unpaired RGB imagery of mixed sources and resolution "
                                                 "(GeoPile, MillionAID, airborne)"),
    SensorSpec(name="s2", bands=tuple(b for b, _ in _S2_L2A), wavelengths_nm=tuple(w for _, w in _S2_L2A),
               gsd_m=10.0, rgb_bands=(3, 2, 1),
               description="Sentinel-2 L2A, 12 bands as in BigEarthNet (B10 absent), resampled to 10 m"),
    SensorSpec(name="s2_l1c", bands=_S2_L1C_BANDS, wavelengths_nm=_S2_L1C_WAVELENGTHS, gsd_m=10.0,
               rgb_bands=(3, 2, 1), description="Sentinel-2 L1C, all 13 bands (SEN12MS), resampled to 10 m"),
    SensorSpec(name="sar", bands=("VV", "VH"), wavelengths_nm=None, gsd_m=10.0, rgb_bands=(0,),
               description="Sentinel-1 C-band SAR, VV and VH backscatter in dB"),
    SensorSpec(name="dsm", bands=("elevation",), wavelengths_nm=None, gsd_m=0.25, rgb_bands=(0,),
               description="Digital surface model in metres (MDAS airborne DSM)"),
    SensorSpec(name="pan", bands=("pan",), wavelengths_nm=(625.0,), gsd_m=0.5, rgb_bands=(0,),
               description="WorldView-2 panchromatic (SpaceNet)"),
    SensorSpec(name="wv2_ms", bands=("blue", "green", "red", "nir1"), wavelengths_nm=(480.0, 545.0, 660.0, 835.0),
               gsd_m=2.0, rgb_bands=(2, 1, 0), description="WorldView-2 multispectral, 4 bands (SpaceNet)"),
    # Band order of WorldView-3's 8-band multispectral products (SpaceNet 2's MUL GeoTIFFs); centre wavelengths
    # are the midpoints of the bands' edges in DigitalGlobe's WorldView-3 specification.
    SensorSpec(name="wv3_ms", bands=("coastal", "blue", "green", "yellow", "red", "rededge", "nir1", "nir2"),
               wavelengths_nm=(425.0, 480.0, 545.0, 605.0, 660.0, 725.0, 832.5, 950.0), gsd_m=1.24,
               rgb_bands=(4, 2, 1),
               description="WorldView-3 multispectral, 8 bands (SpaceNet 2 MUL, 1.24 m at nadir)"),
)

_REGISTRY: dict[str, SensorSpec] = {spec.name: spec for spec in _BUILTIN}


def register_sensor(spec: SensorSpec, *, replace: bool = False) -> SensorSpec:
    """Add a sensor. Re-registering an identical spec is a no-op; a different one needs ``replace``."""
    current = _REGISTRY.get(spec.name)
    if current is not None and current != spec and not replace:
        raise UserError(f"sensor '{spec.name}' is already registered with other bands; pass replace=True "
                        f"or choose another name")
    _REGISTRY[spec.name] = spec
    return spec


_BUILTIN_BY_NAME = {spec.name: spec for spec in _BUILTIN}
# Top-level keys that mark a run or fine-tuning config (its sensors are under 'sensors:').
_CONFIG_KEYS = frozenset({"_base_", "model", "data", "train", "task", "schedule", "optimizer"})


def register_sensor_specs(specs: Mapping[str, Any], where: str) -> list[SensorSpec]:
    """Register sensors given as {name: {bands, wavelengths_nm, gsd_m, rgb_bands, description}}.

    ``where`` (a file, a config key) starts every error message. A built-in sensor may be
    repeated unchanged but not redefined: shards and checkpoints rely on its spec.
    """
    parsed = []
    for name, data in specs.items():
        try:
            spec = SensorSpec.from_dict(str(name), data)
        except ValueError as err:
            raise UserError(f"{where}: {err}") from None
        builtin = _BUILTIN_BY_NAME.get(spec.name)
        if builtin is not None and builtin != spec:
            raise UserError(f"{where}: sensor '{spec.name}' is built in (bands {list(builtin.bands)}, gsd_m "
                            f"{builtin.gsd_m}) and cannot be redefined; give your sensor another name")
        parsed.append(spec)
    return [register_sensor(spec, replace=True) for spec in parsed]


def load_sensors_file(path: str | Path) -> list[SensorSpec]:
    """Register the sensors declared in a YAML file and return them.

    The file maps sensor names to specs (as under ``sensors:`` in a run config); a run or
    fine-tuning config also works, its ``sensors:`` section is used. Errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"sensors file {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if isinstance(data, dict) and _CONFIG_KEYS & set(data):
        data = data.get("sensors") or {}
        if not data:
            raise UserError(f"{path} is a config without a 'sensors:' section; declare the sensors there or "
                            f"in a file of their own")
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a mapping of sensor name to spec, e.g. 'landsat7: {{bands: [B1, B2, "
                        f"B3], gsd_m: 30}}'")
    return register_sensor_specs(data, str(path))


# The name this function had first; kept so that existing scripts keep working.
register_sensors_from_yaml = load_sensors_file


class _RegisterSensorsAction(argparse.Action):
    """Registers the sensors of each --sensors FILE as soon as it is parsed (before any sensor name is used)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            load_sensors_file(values)
        except (OSError, ValueError) as err:
            raise argparse.ArgumentError(self, str(err)) from None
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), Path(values)])


def add_sensors_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--sensors FILE.yaml`` (repeatable) to a command; the sensors are registered while parsing.

    Every ``msgfm`` command that names or reads sensors takes it, so a sensor declared once in
    a file works from conversion to statistics and inspection without code.
    """
    parser.add_argument("--sensors", action=_RegisterSensorsAction, dest="sensors_files", default=[],
                        metavar="FILE.yaml",
                        help="register the sensors declared in this YAML file (name: {bands: [...], "
                             "wavelengths_nm, gsd_m, rgb_bands}; a run config's sensors: section works too); "
                             "repeatable")


def get_sensor(name: str) -> SensorSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownSensorError(f"unknown sensor '{name}'; registered sensors: {', '.join(sorted(_REGISTRY))}. "
                                 f"Declare a new sensor in a YAML file and pass it with --sensors FILE.yaml "
                                 f"(msgfm commands), or under 'sensors:' in the run config") from None


def list_sensors() -> list[str]:
    return sorted(_REGISTRY)
