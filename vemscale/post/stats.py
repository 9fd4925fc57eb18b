"""Per-label voxel counts of a block, merged across blocks, and the volumes they make in cubic micrometres."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["label_counts", "merge_counts", "volumes_um3", "encode_counts", "decode_counts"]


def label_counts(labels: np.ndarray) -> dict[int, int]:
    """Voxels per non-zero label of one block (background dropped before the sort: EM labels are mostly 0)."""
    a = np.asarray(labels)
    ids, counts = np.unique(a[a != 0], return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts)}


def merge_counts(total: dict[int, int], part: Mapping[int, int]) -> dict[int, int]:
    """Add a block's counts into `total` (in place) and return it."""
    for k, v in part.items():
        total[int(k)] = total.get(int(k), 0) + int(v)
    return total


def volumes_um3(counts: Mapping[int, int], voxel_size_xyz: Sequence[float]) -> dict[int, float]:
    """Voxel counts -> volumes in um^3 (voxel size in nm)."""
    voxel_um3 = float(np.prod([float(v) for v in voxel_size_xyz])) * 1e-9
    return {int(k): int(v) * voxel_um3 for k, v in counts.items()}


def encode_counts(counts: Mapping[int, int]) -> bytes:
    """Label counts as bytes (uint64 ids then int64 counts), for a block's ledger payload."""
    ids = np.fromiter((int(k) for k in counts), np.uint64, len(counts))
    values = np.fromiter((int(v) for v in counts.values()), np.int64, len(counts))
    return np.int64(len(counts)).tobytes() + ids.tobytes() + values.tobytes()


def decode_counts(data: bytes) -> dict[int, int]:
    n = int(np.frombuffer(data[:8], np.int64)[0])
    ids = np.frombuffer(data[8 : 8 + 8 * n], np.uint64)
    values = np.frombuffer(data[8 + 8 * n : 8 + 16 * n], np.int64)
    return {int(i): int(v) for i, v in zip(ids, values)}
