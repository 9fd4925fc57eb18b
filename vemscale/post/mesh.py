"""Surface meshes of the labels in one block (zmesh marching cubes), as Neuroglancer legacy mesh fragments.

Blocks of a volume are meshed independently: a block is read with one extra voxel on its high sides, so
the marching cubes of neighbouring blocks tile space without gaps or overlap, and it is padded with
background where it touches the volume's edge, so objects there are closed. Vertices are in nm in the
layer's coordinates (voxel i spans [i, i+1) * voxel size, as Neuroglancer draws it).

Simplification is meshoptimizer's (`meshopt_simplify`: quadric edge collapses to a triangle target within an
absolute error estimate in nm) with the open borders locked, so the seam vertices neighbouring fragments share stay
where they are and the weld closes the object; it costs about a sixth of zmesh's own simplifier here.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np

__all__ = ["block_meshes", "block_pieces", "simplify"]


def block_meshes(labels_xyz: np.ndarray, voxel_size_xyz: Sequence[float], offset_xyz: Sequence[int],
                 pad_low: Sequence[bool] = (False, False, False), pad_high: Sequence[bool] = (False, False, False),
                 reduction_factor: int = 0, max_error_nm: float | None = None,
                 ids: Iterable[int] | None = None) -> Iterator[tuple[int, Any]]:
    """(label, zmesh.Mesh in the volume's nm coordinates) for every non-zero label of an x,y,z block whose first
    voxel is `offset_xyz`, with a non-empty mesh.

    `pad_low`/`pad_high` say on which sides the block touches the volume's edge (closed there).
    `reduction_factor` > 1 simplifies (triangle count / factor, within `max_error_nm`)."""
    import zmesh

    pad = [(int(lo), int(hi)) for lo, hi in zip(pad_low, pad_high)]
    data = np.pad(labels_xyz, pad) if any(lo or hi for lo, hi in pad) else labels_xyz
    if data.dtype not in (np.uint32, np.uint64):
        data = data.astype(np.uint64 if data.dtype.itemsize >= 8 else np.uint32)
    data = np.asfortranarray(data)
    res = np.asarray([float(v) for v in voxel_size_xyz], dtype=np.float32)
    shift = (np.asarray(offset_xyz, dtype=np.float64) - [lo for lo, _ in pad]) * res
    mesher = zmesh.Mesher(tuple(float(r) for r in res))
    mesher.mesh(data, close=False)
    wanted = None if ids is None else {int(i) for i in ids}
    try:
        for label in mesher.ids():
            if label == 0 or (wanted is not None and int(label) not in wanted):
                mesher.erase(label)
                continue
            mesh = mesher.get(label, normals=False, reduction_factor=0, voxel_centered=True)
            mesher.erase(label)
            if reduction_factor > 1:
                mesh = simplify(mesh, int(reduction_factor), max_error_nm)
            if len(mesh.faces) == 0:
                continue
            mesh.vertices = (mesh.vertices.astype(np.float64) + shift).astype(np.float32)
            yield int(label), mesh
    finally:
        mesher.clear()


def simplify(mesh: Any, reduction_factor: int, max_error_nm: float | None) -> Any:
    """`mesh` with about 1/`reduction_factor` of its triangles while meshoptimizer's error estimate stays within
    `max_error_nm` (a quadric estimate, not a hard bound: the surface may move up to about twice it; None: only
    the triangle target limits it). Open-border vertices are kept; vertices are a subset of the input's. A mesh
    the simplifier would remove entirely (a one-voxel object) is returned as it is."""
    import meshoptimizer

    index = np.ascontiguousarray(mesh.faces, dtype=np.uint32).reshape(-1)
    if index.size == 0:
        return mesh
    vertices = np.ascontiguousarray(mesh.vertices, dtype=np.float32)
    dest = np.empty_like(index)
    options = meshoptimizer.SIMPLIFY_LOCK_BORDER | meshoptimizer.SIMPLIFY_ERROR_ABSOLUTE
    target = max(3, (index.size // 3) // reduction_factor * 3)
    n = meshoptimizer.simplify(dest, index, vertices, target_index_count=target,
                               target_error=float(max_error_nm) if max_error_nm is not None else float("inf"),
                               options=options)
    if n == 0:
        return mesh
    return _compact(vertices, dest[:n].reshape(-1, 3))


def block_pieces(labels_xyz: np.ndarray, voxel_size_xyz: Sequence[float], offset_xyz: Sequence[int],
                 pad_low: Sequence[bool] = (False, False, False), pad_high: Sequence[bool] = (False, False, False),
                 reduction_factor: int = 0, max_error_nm: float | None = None
                 ) -> Iterator[tuple[int, tuple[int, int, int], Any]]:
    """(label, node offset, mesh) of a block read with one extra voxel on its high sides: the block's own cells
    (vertices within [first voxel + 0.5, first voxel + block + 0.5) voxels: offset (0, 0, 0)) and, where the block
    is padded at the volume's low edge, the caps of that padding (vertices at the edge plane and half a voxel in:
    offset -1 on that axis). The block's own piece is simplified with its borders locked and the caps (one cell thick,
    which simplification folds onto the seam) are kept whole, so the pieces still share their seam vertices. Every
    piece then fits one node of a grid of block-sized boxes shifted by half a voxel."""
    res = np.asarray([float(v) for v in voxel_size_xyz])
    for label, mesh in block_meshes(labels_xyz, voxel_size_xyz, offset_xyz, pad_low, pad_high):
        cap = None
        if any(pad_low):  # a padded low edge's cap cells have vertices at local 0 (the edge plane) and 0.5
            local = mesh.vertices.astype(np.float64) / res - np.asarray(offset_xyz, np.float64)
            cap = (local[mesh.faces] < 0.25).any(axis=1)  # (faces, axes): a vertex on that axis' edge plane
        if cap is None or not cap.any():
            parts = [((0, 0, 0), mesh)]
        else:
            code = cap @ np.array([1, 2, 4])
            parts = [(tuple(-int(b) for b in ((c >> np.arange(3)) & 1)), _submesh(mesh, code == c))
                     for c in np.unique(code)]
        for key, part in parts:
            if reduction_factor > 1 and not any(key):  # caps stay as they are: half a voxel thick, simplifying
                part = simplify(part, int(reduction_factor), max_error_nm)  # folds them onto the seam
            if len(part.faces):
                yield label, key, part


def _submesh(mesh: Any, keep: np.ndarray) -> Any:
    """The faces `keep` of `mesh`, with only the vertices they use."""
    return _compact(mesh.vertices, mesh.faces[keep])


def _compact(vertices: np.ndarray, faces: np.ndarray) -> Any:
    """A zmesh.Mesh of `faces` holding only the vertices they use (in their original order)."""
    import zmesh

    used = np.zeros(len(vertices), bool)
    used[faces] = True
    remap = np.cumsum(used) - 1
    return zmesh.Mesh(np.ascontiguousarray(vertices[used], np.float32),
                      np.ascontiguousarray(remap[faces], np.uint32), None)
