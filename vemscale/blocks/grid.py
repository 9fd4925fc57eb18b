"""The block grid: which box of a volume block `i` covers, derived from `i` alone.

Blocks tile a region of interest (ROI) on a regular grid anchored at the ROI's start. For a stage that
writes, the ROI is aligned outwards to the output's write chunks (shards, for a sharded layer) and every
block is a whole multiple of them, so each block core covers whole chunks: parallel writers never share a
chunk, and a retried block rewrites exactly the same chunks. Nothing here enumerates blocks: a grid is a
handful of integers and `box(i)` is arithmetic, so a 1e15-voxel volume plans in microseconds.

The *core* of a block is what it writes; its *context* is the core grown by a halo (what it reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from vemscale.errors import UserError

Box = tuple[slice, slice, slice]
AXES = "zyx"


def box_shape(box: Sequence[slice]) -> tuple[int, ...]:
    return tuple(int(s.stop - s.start) for s in box)


def box_voxels(box: Sequence[slice]) -> int:
    return math.prod(box_shape(box))


def parse_roi(text: str | None, shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Parse 'z0:z1,y0:y1,x0:x1' (empty bounds mean the volume's) into (start, stop) per axis."""
    if text is None or not str(text).strip():
        return tuple((0, int(s)) for s in shape)
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3 or any(p.count(":") != 1 for p in parts):
        raise UserError(f"roi {text!r} must look like z0:z1,y0:y1,x0:x1 (bounds may be left empty, e.g. :,0:512,:)")
    out = []
    for axis, part, size in zip(AXES, parts, shape):
        lo_s, hi_s = part.split(":")
        try:
            lo = int(lo_s) if lo_s.strip() else 0
            hi = int(hi_s) if hi_s.strip() else int(size)
        except ValueError:
            raise UserError(f"roi {text!r}: bounds of {axis} must be integers, got {part!r}") from None
        if not 0 <= lo < hi <= size:
            raise UserError(f"roi {text!r}: {axis} range {lo}:{hi} is empty or outside the volume (size {size})")
        out.append((lo, hi))
    return tuple(out)


def format_roi(roi: Sequence[Sequence[int]]) -> str:
    return ",".join(f"{a}:{b}" for a, b in roi)


def _triple(name: str, value: Sequence[int]) -> tuple[int, int, int]:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be three positive integers z,y,x, got {value!r}") from None
    if len(out) != 3 or min(out) < 1:
        raise UserError(f"{name} must be three positive integers z,y,x, got {tuple(value)}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class BlockGrid:
    """A regular grid of blocks over an ROI; build it with `create` or `aligned` (which validate)."""

    volume_shape: tuple[int, int, int]
    chunk_shape: tuple[int, int, int]  # write chunks (alignment unit), clipped to the volume
    block_shape: tuple[int, int, int]  # block core, clipped to the ROI
    roi: tuple[tuple[int, int], ...]  # (start, stop) per axis, chunk-aligned (stop may be the volume end)

    @classmethod
    def create(
        cls,
        volume_shape: Sequence[int],
        chunk_shape: Sequence[int] | None,
        block_shape: Sequence[int],
        roi: str | Sequence[Sequence[int]] | None = None,
        chunk_name: str = "output chunk",
    ) -> BlockGrid:
        """Validate the geometry: block a whole multiple of the chunks, ROI aligned outwards to chunks.

        `chunk_shape=None` means no alignment (a stage that only reads)."""
        shape = tuple(int(s) for s in volume_shape)
        if len(shape) != 3 or min(shape) < 1:
            why = (": an axis is empty; check that the URL (and scale) point at the image data, not an empty or "
                   "placeholder array") if len(shape) == 3 else ""
            raise UserError(f"volume shape must be z,y,x with positive sizes, got {shape}{why}")
        chunks = tuple(min(c, s) for c, s in zip(_triple(chunk_name, chunk_shape or (1, 1, 1)), shape))
        block = _triple("block_shape", block_shape)
        raw_roi = parse_roi(roi, shape) if roi is None or isinstance(roi, str) else tuple(tuple(r) for r in roi)
        aligned = tuple(((a // c) * c, min(-(-b // c) * c, s)) for (a, b), c, s in zip(raw_roi, chunks, shape))
        extent = tuple(b - a for a, b in aligned)
        bad = [i for i in range(3) if block[i] % chunks[i] and block[i] < extent[i]]
        if bad:
            nearest = tuple(max(1, round(block[i] / chunks[i])) * chunks[i] if i in bad else block[i] for i in range(3))
            raise UserError(
                f"block_shape {block} is not a whole multiple of the {chunk_name} shape {chunks} along "
                f"{', '.join(AXES[i] for i in bad)}: a block core must cover whole chunks so parallel writers never "
                f"share one; nearest valid block_shape: {','.join(map(str, nearest))}"
            )
        block = tuple(min(b, e) for b, e in zip(block, extent))
        return cls(shape, chunks, block, aligned)  # type: ignore[arg-type]

    @classmethod
    def aligned(cls, volume_shape: Sequence[int], write_chunk: Sequence[int], target_voxels: int = 2**24,
                roi: str | Sequence[Sequence[int]] | None = None) -> BlockGrid:
        """Blocks of whole `write_chunk`s, doubled along their smallest extent while they hold <= target voxels."""
        shape = tuple(int(s) for s in volume_shape)
        box = [min(int(c), s) for c, s in zip(write_chunk, shape)]
        while math.prod(box) * 2 <= target_voxels:
            grow = [i for i in range(3) if box[i] < shape[i]]
            if not grow:
                break
            i = min(grow, key=lambda k: box[k])
            box[i] *= 2
        return cls.create(shape, write_chunk, [min(b, s) for b, s in zip(box, shape)], roi)

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Blocks per axis."""
        return tuple(-(-(b - a) // s) for (a, b), s in zip(self.roi, self.block_shape))  # type: ignore[return-value]

    @property
    def num_blocks(self) -> int:
        return math.prod(self.grid_shape)

    @property
    def roi_voxels(self) -> int:
        return math.prod(b - a for a, b in self.roi)

    @property
    def roi_box(self) -> Box:
        return tuple(slice(a, b) for a, b in self.roi)  # type: ignore[return-value]

    def coords(self, index: int) -> tuple[int, int, int]:
        """Grid position (C order, x fastest) of block `index`."""
        index = int(index)
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block {index} out of range [0, {self.num_blocks})")
        gz, gy, gx = self.grid_shape
        return index // (gy * gx), (index // gx) % gy, index % gx

    def box(self, index: int) -> Box:
        """The core box of block `index`: what it computes and writes."""
        return tuple(  # type: ignore[return-value]
            slice(a + k * s, min(a + (k + 1) * s, b)) for k, s, (a, b) in zip(self.coords(index), self.block_shape, self.roi)
        )

    def context(self, index: int, halo: Sequence[int], within_roi: bool = False) -> Box:
        """The core of block `index` grown by `halo` per axis, clipped to the volume (or to the ROI)."""
        bounds = self.roi if within_roi else tuple((0, s) for s in self.volume_shape)
        return tuple(  # type: ignore[return-value]
            slice(max(lo, c.start - h), min(hi, c.stop + h)) for c, h, (lo, hi) in zip(self.box(index), halo, bounds)
        )

    def block_bytes(self, bytes_per_voxel: float) -> int:
        return int(math.prod(self.block_shape) * bytes_per_voxel)

    def to_dict(self) -> dict:
        return {"volume_shape": list(self.volume_shape), "chunk_shape": list(self.chunk_shape),
                "block_shape": list(self.block_shape), "roi": [list(r) for r in self.roi]}

    @classmethod
    def from_dict(cls, d: dict) -> BlockGrid:
        return cls(tuple(d["volume_shape"]), tuple(d["chunk_shape"]), tuple(d["block_shape"]),  # type: ignore[arg-type]
                   tuple(tuple(r) for r in d["roi"]))
