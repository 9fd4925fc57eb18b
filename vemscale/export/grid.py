"""Task boxes: a regular grid of write-chunk-aligned boxes, each derived from its index (no list of boxes is held).

A task box is a whole multiple of the target store's write chunk (a shard, for sharded layers), grown until it
holds about `target_voxels`, so each task writes whole chunks/shards and no two tasks share one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

Box = tuple[slice, ...]


@dataclass(frozen=True)
class BoxGrid:
    """Boxes of `box_shape` tiling `shape` (the last box along an axis is clipped to the volume)."""

    shape: tuple[int, ...]
    box_shape: tuple[int, ...]

    @classmethod
    def aligned(cls, shape: Sequence[int], write_chunk: Sequence[int], target_voxels: int = 2**24) -> "BoxGrid":
        """Boxes that are whole multiples of `write_chunk`, doubled along their smallest extent up to ~target."""
        shape = tuple(int(s) for s in shape)
        box = [int(min(c, s)) if c else s for c, s in zip(write_chunk, shape)]
        while math.prod(box) * 2 <= target_voxels:
            grow = [i for i in range(len(box)) if box[i] < shape[i]]
            if not grow:
                break
            i = min(grow, key=lambda k: box[k])
            box[i] *= 2
        return cls(shape, tuple(min(b, s) for b, s in zip(box, shape)))

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(-(-s // b) for s, b in zip(self.shape, self.box_shape))

    @property
    def num_boxes(self) -> int:
        return math.prod(self.grid_shape)

    def box(self, i: int) -> Box:
        """The box of task `i` (C order over the grid)."""
        if not 0 <= i < self.num_boxes:
            raise IndexError(f"box {i} out of range for {self.num_boxes} boxes")
        out = []
        for axis in reversed(range(len(self.shape))):
            i, k = divmod(i, self.grid_shape[axis])
            lo = k * self.box_shape[axis]
            out.append(slice(lo, min(lo + self.box_shape[axis], self.shape[axis])))
        return tuple(reversed(out))


def box_to_list(box: Box) -> list[list[int]]:
    """A box as [[start, stop], ...] (JSON-friendly, for task arguments)."""
    return [[int(s.start), int(s.stop)] for s in box]


def list_to_box(pairs: Sequence[Sequence[int]]) -> Box:
    return tuple(slice(int(a), int(b)) for a, b in pairs)
