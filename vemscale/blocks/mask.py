"""A mask volume at any scale mapped onto a stage's voxel grid: which blocks to skip, which voxels to keep.

A mask is any volume the engine opens (OME-Zarr level, zarr, precomputed layer, TIFF), z,y,x (or c=1);
non-zero means tissue. Mask voxel j covers target voxels [j * f, (j + 1) * f) per axis, f = mask voxel
size / target voxel size as an exact fraction (from the voxel sizes when both volumes have them, else from
the shapes, which must then differ by a whole factor). Target voxel i maps to mask voxel floor(i / f), so a
block's mask is a pure function of its box: the same mask gives the same bytes for any block shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

import numpy as np

from vemscale.errors import UserError

Box = tuple[slice, ...]
MAX_DENOMINATOR = 1000  # voxel-size ratios such as 36.8 / 4.6 are snapped to the nearest fraction n / d, d <= this


@dataclass(frozen=True)
class MaskMap:
    """JSON-able: where the mask is and how a target voxel maps onto it (target voxels per mask voxel, num/den)."""

    url: str
    scale: int | str | None
    mask_shape: tuple[int, int, int]
    factors: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # per z,y,x: (num, den) = f

    def _lo(self, axis: int, i: int) -> int:
        num, den = self.factors[axis]
        return min(self.mask_shape[axis] - 1, (i * den) // num)

    def mask_box(self, box: Sequence[slice]) -> Box:
        """The box of mask voxels that `box` (target voxels) touches."""
        return tuple(slice(self._lo(a, s.start), self._lo(a, s.stop - 1) + 1) for a, s in enumerate(box))

    def expand(self, mask: np.ndarray, box: Sequence[slice]) -> np.ndarray:
        """`mask` (the data of `mask_box(box)`) -> a bool array of box's shape: is each target voxel tissue."""
        mb = self.mask_box(box)
        index = [np.asarray([self._lo(a, i) for i in range(s.start, s.stop)]) - mb[a].start for a, s in enumerate(box)]
        return np.asarray(mask != 0)[np.ix_(*index)]

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "scale": self.scale, "mask_shape": list(self.mask_shape),
                "factors": [list(f) for f in self.factors]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MaskMap:
        return cls(d["url"], d["scale"], tuple(d["mask_shape"]), tuple(tuple(f) for f in d["factors"]))  # type: ignore[arg-type]


def _factor_from_sizes(axis: str, n: int, m: int, vt: float, vm: float, where: str) -> Fraction:
    f = Fraction(vm / vt).limit_denominator(MAX_DENOMINATOR)
    expect = n / float(f)
    if not (math.floor(expect) - 1 <= m <= math.ceil(expect) + 1):
        raise UserError(f"{where}: along {axis} the mask covers {m} x {vm:g} nm = {m * vm:g} nm but the volume covers "
                        f"{n} x {vt:g} nm = {n * vt:g} nm; give a mask of the same extent (any scale), or the right "
                        "voxel sizes")
    return f


def _factor_from_shapes(axis: str, n: int, m: int, where: str) -> Fraction:
    r = max(1, round(n / m))
    if m not in (n // r, -(-n // r)):
        raise UserError(f"{where}: cannot map a mask of {m} voxels onto {n} along {axis} (not a whole downsampling "
                        "factor) and the voxel sizes are unknown; give the mask's and the volume's voxel sizes")
    return Fraction(r)


def plan_mask(url: str, scale: int | str | None, target_shape: Sequence[int],
              target_voxel_xyz: Sequence[float] | None, where: str = "mask") -> MaskMap:
    """Open and check a mask for a volume of `target_shape` (z,y,x); UserError when it cannot be mapped."""
    from vemscale.io.volume import open_volume

    vol = open_volume(url, scale=scale)
    shape = tuple(int(s) for s in vol.shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3:
        raise UserError(f"{where} {url!r} has shape {vol.shape}; a mask is z,y,x (non-zero = tissue)")
    if vol.dtype.kind not in "biuf":
        raise UserError(f"{where} {url!r} has dtype {vol.dtype}; a mask holds numbers (non-zero = tissue)")
    vm, vt = vol.voxel_size_xyz, target_voxel_xyz
    factors = []
    for a, axis in enumerate("zyx"):
        n, m = int(target_shape[a]), shape[a]
        if vm is not None and vt is not None:
            f = _factor_from_sizes(axis, n, m, float(vt[2 - a]), float(vm[2 - a]), f"{where} {url!r}")
        else:
            f = _factor_from_shapes(axis, n, m, f"{where} {url!r}")
        factors.append((f.numerator, f.denominator))
    return MaskMap(vol.url, scale, shape, tuple(factors))  # type: ignore[arg-type]


def read_mask(mask: MaskMap, box: Sequence[slice], run_id: str = "") -> np.ndarray:
    """The tissue mask (bool, box's shape) of a target box, read from the mask volume (handle cached per run)."""
    from vemscale.io.volume import open_volume_cached

    vol = open_volume_cached(mask.url, mask.scale, run_id)
    mb = mask.mask_box(box)
    data = np.asarray(vol.read(((slice(0, 1),) if vol.ndim == 4 else ()) + mb))
    return mask.expand(data.reshape(data.shape[-3:]), box)


__all__ = ["MaskMap", "plan_mask", "read_mask"]
