"""Shape statistics of the objects of a binary stack, measured slice by slice: the morphology priors with which
Franco-Barranco et al. 2022 (danifranco/EM_domain_adaptation, Attention_Y-Net `morphology_analysis`) choose a
checkpoint without target labels.

Objects: with `objects="stack"` (the reference's way) the stack is labelled in 3D (26-connected, as scikit-image
`label` does on a 3D array) and each label's pixels in each slice are one region, as `regionprops` of that slice
sees it (two pieces of one 3D object in a slice are one region); with `objects="slice"` each slice's own
8-connected components. Regions of `min_size` pixels or fewer are ignored. Solidity is a region's area over its
convex-hull area, counted as scikit-image counts it (the hull of the pixels' edge midpoints, pixel centres on
or inside it), so a value here equals `regionprops(...).solidity`; the area ratio of a region is its area over
its slice's area. `ShapeStats` add up across slices and blocks, so a sample of any size is summarised in O(1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ShapeStats", "shape_stats", "object_solidities", "region_solidities", "MIN_SIZE"]

MIN_SIZE = 10  # regions of <= 10 pixels are ignored (EM_domain_adaptation morphology_analysis: pixels_to_th = 10)
_DIAMOND = np.array([[-0.5, 0.0], [0.5, 0.0], [0.0, -0.5], [0.0, 0.5]])  # edge midpoints of a pixel
_TOL = 1e-9  # a pixel centre on a hull edge counts as inside (scikit-image includes borders)


@dataclass
class ShapeStats:
    """Sums over regions and pixels; `mean_solidity` and `mean_area_ratio` are the reference's two priors."""

    objects: int = 0  # regions kept (larger than min_size)
    solidity_sum: float = 0.0
    area_ratio_sum: float = 0.0  # sum over regions of area / slice area
    foreground: int = 0  # pixels of the kept regions
    pixels: int = 0  # all pixels seen

    def __add__(self, other: "ShapeStats") -> "ShapeStats":
        return ShapeStats(self.objects + other.objects, self.solidity_sum + other.solidity_sum,
                          self.area_ratio_sum + other.area_ratio_sum, self.foreground + other.foreground,
                          self.pixels + other.pixels)

    @property
    def mean_solidity(self) -> float:
        """Mean solidity over all objects; 0 when there are none (no objects is as far from a prior as it gets)."""
        return self.solidity_sum / self.objects if self.objects else 0.0

    @property
    def mean_area_ratio(self) -> float:
        """Mean over regions of area / slice area (the reference's "ratio" prior); 0 without regions."""
        return self.area_ratio_sum / self.objects if self.objects else 0.0

    @property
    def foreground_ratio(self) -> float:
        return self.foreground / self.pixels if self.pixels else 0.0

    def to_dict(self) -> dict:
        return {"objects": self.objects, "mean_solidity": self.mean_solidity, "mean_area_ratio": self.mean_area_ratio,
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


def region_solidities(labels: np.ndarray, min_size: int = MIN_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Areas and solidities of the regions (label values) of one 2D label image larger than `min_size` pixels."""
    from scipy.ndimage import find_objects

    labels = np.asarray(labels)
    if not labels.any():
        return np.zeros(0, np.int64), np.zeros(0)
    import fastremap

    labels, _ = fastremap.renumber(labels, in_place=False)  # 3D ids -> 1..n within this slice
    areas = np.bincount(labels.ravel())
    out_area, out_sol = [], []
    for i, sl in enumerate(find_objects(labels), start=1):
        if sl is None or areas[i] <= min_size:
            continue
        r, c = _boundary(labels[sl] == i)
        out_area.append(int(areas[i]))
        out_sol.append(areas[i] / _convex_area(r + sl[0].start, c + sl[1].start))
    return np.asarray(out_area, np.int64), np.asarray(out_sol, np.float64)


def object_solidities(plane: np.ndarray, min_size: int = MIN_SIZE, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Areas and solidities of the connected components of one 2D binary plane larger than `min_size` pixels."""
    import cc3d

    return region_solidities(cc3d.connected_components(np.ascontiguousarray(plane, dtype=bool),
                                                       connectivity=connectivity), min_size)


def shape_stats(stack: np.ndarray, min_size: int = MIN_SIZE, objects: str = "stack") -> ShapeStats:
    """ShapeStats of a binary (Y,X) plane or contiguous (Z,Y,X) stack, regions measured per z slice."""
    import cc3d

    stack = np.asarray(stack)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise ValueError(f"expected a (Y,X) plane or a (Z,Y,X) stack, got shape {stack.shape}")
    if objects not in ("stack", "slice"):
        raise ValueError(f"objects must be 'stack' or 'slice', got {objects!r}")
    binary = np.ascontiguousarray(stack, dtype=bool)
    labels = cc3d.connected_components(binary, connectivity=26) if objects == "stack" else None
    total = ShapeStats()
    for z in range(binary.shape[0]):
        if labels is not None:
            areas, sol = region_solidities(labels[z], min_size)
        else:
            areas, sol = object_solidities(binary[z], min_size)
        n = binary[z].size
        total = total + ShapeStats(len(sol), float(sol.sum()), float((areas / n).sum()), int(areas.sum()), int(n))
    return total
