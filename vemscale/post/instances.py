"""Instances of one block: class masks from probabilities, connected components with block-independent keys,
and the label pairs that connect a block's components to its neighbours' across the block faces.

A component's *key* is the global C-order linear index of its first voxel in the block, plus one. Keys depend
only on where a component is, not on how the volume is cut, and the smallest key of a set of components
joined across faces is the object's first voxel in the whole volume: sorting objects by it is the order in
which a whole-volume scan (cc3d's) meets them, so ranks of those keys are the final, consecutive ids.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

__all__ = ["class_image", "label_block", "keys_of", "face_pairs", "neighbourhood"]


def class_image(probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """(C, z, y, x) uint8 probabilities (p * 255) of the C requested classes -> uint8 class index 1..C (0 = none).

    A voxel belongs to class c when p_c >= its threshold; where several classes pass, the most probable wins
    (the first on ties), so classes never overlap."""
    probs = np.asarray(probs)
    if probs.ndim != 4 or probs.shape[0] != len(thresholds):
        raise ValueError(f"expected {len(thresholds)} probability channels, got shape {probs.shape}")
    cut = np.asarray([np.ceil(float(t) * 255.0 - 1e-6) for t in thresholds], np.float32)  # p*255 >= t*255
    if probs.shape[0] == 1:
        return (probs[0] >= cut[0]).astype(np.uint8)
    passing = probs >= cut.reshape(-1, 1, 1, 1).astype(probs.dtype)
    best = np.argmax(np.where(passing, probs.astype(np.int16), -1), axis=0)
    out = (best + 1).astype(np.uint8)
    out[~passing.any(axis=0)] = 0
    return out


def label_block(classes: np.ndarray, origin: Sequence[int], volume_shape: Sequence[int],
                connectivity: int = 26) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Connected components of a block's class image, each labelled by its key (see module doc).

    Returns (labels uint64 of the block's shape, keys uint64 sorted, voxel counts int64, class uint8), one
    entry per component. Components of different classes never join (cc3d's multi-label mode)."""
    import cc3d

    local = cc3d.connected_components(np.ascontiguousarray(classes), connectivity=connectivity)
    return keys_of(local, classes, origin, volume_shape)


def keys_of(local: np.ndarray, classes: np.ndarray, origin: Sequence[int],
            volume_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Relabel local labels 1..n (any order) by their keys; returns (labels, keys, counts, class) as label_block."""
    flat = np.ascontiguousarray(local).ravel()
    n = int(flat.max(initial=0))
    if n == 0:
        empty = np.zeros(0, np.uint64)
        return np.zeros(local.shape, np.uint64), empty, np.zeros(0, np.int64), np.zeros(0, np.uint8)
    first = np.full(n + 1, flat.size, np.int64)
    nz = np.flatnonzero(flat)
    vals, idx = np.unique(flat[nz], return_index=True)  # first position of each label (C order)
    first[vals] = nz[idx]
    present = np.flatnonzero(first[1:] < flat.size) + 1
    pos = first[present]
    zz, yy, xx = np.unravel_index(pos, local.shape)
    Z, Y, X = (int(s) for s in volume_shape)
    gkey = (((zz + int(origin[0])) * Y + (yy + int(origin[1]))) * X + (xx + int(origin[2]))).astype(np.uint64) + 1
    lut = np.zeros(n + 1, np.uint64)
    lut[present] = gkey
    labels = lut[local]
    counts = np.bincount(flat, minlength=n + 1)[present].astype(np.int64)
    cls = np.ascontiguousarray(classes).ravel()[pos].astype(np.uint8)
    order = np.argsort(gkey, kind="stable")
    return labels, gkey[order], counts[order], cls[order]


def neighbourhood(connectivity: int) -> list[tuple[int, int, int]]:
    """Offsets of the 6-, 18- or 26-neighbourhood (cc3d's definitions)."""
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    limit = {6: 1, 18: 2, 26: 3}[connectivity]
    return [d for d in itertools.product((-1, 0, 1), repeat=3) if 0 < sum(map(abs, d)) <= limit]


def face_pairs(labels: np.ndarray, classes: np.ndarray, core: Sequence[slice], connectivity: int = 26) -> np.ndarray:
    """Pairs (key in the core, key outside it) of adjacent foreground voxels of the same class, across the core's faces.

    `labels`/`classes` cover the core grown by one voxel on every side the volume allows (`core` locates the
    core inside them). Returns unique uint64 pairs, shape (n, 2). Each pair across a face is found by both
    blocks that share it; duplicates vanish in the union-find."""
    shape = labels.shape
    lo = [c.start for c in core]
    hi = [c.stop for c in core]
    found = []
    for d in neighbourhood(connectivity):
        for axis in range(3):
            if d[axis] == 0:
                continue
            # core voxels on the face of `axis` that `d` leaves the core through, if the read has voxels there
            side = lo[axis] if d[axis] < 0 else hi[axis] - 1
            if not 0 <= side + d[axis] < shape[axis]:
                continue
            src = []
            for a in range(3):
                if a == axis:
                    src.append(slice(side, side + 1))
                else:  # keep the neighbour inside the read
                    s0, s1 = max(lo[a], -d[a]), min(hi[a], shape[a] - d[a])
                    src.append(slice(s0, max(s0, s1)))
            dst = tuple(slice(s.start + o, s.stop + o) for s, o in zip(src, d))
            a_lab, b_lab = labels[tuple(src)], labels[dst]
            hit = (a_lab != 0) & (b_lab != 0) & (a_lab != b_lab) & (classes[tuple(src)] == classes[dst])
            if hit.any():
                found.append(np.stack([a_lab[hit], b_lab[hit]], axis=1))
    if not found:
        return np.zeros((0, 2), np.uint64)
    return np.unique(np.concatenate(found).astype(np.uint64), axis=0)
