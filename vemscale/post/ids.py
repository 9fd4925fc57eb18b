"""Global object ids from per-block components: union-find over face pairs, then ranks of the objects' keys.

Input per block (in block-id order): its components' keys (sorted), voxel counts and classes; and the face
pairs of all blocks. Components joined by pairs form one object whose key is the smallest (its first voxel in
the whole volume). Objects below `min_voxels` are dropped; the rest get ids 1..N in key order, which is the
order a whole-volume scan meets them, so the result equals a whole-volume cc3d, whatever the blocks.

Memory: the union-find holds the components that touch a face (O(face voxels), never O(voxels)); ranking
holds the keys of one slab of blocks (blocks sharing a z position on the grid) at a time, because keys of
blocks in one slab interleave in C order while slabs follow one another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

__all__ = ["Crossing", "resolve_pairs", "assign_ids", "encode_components", "decode_components", "encode_map",
           "decode_map"]


def encode_components(keys: np.ndarray, counts: np.ndarray, cls: np.ndarray) -> bytes:
    return np.int64(len(keys)).tobytes() + keys.astype(np.uint64).tobytes() + counts.astype(np.int64).tobytes() \
        + cls.astype(np.uint8).tobytes()


def decode_components(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = int(np.frombuffer(data[:8], np.int64)[0]) if data else 0
    keys = np.frombuffer(data[8: 8 + 8 * n], np.uint64)
    counts = np.frombuffer(data[8 + 8 * n: 8 + 16 * n], np.int64)
    cls = np.frombuffer(data[8 + 16 * n: 8 + 17 * n], np.uint8)
    return keys, counts, cls


encode_map = encode_components  # a block's map: keys -> final ids (uint64 in the counts' place), classes
decode_map = decode_components


@dataclass
class Crossing:
    """Components that touch a face: key -> root key (the object's smallest), and each root's voxel total."""

    keys: np.ndarray  # sorted uint64
    roots: np.ndarray  # root of keys[i]
    root_keys: np.ndarray  # sorted unique roots
    root_voxels: np.ndarray  # voxels of root_keys[j]'s object (after `add_counts`)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(is crossing, root) for each key."""
        pos = np.searchsorted(self.keys, keys)
        pos_c = np.minimum(pos, max(len(self.keys) - 1, 0))
        hit = (pos < len(self.keys)) & (self.keys[pos_c] == keys) if len(self.keys) else np.zeros(len(keys), bool)
        root = np.where(hit, self.roots[pos_c] if len(self.keys) else keys, keys)
        return hit, root

    def root_index(self, roots: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.root_keys, roots)

    def add_counts(self, keys: np.ndarray, counts: np.ndarray) -> None:
        hit, root = self.lookup(keys)
        if hit.any():
            np.add.at(self.root_voxels, self.root_index(root[hit]), counts[hit])


def resolve_pairs(pairs: Iterable[np.ndarray]) -> Crossing:
    """Union-find (connected components of the pair graph) over all face pairs; root = smallest key."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    parts = [np.asarray(p, np.uint64).reshape(-1, 2) for p in pairs]
    allp = np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)
    if not len(allp):
        e = np.zeros(0, np.uint64)
        return Crossing(e, e, e, np.zeros(0, np.int64))
    nodes, inv = np.unique(allp.ravel(), return_inverse=True)
    inv = inv.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(inv), np.int8), (inv[:, 0], inv[:, 1])), shape=(len(nodes), len(nodes)))
    ncomp, comp = connected_components(graph, directed=False)
    root_of_comp = np.full(ncomp, np.iinfo(np.uint64).max, np.uint64)
    np.minimum.at(root_of_comp, comp, nodes)  # nodes are sorted: the first seen is the smallest anyway
    roots = root_of_comp[comp]
    root_keys = np.unique(roots)
    return Crossing(nodes, roots, root_keys, np.zeros(len(root_keys), np.int64))


def assign_ids(components: Iterable[tuple[int, bytes]], blocks_per_slab: int, crossing: Crossing,
               min_voxels: int = 0) -> Iterator[tuple[int, bytes]]:
    """Yield (block id, encoded map keys -> ids, classes) for every block with components, slab by slab.

    `components` yields (block id, encode_components(...)) in increasing block id; `crossing` has its
    `root_voxels` filled (`Crossing.add_counts` over all blocks). The number of objects is the largest id in
    the maps. Components of dropped objects map to 0."""
    next_id = 0
    root_ids = np.zeros(len(crossing.root_keys), np.uint64)

    def flush(slab: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> Iterator[tuple[int, bytes]]:
        nonlocal next_id
        info = []
        own_roots = []
        for block, keys, counts, cls in slab:
            hit, root = crossing.lookup(keys)
            voxels = counts.copy()
            if hit.any():
                voxels[hit] = crossing.root_voxels[crossing.root_index(root[hit])]
            keep = voxels >= min_voxels
            is_root = root == keys
            info.append((block, keys, cls, hit, root, keep, is_root))
            own_roots.append(keys[is_root & keep])
        slab_roots = np.sort(np.concatenate(own_roots)) if own_roots else np.zeros(0, np.uint64)
        slab_ids = np.arange(next_id + 1, next_id + 1 + len(slab_roots), dtype=np.uint64)
        next_id += len(slab_roots)
        if len(crossing.root_keys) and len(slab_roots):  # record the ids of crossing objects rooted in this slab
            is_cross_root = np.isin(slab_roots, crossing.root_keys, assume_unique=True)
            root_ids[crossing.root_index(slab_roots[is_cross_root])] = slab_ids[is_cross_root]
        for block, keys, cls, hit, root, keep, is_root in info:
            ids = np.zeros(len(keys), np.uint64)
            mine = is_root & keep
            ids[mine] = slab_ids[np.searchsorted(slab_roots, keys[mine])]
            other = hit & ~is_root & keep
            if other.any():
                ids[other] = root_ids[crossing.root_index(root[other])]
            yield block, encode_map(keys, ids, cls)

    slab: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    current = None
    for block, data in components:
        keys, counts, cls = decode_components(data)
        s = block // blocks_per_slab
        if current is not None and s != current:
            yield from flush(slab)
            slab = []
        current = s
        if len(keys):
            slab.append((block, keys, counts, cls))
    if slab:
        yield from flush(slab)
