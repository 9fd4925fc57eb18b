"""Near-duplicate removal over 64-bit patch hashes: CEM500K's greedy grouping, vectorised.

CEM500K (`dataset/deduplicated/deduplicate.py`, `patchify3d.py`): shuffle the patches, take the first one left
as an exemplar, put every patch left within a Hamming distance of 12 in its group, keep the exemplar only, and
repeat until none is left. The cost is O(N x groups) bit comparisons (numpy popcount over what is left), so
~1e5 patches per call take seconds; the engine calls it per source (in parallel) and once across the survivors.
"""

from __future__ import annotations

import numpy as np

from vemscale.curate.patches import hamming

MAX_DISTANCE = 12  # bits of 64 (CEM500K dataset/deduplicated/deduplicate.py: -d default 12; patchify3d.py min_distance)


def exemplars(hashes: np.ndarray, max_distance: int = MAX_DISTANCE, seed: int = 0) -> np.ndarray:
    """For each hash, the index of its group's exemplar (its own index when it is kept)."""
    h = np.asarray(hashes, np.uint64)
    n = h.size
    order = np.random.default_rng([seed, 11]).permutation(n)
    hs = h[order]
    owner = np.empty(n, np.int64)
    left = np.arange(n)
    while left.size:
        ref = left[0]
        near = hamming(hs[left], hs[ref]) <= max_distance
        owner[left[near]] = ref
        left = left[~near]
    out = np.empty(n, np.int64)
    out[order] = order[owner]
    return out
