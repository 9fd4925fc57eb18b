"""Per-object morphometrics, reduced blockwise: partial rows per block, merged per object, derived columns.

Each block contributes one partial row per object it holds (or whose surface passes through the cubes it
owns): voxel count, bounding box, coordinate sums, surface area and the corners of its convex hull there.
Partials of one object add up exactly: voxel counts and sums partition the voxels; the surface is the area of
the marching-cubes mesh of the block read with one extra voxel on its high sides (neighbouring blocks' cubes
tile space, as for meshes); the convex hull of the object is the hull of its parts' hull corners. Nothing here
holds more than one block, or more than one object's partial rows.

Columns of the final table (one row per object; voxel coordinates z,y,x as numpy indexes, nm as Neuroglancer
draws voxels: voxel i spans [i, i+1) * voxel size):
  id, class, voxels, volume_nm3, surface_nm2, sphericity, convex_volume_nm3, solidity,
  bbox_z0, bbox_y0, bbox_x0, bbox_z1, bbox_y1, bbox_x1 (half-open, voxels), centroid_z, centroid_y, centroid_x
  (voxels, as scikit-image regionprops), centroid_x_nm, centroid_y_nm, centroid_z_nm, touches_edge, blocks.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["block_partials", "partials_to_table", "finish_rows", "surface_areas", "hull_corners", "TABLE_COLUMNS"]

TABLE_COLUMNS = ["id", "class", "voxels", "volume_nm3", "surface_nm2", "sphericity", "convex_volume_nm3", "solidity",
                 "bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1", "centroid_z", "centroid_y",
                 "centroid_x", "centroid_x_nm", "centroid_y_nm", "centroid_z_nm", "touches_edge", "blocks"]
FEW_CORNERS = 64  # an object part with at most this many run corners keeps them all (no qhull call)


def surface_areas(seg_ext: np.ndarray, origin: Sequence[int], volume_shape: Sequence[int],
                  voxel_size_xyz: Sequence[float]) -> dict[int, float]:
    """Mesh area (nm^2) per label of the cubes a block owns; `seg_ext` is the block's core plus one voxel on
    each high side the volume has (z,y,x), starting at `origin`. Closed at the volume's edges."""
    from vemscale.post.mesh import block_meshes

    pad_low = [o == 0 for o in origin][::-1]
    pad_high = [o + n == s for o, n, s in zip(origin, seg_ext.shape, volume_shape)][::-1]
    out: dict[int, float] = {}
    # block-local coordinates (offset 0): float32 vertices far from the origin would lose area precision
    for label, mesh in block_meshes(seg_ext.T, voxel_size_xyz, (0, 0, 0), pad_low, pad_high):
        tri = mesh.vertices.astype(np.float64)[mesh.faces]
        out[label] = 0.5 * float(np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum())
    return out


def _runs(core: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal non-zero labels along x: (label, z, y, x_start) and x_stop (exclusive)."""
    c = core
    start = np.ones(c.shape, bool)
    start[..., 1:] = c[..., 1:] != c[..., :-1]
    stop = np.ones(c.shape, bool)
    stop[..., :-1] = c[..., :-1] != c[..., 1:]
    start &= c != 0
    stop &= c != 0
    zs, ys, xs = np.nonzero(start)
    xe = np.nonzero(stop)[2] + 1
    return c[zs, ys, xs], zs, ys, np.stack([xs, xe])


def hull_corners(points: np.ndarray, voxel_size_zyx: Sequence[float]) -> np.ndarray:
    """The subset of integer corner points (n, 3) z,y,x that spans their convex hull (all of them when few)."""
    if len(points) <= FEW_CORNERS:
        return points
    from scipy.spatial import ConvexHull

    try:
        return points[ConvexHull(points * np.asarray(voxel_size_zyx, np.float64)).vertices]
    except Exception:  # degenerate (cannot happen for voxel cubes, but never lose the points)
        return points


def block_partials(seg_ext: np.ndarray, core_shape: Sequence[int], origin: Sequence[int],
                   volume_shape: Sequence[int], voxel_size_xyz: Sequence[float], block: int,
                   classes: dict[int, int]) -> dict[str, Any]:
    """Partial rows of one block: `seg_ext` = final ids of the core plus one voxel on the high sides (z,y,x)."""
    import fastremap

    core = np.ascontiguousarray(seg_ext[: core_shape[0], : core_shape[1], : core_shape[2]])
    areas = surface_areas(seg_ext, origin, volume_shape, voxel_size_xyz)
    ids, counts = fastremap.unique(core, return_counts=True)
    keep = ids != 0
    ids, counts = ids[keep].astype(np.uint64), counts[keep].astype(np.int64)
    extra = np.asarray(sorted(set(areas) - set(int(i) for i in ids)), np.uint64)  # surface only (halo objects)
    all_ids = np.concatenate([ids, extra])
    n, m = len(ids), len(all_ids)
    lo = np.full((m, 3), np.iinfo(np.int64).max, np.int64)
    hi = np.full((m, 3), np.iinfo(np.int64).min, np.int64)
    sums = np.zeros((m, 3), np.float64)
    corners: list[np.ndarray] = [np.zeros((0, 3), np.int64)] * m
    if n:
        labels, zs, ys, xse = _runs(core)
        pos = np.searchsorted(ids, labels)
        xs, xe = xse
        length = (xe - xs).astype(np.float64)
        o = np.asarray(origin, np.int64)
        for axis, vals_lo, vals_hi in ((0, zs, zs + 1), (1, ys, ys + 1), (2, xs, xe)):
            np.minimum.at(lo[:, axis], pos, vals_lo + o[axis])
            np.maximum.at(hi[:, axis], pos, vals_hi + o[axis])
        np.add.at(sums[:, 0], pos, (zs + o[0]) * length)
        np.add.at(sums[:, 1], pos, (ys + o[1]) * length)
        np.add.at(sums[:, 2], pos, (xs + xe - 1) / 2.0 * length + o[2] * length)  # sum of x over the run
        # corners of each run's voxels: z, z+1 x y, y+1 x x_start, x_stop (global integer corner coordinates)
        order = np.argsort(pos, kind="stable")
        pos_sorted = pos[order]
        cuts = np.flatnonzero(np.diff(pos_sorted)) + 1
        dz = np.array([0, 0, 0, 0, 1, 1, 1, 1])
        dy = np.array([0, 0, 1, 1, 0, 0, 1, 1])
        pick = np.array([0, 1, 0, 1, 0, 1, 0, 1])
        vsz = tuple(float(v) for v in voxel_size_xyz[::-1])
        for group in np.split(order, cuts):
            k = int(pos[group[0]])
            z, y = zs[group], ys[group]
            xx = np.stack([xs[group], xe[group]], axis=1)
            pts = np.stack([(z[:, None] + dz).ravel(), (y[:, None] + dy).ravel(),
                            xx[:, pick].ravel()], axis=1).astype(np.int64) + o
            corners[k] = hull_corners(np.unique(pts, axis=0), vsz)
    return {
        "id": all_ids, "block": np.full(m, int(block), np.int64),
        "class": np.asarray([int(classes.get(int(i), 0)) for i in all_ids], np.int64),
        "voxels": np.concatenate([counts, np.zeros(m - n, np.int64)]),
        "lo": lo, "hi": hi, "sums": sums,
        "surface": np.asarray([areas.get(int(i), 0.0) for i in all_ids], np.float64),
        "corners": corners,
    }


def partials_to_table(part: dict[str, Any]) -> Any:
    """A block's partials as an Arrow table (corners as a flat int64 list per row)."""
    import pyarrow as pa

    cols: dict[str, Any] = {"id": pa.array(part["id"], pa.uint64()), "block": part["block"], "class": part["class"],
                            "voxels": part["voxels"], "surface": part["surface"]}
    for a, name in enumerate("zyx"):
        cols[f"lo_{name}"] = part["lo"][:, a]
        cols[f"hi_{name}"] = part["hi"][:, a]
        cols[f"sum_{name}"] = part["sums"][:, a]
    cols["corners"] = pa.array([c.ravel() for c in part["corners"]], pa.list_(pa.int64()))
    return pa.table(cols)


def finish_rows(merged: dict[str, np.ndarray], voxel_size_xyz: Sequence[float], volume_shape: Sequence[int],
                class_names: Sequence[str]) -> dict[str, Any]:
    """Merged raw sums (columns) -> the table's columns (module doc)."""
    vx, vy, vz = (float(v) for v in voxel_size_xyz)
    voxels = np.asarray(merged["voxels"], np.float64)
    volume = voxels * vx * vy * vz
    surface = np.asarray(merged["surface"], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sphericity = np.where(surface > 0, math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / surface, np.nan)
        hull = np.asarray(merged["hull_nm3"], np.float64)
        solidity = np.where(hull > 0, volume / hull, np.nan)
        cz, cy, cx = (np.asarray(merged[f"sum_{a}"], np.float64) / voxels for a in "zyx")
    lo = np.stack([np.asarray(merged[f"lo_{a}"], np.int64) for a in "zyx"], axis=1)
    hi = np.stack([np.asarray(merged[f"hi_{a}"], np.int64) for a in "zyx"], axis=1)
    edge = (lo == 0).any(axis=1) | (hi == np.asarray(volume_shape, np.int64)).any(axis=1)
    cls = np.asarray(merged["class"], np.int64)
    return {
        "id": np.asarray(merged["id"], np.uint64),
        "class": np.asarray([class_names[c - 1] if 0 < c <= len(class_names) else str(c) for c in cls], object),
        "voxels": np.asarray(merged["voxels"], np.int64), "volume_nm3": volume, "surface_nm2": surface,
        "sphericity": sphericity, "convex_volume_nm3": hull, "solidity": solidity,
        "bbox_z0": lo[:, 0], "bbox_y0": lo[:, 1], "bbox_x0": lo[:, 2],
        "bbox_z1": hi[:, 0], "bbox_y1": hi[:, 1], "bbox_x1": hi[:, 2],
        "centroid_z": cz, "centroid_y": cy, "centroid_x": cx,
        "centroid_x_nm": (cx + 0.5) * vx, "centroid_y_nm": (cy + 0.5) * vy, "centroid_z_nm": (cz + 0.5) * vz,
        "touches_edge": edge, "blocks": np.asarray(merged["blocks"], np.int64),
    }
