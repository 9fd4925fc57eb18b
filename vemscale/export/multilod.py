"""Neuroglancer's multi-resolution mesh format (`neuroglancer_multilod_draco`): Draco fragments, an object's
manifest, and the mesh directory's info.

One level of detail whose octree nodes are the mesh blocks (boxes of the block shape in nm, the grid shifted by
half a voxel so a block's marching-cubes cells fill its node exactly): an object is one fragment per block it
occurs in, so no piece of work ever holds a whole large object, and vertices are quantised to `bits`-bit integers
over their node (16 bits: 1/65,535 of a block, 0.07 nm for 256 voxels of 18.4 nm), Draco-encoded with its own
quantisation set to keep those integers exactly (Neuroglancer reads the integers). Stored-model coordinates are
nm, as the layer's (identity transform).
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Sequence

import numpy as np

__all__ = ["MULTILOD", "multilod_info", "node_grid", "encode_fragment", "morton", "encode_manifest"]

MULTILOD = "neuroglancer_multilod_draco"

log = logging.getLogger(__name__)


def multilod_info(sharding: dict[str, Any], bits: int = 16) -> dict[str, Any]:
    """The mesh directory's `info`: vertex quantisation bits, nm model space, the shard layout."""
    if bits not in (10, 16):
        raise ValueError(f"vertex_quantization_bits must be 10 or 16, not {bits}")
    return {"@type": MULTILOD, "vertex_quantization_bits": bits,
            "transform": [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            "lod_scale_multiplier": 1.0, "sharding": sharding}


def node_grid(block_xyz: Sequence[int], voxel_xyz: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(chunk_shape, grid_origin) in nm, float32 as stored: node n covers [(n - 1) * block + 0.5, n * block + 0.5)
    voxels, so block k's own cells are node k + 1 and a padded low edge's caps node 0."""
    block = np.asarray(block_xyz, np.float64) * np.asarray(voxel_xyz, np.float64)
    origin = (0.5 * np.asarray(voxel_xyz, np.float64)) - block
    return block.astype(np.float32), origin.astype(np.float32)


def encode_fragment(vertices: np.ndarray, faces: np.ndarray, node_xyz: Sequence[int], chunk_shape: np.ndarray,
                    grid_origin: np.ndarray, bits: int = 16) -> bytes | None:
    """Draco bytes of one piece (vertices in nm) in octree node `node_xyz`; None when nothing drawable is left
    (faces collapsing in quantisation are dropped; a mesh Draco refuses is logged and skipped)."""
    import DracoPy

    top = float(2**bits - 1)
    lo = grid_origin.astype(np.float64) + np.asarray(node_xyz, np.float64) * chunk_shape.astype(np.float64)
    q = np.clip(np.rint((np.asarray(vertices, np.float64) - lo) / chunk_shape.astype(np.float64) * top), 0, top)
    f = np.asarray(faces, np.int64).reshape(-1, 3)
    for attempt in range(2):
        if attempt:  # Draco refused it: merge vertices quantised onto one position, drop the faces that collapse
            _, same = np.unique(q[:, 0] * 2.0**32 + q[:, 1] * 2.0**16 + q[:, 2], return_inverse=True)
            f = same.reshape(-1)[f]
        good = (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])
        if not good.all():
            f = f[good]
        if not len(f):
            return None
        try:
            return bytes(DracoPy.encode(q.astype(np.float32), f.astype(np.uint32), quantization_bits=bits,
                                        quantization_range=top, quantization_origin=[0.0, 0.0, 0.0],
                                        compression_level=1))
        except DracoPy.EncodingFailedException as err:
            failure = err
    log.warning("a mesh piece of %d triangles in node %s could not be Draco-encoded (%s); skipped",
                len(f), list(node_xyz), failure)
    return None


def morton(positions: np.ndarray) -> np.ndarray:
    """Z-curve codes of x,y,z node positions (x in the lowest bit, as Neuroglancer orders octree children)."""
    p = np.asarray(positions, np.uint64).reshape(-1, 3)
    code = np.zeros(len(p), np.uint64)
    for bit in range(21):
        for axis in range(3):
            code |= ((p[:, axis] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(3 * bit + axis)
    return code


def encode_manifest(chunk_shape: np.ndarray, grid_origin: np.ndarray, positions: np.ndarray, sizes: np.ndarray,
                    lod_scale: float) -> bytes:
    """One object's manifest: a single level of detail whose fragments sit at `positions` (x,y,z node indices, in
    Z-curve order) with `sizes` bytes each, in that order in the fragment data."""
    positions = np.asarray(positions, "<u4").reshape(-1, 3)
    return (np.asarray(chunk_shape, "<f4").tobytes() + np.asarray(grid_origin, "<f4").tobytes()
            + struct.pack("<I", 1) + struct.pack("<f", lod_scale) + struct.pack("<3f", 0.0, 0.0, 0.0)
            + struct.pack("<I", len(positions)) + np.ascontiguousarray(positions.T).tobytes()
            + np.asarray(sizes, "<u4").tobytes())
