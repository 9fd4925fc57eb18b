"""Per-label voxel counts of a block, merged across blocks, and the volumes they make in cubic micrometres."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["label_counts", "merge_counts", "volumes_um3"]


def label_counts(labels: np.ndarray) -> dict[int, int]:
    """Voxels per non-zero label of one block."""
    ids, counts = np.unique(np.asarray(labels).ravel(), return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts) if i != 0}


def merge_counts(total: dict[int, int], part: Mapping[int, int]) -> dict[int, int]:
    """Add a block's counts into `total` (in place) and return it."""
    for k, v in part.items():
        total[int(k)] = total.get(int(k), 0) + int(v)
    return total


def volumes_um3(counts: Mapping[int, int], voxel_size_xyz: Sequence[float]) -> dict[int, float]:
    """Voxel counts -> volumes in um^3 (voxel size in nm)."""
    voxel_um3 = float(np.prod([float(v) for v in voxel_size_xyz])) * 1e-9
    return {int(k): int(v) * voxel_um3 for k, v in counts.items()}
