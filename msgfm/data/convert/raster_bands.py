"""What the raster converters (geotiff, raster-pair) read from a raster's header: which of its
bands make a sensor's bands (``--bands``), its nodata value and its pixel size on the ground.

``--bands`` selects and orders bands by 1-based index (``3,2,1``) or by band description
(``red,green,blue``, matched case-insensitively against the descriptions GDAL stores), so that
e.g. an ``rgb`` sample comes from bands 3, 2, 1 of a 6-band Landsat scene. Without it a raster
must hold exactly the sensor's bands, in the sensor's order.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from msgfm.errors import UserError
from msgfm.sensors import get_sensor

# Metres per degree of latitude: turns a geographic CRS's pixel size into a nominal GSD.
_METRES_PER_DEGREE = 111_320.0
# Files whose pixel sizes differ by less than this (relative) share one GSD.
_GSD_RTOL = 1e-3

BandSelection = tuple[int | str, ...]


def parse_band_selection(text: str) -> BandSelection:
    """``"3,2,1"`` -> (3, 2, 1); ``"red, nir"`` -> ("red", "nir"); numbers are 1-based band indexes."""
    tokens = [token.strip() for token in text.split(",")]
    if not text.strip() or any(not token for token in tokens):
        raise UserError(f"--bands {text!r}: expected comma-separated 1-based band indexes or band descriptions, "
                        f"e.g. --bands 3,2,1 or --bands red,green,blue")
    selection: list[int | str] = []
    for token in tokens:
        if token.lstrip("-").isdigit():
            if int(token) < 1:
                raise UserError(f"--bands {text!r}: band indexes start at 1, got {token}")
            selection.append(int(token))
        else:
            selection.append(token)
    return tuple(selection)


def _describe_bands(descriptions: Sequence[str | None]) -> str:
    return ", ".join(f"{i} {d!r}" if d else str(i) for i, d in enumerate(descriptions, start=1))


def _hint(descriptions: Sequence[str | None], sensor_bands: Sequence[str]) -> str:
    """A --bands value to suggest: the sensor's band names when the raster describes its bands with them."""
    named = {d.lower(): i for i, d in enumerate(descriptions, start=1) if d}
    if all(band.lower() in named for band in sensor_bands):
        return f"--bands {','.join(sensor_bands)}"
    return f"--bands {','.join(str(i) for i in range(1, min(len(sensor_bands), len(descriptions)) + 1))}"


def resolve_bands(selection: BandSelection | None, descriptions: Sequence[str | None], *, path: Any,
                  sensor: str) -> list[int]:
    """1-based indexes of the raster bands that make ``sensor``'s bands, in the sensor's order.

    ``descriptions`` has one entry per raster band (rasterio's ``src.descriptions``). Any
    mismatch is a ValueError naming the file, the sensor and the bands.
    """
    spec = get_sensor(sensor)
    count = len(descriptions)
    if selection is None:
        if count != spec.num_channels:
            fix = (f"select them with {_hint(descriptions, spec.bands)} (index or description, in the sensor's "
                   f"order), or " if count > spec.num_channels else "pick the sensor the file holds, or ")
            raise UserError(f"{path} has {count} bands ({_describe_bands(descriptions)}) but sensor '{sensor}' has "
                            f"{spec.num_channels} {list(spec.bands)}; {fix}declare a sensor with the file's bands "
                            f"(--sensors FILE.yaml)")
        return list(range(1, count + 1))
    indexes = []
    for wanted in selection:
        if isinstance(wanted, int):
            if wanted > count:
                raise UserError(f"{path}: --bands asks for band {wanted} but the file has {count} bands "
                                f"({_describe_bands(descriptions)})")
            indexes.append(wanted)
            continue
        matches = [i for i, d in enumerate(descriptions, start=1) if d and d.lower() == wanted.lower()]
        if len(matches) != 1:
            problem = "no band" if not matches else f"{len(matches)} bands"
            raise UserError(f"{path}: --bands '{wanted}' matches {problem} of the file's descriptions "
                            f"({_describe_bands(descriptions)}); use 1-based band indexes instead")
        indexes.append(matches[0])
    if len(indexes) != spec.num_channels:
        raise UserError(f"{path}: --bands selects {len(indexes)} bands {list(selection)} but sensor '{sensor}' has "
                        f"{spec.num_channels} {list(spec.bands)}; give one band per sensor band, in its order")
    return indexes


def nodata_value(value: float | None) -> float | None:
    """A raster's nodata as a shard stores it; NaN nodata needs no value (NaN pixels are caught as non-finite)."""
    return None if value is None or math.isnan(value) else float(value)


def nominal_gsd_m(crs: Any, res: tuple[float, float]) -> float:
    """Pixel size in metres: projected units converted to metres, degrees of latitude for geographic CRS."""
    if crs.is_geographic:
        return abs(res[1]) * _METRES_PER_DEGREE
    return abs(res[1]) * crs.linear_units_factor[1]


def common_gsd_m(gsds: Sequence[float | None]) -> float | None:
    """The pixel size shared by all files (None when unknown for any, or when they differ)."""
    if not gsds or any(g is None for g in gsds):
        return None
    values = [float(g) for g in gsds if g is not None]
    low, high = min(values), max(values)
    return values[0] if high - low <= _GSD_RTOL * high else None
