"""Reusable per-thread block buffers: a block task reads and downsamples into memory its thread used before.

Each new large array costs first-touch page faults: on a VM these cost more than decoding the block (a
64x512x512 uint32 read: ~22,000 faults, 0.06 CPU-s of 0.09), so block tasks that run one after another in a
worker keep one buffer per named slot, grown to the largest block seen. Memory per worker stays a function of
block size. A buffer is only valid until the same thread asks for its slot again: never return one from a task.
"""

from __future__ import annotations

import math
import threading
from typing import Sequence

import numpy as np

__all__ = ["scratch"]

_local = threading.local()


def scratch(slot: str, shape: Sequence[int], dtype: np.dtype | type | str) -> np.ndarray:
    """An uninitialised C-contiguous array of `shape` and `dtype`, backed by this thread's buffer for `slot`."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(int(s) for s in shape) * dtype.itemsize
    pool: dict[str, np.ndarray] = _local.__dict__.setdefault("pool", {})
    buf = pool.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buf = pool[slot] = np.empty(max(nbytes, 1), np.uint8)
    return buf[:nbytes].view(dtype).reshape(tuple(int(s) for s in shape))
