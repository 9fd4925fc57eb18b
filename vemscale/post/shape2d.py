"""Shape statistics of the 2D objects of a binary stack, slice by slice: the morphology prior with which
Franco-Barranco et al. 2022 (danifranco/EM_domain_adaptation) choose a checkpoint without target labels.

Objects are the connected components of each z slice; objects of `min_size` pixels or fewer are ignored.
Solidity is an object's area over the area of its convex hull, counted as scikit-image counts it (the hull of
the pixels' edge midpoints, pixel centres on or inside it), so a value here equals `regionprops(...).solidity`.
`ShapeStats` add up across slices and blocks, so a sample of any size is summarised in O(1) memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ShapeStats", "shape_stats", "object_solidities", "MIN_SIZE"]

MIN_SIZE = 10  # objects of <= 10 pixels are ignored (EM_domain_adaptation's solidity prior)
_DIAMOND = np.array([[-0.5, 0.0], [0.5, 0.0], [0.0, -0.5], [0.0, 0.5]])  # edge midpoints of a pixel
_TOL = 1e-9  # a pixel centre on a hull edge counts as inside (scikit-image includes borders)


@dataclass
class ShapeStats:
    """Sums over objects and pixels; `mean_solidity` and `foreground_ratio` are the two priors."""

    objects: int = 0
    solidity_sum: float = 0.0
    foreground: int = 0  # object pixels (after the size filter)
    pixels: int = 0  # all pixels seen

    def __add__(self, other: "ShapeStats") -> "ShapeStats":
        return ShapeStats(self.objects + other.objects, self.solidity_sum + other.solidity_sum,
                          self.foreground + other.foreground, self.pixels + other.pixels)

    @property
    def mean_solidity(self) -> float:
        """Mean solidity over all objects; 0 when there are none (no objects is as far from a prior as it gets)."""
        return self.solidity_sum / self.objects if self.objects else 0.0

    @property
    def foreground_ratio(self) -> float:
        return self.foreground / self.pixels if self.pixels else 0.0

    def to_dict(self) -> dict:
        return {"objects": self.objects, "mean_solidity": self.mean_solidity,
                "foreground_ratio": self.foreground_ratio, "foreground": self.foreground, "pixels": self.pixels}


def _convex_area(rows: np.ndarray, cols: np.ndarray) -> int:
    """Pixel centres on or inside the convex hull of the edge midpoints of the pixels (rows, cols)."""
    from scipy.spatial import ConvexHull

    pts = np.unique((np.stack([rows, cols], 1)[:, None, :] + _DIAMOND).reshape(-1, 2), axis=0)
    hull = ConvexHull(pts)
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    gr, gc = np.mgrid[r0 : r1 + 1, c0 : c1 + 1]
    g = np.stack([gr.ravel(), gc.ravel()], 1).astype(np.float64)
    inside = np.all(g @ hull.equations[:, :2].T + hull.equations[:, 2] <= _TOL, axis=1)
    return int(inside.sum())


def _boundary(obj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first and last pixel of each row and column of a bool crop: they span the same hull as all pixels."""
    keep = np.zeros_like(obj)
    rows = np.nonzero(obj.any(1))[0]
    first = obj.argmax(1)
    last = obj.shape[1] - 1 - obj[:, ::-1].argmax(1)
    keep[rows, first[rows]] = keep[rows, last[rows]] = True
    cols = np.nonzero(obj.any(0))[0]
    top = obj.argmax(0)
    bottom = obj.shape[0] - 1 - obj[::-1, :].argmax(0)
    keep[top[cols], cols] = keep[bottom[cols], cols] = True
    return np.nonzero(keep)


def object_solidities(plane: np.ndarray, min_size: int = MIN_SIZE, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Areas and solidities of the connected components of one 2D binary plane larger than `min_size` pixels."""
    import cc3d

    labels = cc3d.connected_components(np.ascontiguousarray(plane, dtype=bool), connectivity=connectivity)
    if not labels.any():
        return np.zeros(0, np.int64), np.zeros(0)
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    from scipy.ndimage import find_objects

    out_area, out_sol = [], []
    for i, sl in enumerate(find_objects(labels), start=1):
        if sl is None or areas[i] <= min_size:
            continue
        obj = labels[sl] == i
        r, c = _boundary(obj)
        out_area.append(int(areas[i]))
        out_sol.append(areas[i] / _convex_area(r + sl[0].start, c + sl[1].start))
    return np.asarray(out_area, np.int64), np.asarray(out_sol, np.float64)


def shape_stats(stack: np.ndarray, min_size: int = MIN_SIZE, connectivity: int = 8) -> ShapeStats:
    """ShapeStats of a binary (Y,X) plane or (Z,Y,X) stack, objects taken per z slice."""
    stack = np.asarray(stack)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise ValueError(f"expected a (Y,X) plane or a (Z,Y,X) stack, got shape {stack.shape}")
    total = ShapeStats()
    for plane in stack:
        areas, sol = object_solidities(plane, min_size, connectivity)
        total = total + ShapeStats(len(sol), float(sol.sum()), int(areas.sum()), int(plane.size))
    return total
