"""Grey-value histograms of volumes and histogram matching as a lookup table, the same for every block.

Matching a new microscope's volume to the histogram of the images a model was trained on is the simplest
domain adaptation of Franco-Barranco et al. 2022. scikit-image's `match_histograms` maps each grey value
through the two cumulative histograms; applied block by block it would map the same value differently in every
block. Here the input's histogram is measured once (exactly, or from an evenly spread sample of patches for a
large volume), the map becomes a table over the integer grey values, rounded to the input's dtype, and every
block goes through the same table: the result equals `match_histograms` of the whole volume to within rounding.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vemscale.errors import UserError

__all__ = ["Histogram", "histogram_of", "volume_histogram", "match_lut", "reference_histogram", "apply_lut",
           "SAMPLE_VOXELS"]

SAMPLE_VOXELS = 1 << 25  # volumes up to 32 Mi voxels are counted exactly; larger ones from patches summing to this
PATCH = 512  # y,x side of one sampled patch of a large volume


@dataclass(frozen=True)
class Histogram:
    """Counts of the grey values present (ascending) in an unsigned integer volume of `dtype`."""

    values: np.ndarray
    counts: np.ndarray
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "values": self.values.tolist(), "counts": self.counts.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Histogram":
        try:
            values, counts = np.asarray(d["values"], np.int64), np.asarray(d["counts"], np.int64)
            dtype = str(np.dtype(d["dtype"]))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"a histogram needs dtype, values and counts: {err}") from None
        if values.shape != counts.shape or not len(values) or (counts < 0).any():
            raise UserError("a histogram needs as many non-negative counts as values, at least one")
        return cls(values, counts, dtype)

    def __add__(self, other: "Histogram") -> "Histogram":
        n = int(max(self.values.max(), other.values.max())) + 1
        full = np.bincount(self.values, self.counts, minlength=n) + np.bincount(other.values, other.counts, minlength=n)
        return _from_bincount(full.astype(np.int64), self.dtype)

    def quantiles(self, q) -> np.ndarray:
        """The grey value at each cumulative fraction `q` (the lowest value whose cumulative share reaches it)."""
        cdf = np.cumsum(self.counts) / self.counts.sum()
        return self.values[np.minimum(np.searchsorted(cdf, np.asarray(q, np.float64) - 1e-12), len(cdf) - 1)]


def _from_bincount(full: np.ndarray, dtype: str) -> Histogram:
    values = np.nonzero(full)[0]
    return Histogram(values.astype(np.int64), full[values].astype(np.int64), dtype)


def _check_dtype(dtype, what: str) -> None:
    dt = np.dtype(dtype)
    if dt.kind != "u" or dt.itemsize > 2:
        raise UserError(f"{what} is {dt}; histogram matching works on uint8 or uint16 grey values "
                        "(convert a float or signed volume to uint8/uint16 first)")


def histogram_of(data: np.ndarray) -> Histogram:
    """The exact histogram of an unsigned integer array."""
    data = np.asarray(data)
    _check_dtype(data.dtype, "the data")
    return _from_bincount(np.bincount(data.ravel()), str(data.dtype))


def volume_histogram(url: str, scale: int | str | None = None, channel: int = 0,
                     max_voxels: int = SAMPLE_VOXELS) -> Histogram:
    """Histogram of one channel of a volume: exact when it has at most `max_voxels` voxels (read slab by slab),
    else from PATCH x PATCH patches at evenly spaced z slices and positions summing to about `max_voxels`.
    Memory is one slab or one patch, never the volume."""
    from vemscale.io.volume import open_volume

    vol = open_volume(url, scale=scale)
    _check_dtype(vol.dtype, f"volume {url!r}")
    if vol.ndim not in (3, 4):
        raise UserError(f"volume {url!r} has shape {tuple(vol.shape)}; expected (z,y,x) or (c,z,y,x)")
    lead = (channel,) if vol.ndim == 4 else ()
    z, y, x = (int(s) for s in vol.shape[-3:])
    full = np.zeros(np.iinfo(vol.dtype).max + 1, np.int64)
    if z * y * x <= max_voxels:
        slab = max(1, max_voxels // 8 // max(1, y * x))
        for z0 in range(0, z, slab):
            full += np.bincount(np.asarray(vol.read(lead + (slice(z0, min(z, z0 + slab)),))).ravel(), minlength=len(full))
        return _from_bincount(full, str(vol.dtype))
    py, px = min(PATCH, y), min(PATCH, x)
    patches = max(1, max_voxels // (py * px))
    per_axis = max(1, math.ceil(patches ** (1 / 3)))
    zs = np.unique(np.linspace(0, z - 1, min(z, per_axis)).round().astype(int))
    ys = np.unique(np.linspace(0, y - py, min(max(1, y // py), per_axis)).round().astype(int))
    xs = np.unique(np.linspace(0, x - px, min(max(1, x // px), per_axis)).round().astype(int))
    for zi in zs:
        for yi in ys:
            for xi in xs:
                box = lead + (slice(int(zi), int(zi) + 1), slice(int(yi), int(yi) + py), slice(int(xi), int(xi) + px))
                full += np.bincount(np.asarray(vol.read(box)).ravel(), minlength=len(full))
    return _from_bincount(full, str(vol.dtype))


def match_lut(source: Histogram, reference: Histogram) -> np.ndarray:
    """Table over the source dtype's grey values: value -> the reference value at the same cumulative share,
    interpolated as scikit-image's `match_histograms` does, rounded and clipped to the source dtype."""
    dt = np.dtype(source.dtype)
    src_q = np.cumsum(source.counts) / source.counts.sum()
    ref_q = np.cumsum(reference.counts) / reference.counts.sum()
    mapped = np.interp(src_q, ref_q, reference.values.astype(np.float64))
    lut = np.arange(np.iinfo(dt).max + 1, dtype=np.float64)  # values never seen map to themselves
    lut[source.values] = mapped
    return np.clip(np.rint(lut), 0, np.iinfo(dt).max).astype(dt)


def apply_lut(data: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
    """`data` through the table (unchanged without one)."""
    return data if lut is None else lut[data]


def reference_histogram(spec: str, checkpoint_histogram: dict | None = None, scale: int | str | None = None) -> Histogram:
    """What `match_histogram=` names: `checkpoint` (the histogram of the images the model was trained on, stored
    in it), a .json file written by `Histogram.to_dict`, or a volume URL (its histogram measured here)."""
    if spec == "checkpoint":
        if not checkpoint_histogram:
            raise UserError("match_histogram=checkpoint: this checkpoint stores no training histogram (it predates "
                            "them); give a reference volume of the training data instead, match_histogram=<volume>")
        return Histogram.from_dict(checkpoint_histogram)
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"match_histogram {spec!r} does not exist; give a histogram .json, a volume or 'checkpoint'")
        try:
            return Histogram.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise UserError(f"match_histogram {spec!r} is not valid JSON: {err}") from None
    return volume_histogram(spec, scale=scale)
