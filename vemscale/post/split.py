"""Seeded watershed of one object: touching objects split along the necks of their distance transform.

The split is a pure function of one object's voxels (its bounding box grown by one voxel, so the distance to
the nearest voxel outside the object is exact), never of a block: every block that holds part of an object
computes the same pieces, so the result does not depend on how the volume is cut. It equals a whole-volume
pass (distance transform of each class mask, h-maxima, watershed restricted to the class) because, with
26-connected objects, the voxel nearest to an object's voxel that is not in the object is never in another
object of the same class, and flooding never crosses from one object to another (they are not adjacent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

__all__ = ["WatershedParams", "object_distance", "object_seeds", "split_object"]


@dataclass(frozen=True)
class WatershedParams:
    """How seeds are found on the distance transform (nm): h-maxima of depth `h_nm`, or components of the
    voxels at least `seed_distance_nm` from the object's surface."""

    seeds: Literal["hmaxima", "distance"] = "hmaxima"
    h_nm: float = 20.0
    seed_distance_nm: float = 100.0
    connectivity: int = 26


def object_distance(mask: np.ndarray, voxel_zyx: Sequence[float]) -> np.ndarray:
    """Euclidean distance (nm) of each voxel of `mask` to the nearest voxel outside it (scipy, anisotropic)."""
    from scipy import ndimage

    return ndimage.distance_transform_edt(mask, sampling=tuple(float(v) for v in voxel_zyx))


def object_seeds(dist: np.ndarray, params: WatershedParams) -> tuple[np.ndarray, int]:
    """Markers 1..n (int32) from the distance map: regional maxima at least `h_nm` deep, or the components of
    dist >= `seed_distance_nm`; connected with the objects' connectivity."""
    import cc3d

    if params.seeds == "hmaxima":
        from skimage.morphology import h_maxima

        peaks = h_maxima(dist, params.h_nm) > 0
    else:
        peaks = dist >= params.seed_distance_nm
    markers, n = cc3d.connected_components(peaks.astype(np.uint8), connectivity=params.connectivity,
                                           return_N=True)
    return markers.astype(np.int32), int(n)


def split_object(mask: np.ndarray, voxel_zyx: Sequence[float], params: WatershedParams) -> np.ndarray:
    """Pieces 1..k (uint32, 0 outside `mask`) of one object, numbered in the C order of their first voxel.

    An object with fewer than two seeds stays one piece (a watershed from one seed cannot split it, and an
    object with none must not vanish)."""
    mask = np.asarray(mask, bool)
    dist = object_distance(mask, voxel_zyx)
    markers, n = object_seeds(dist, params)
    if n < 2:
        return mask.astype(np.uint32)
    from skimage.segmentation import watershed

    rank = {6: 1, 18: 2, 26: 3}[params.connectivity]  # scipy's generate_binary_structure ranks
    pieces = watershed(-dist, markers, mask=mask, connectivity=rank)
    flat = pieces.ravel()
    nz = np.flatnonzero(flat)
    values, first = np.unique(flat[nz], return_index=True)
    order = np.argsort(nz[first], kind="stable")  # piece values by their first voxel in C order
    lut = np.zeros(int(values.max()) + 1, np.uint32)
    lut[values[order]] = np.arange(1, len(values) + 1, dtype=np.uint32)
    return lut[pieces]
