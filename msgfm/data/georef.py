"""Where a sample lies on the ground: the CRS and affine transform of its pixel grid (shard format v2).

A shard stores them per sample (docs/data_format.md)::

    /crs        (N,) utf-8    "EPSG:<code>" when the CRS is exactly that EPSG code, else its WKT; "" unknown
    /transform  (N, 6) float64  affine coefficients (a, b, c, d, e, f) in rasterio's order:
                                x = a*col + b*row + c, y = d*col + e*row + f at pixel corner (col, row);
                                NaN where unknown

The sensors of a paired sample share one H x W grid (the converters resample them onto
it), so one transform is every sensor's transform after resampling.

rasterio is imported only by the helpers that take rasterio objects, so that readers of
shards do not need it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from msgfm.errors import UserError

if TYPE_CHECKING:
    from affine import Affine

CRS_DATASET = "crs"
TRANSFORM_DATASET = "transform"
# The six coefficients of an affine.Affine, in the order Affine(a, b, c, d, e, f) takes them.
TRANSFORM_LENGTH = 6


@dataclass(frozen=True)
class Georef:
    """The CRS (EPSG code or WKT) and the affine transform of one sample's pixel grid."""

    crs: str
    transform: tuple[float, float, float, float, float, float]

    def __post_init__(self) -> None:
        if len(self.transform) != TRANSFORM_LENGTH:
            raise UserError(f"a transform has {TRANSFORM_LENGTH} coefficients (a, b, c, d, e, f), "
                            f"got {len(self.transform)}")
        object.__setattr__(self, "transform", tuple(float(v) for v in self.transform))

    @property
    def affine(self) -> Affine:
        """The transform as an ``affine.Affine`` (what rasterio takes)."""
        from affine import Affine

        return Affine(*self.transform)

    def describe(self) -> str:
        """One line: the CRS (shortened when it is WKT) and the transform."""
        crs = self.crs if len(self.crs) <= 60 else self.crs[:57] + "..."
        a, b, c, d, e, f = self.transform
        return f"crs {crs or '(unknown)'}, transform ({a:.6g}, {b:.6g}, {c:.12g}, {d:.6g}, {e:.6g}, {f:.12g})"


def crs_string(crs: Any) -> str:
    """A rasterio CRS as stored in a shard: ``EPSG:<code>`` when that code is exactly this CRS, else WKT."""
    if crs is None:
        return ""
    from rasterio.crs import CRS

    epsg = crs.to_epsg()
    # to_epsg also matches CRSs that are only close to a code; keep the WKT unless the code is exact.
    if epsg is not None and CRS.from_epsg(epsg) == crs:
        return f"EPSG:{epsg}"
    return str(crs.to_wkt())


def grid_georef(crs: Any, transform: Affine, row: int = 0, col: int = 0) -> Georef | None:
    """Georef of the grid that starts at pixel (row, col) of a raster with ``crs`` and ``transform``.

    None when the raster has no CRS (a transform alone does not place a tile on the ground).
    """
    if crs is None:
        return None
    from affine import Affine

    shifted = transform @ Affine.translation(col, row)
    return Georef(crs=crs_string(crs), transform=tuple(shifted)[:TRANSFORM_LENGTH])


def georef_arrays(georefs: Sequence[Georef | None]) -> tuple[np.ndarray, np.ndarray]:
    """The ``/crs`` strings and ``/transform`` (N, 6) rows of a list of georefs (None: unknown)."""
    crs = np.array(["" if g is None else g.crs for g in georefs], dtype=object)
    transform = np.array([[math.nan] * TRANSFORM_LENGTH if g is None else g.transform for g in georefs], "f8")
    return crs, transform.reshape(len(georefs), TRANSFORM_LENGTH)


def read_georef(f: h5py.File, index: int) -> Georef | None:
    """Sample ``index``'s georef from an open shard; None when the shard (format v1) or the sample has none."""
    if CRS_DATASET not in f or TRANSFORM_DATASET not in f:
        return None
    raw = f[CRS_DATASET][index]
    crs = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    transform = tuple(float(v) for v in f[TRANSFORM_DATASET][index])
    if not crs and all(math.isnan(v) for v in transform):
        return None
    return Georef(crs=crs, transform=transform)  # type: ignore[arg-type]
