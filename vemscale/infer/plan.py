"""The block plan: which box of the volume block `i` covers, derived from `i` alone.

Blocks tile a region of interest (ROI) of the volume on a regular grid anchored at the ROI's start. The
ROI is aligned outwards to the output chunks and every block shape is a whole multiple of the chunk
shape, so each block core covers whole output chunks: parallel writers never share a chunk, and a
retried block rewrites exactly the same chunks. Nothing here enumerates blocks: a plan is a handful of
integers, and `block_box(i)` is arithmetic, so a 1e15-voxel volume plans in microseconds.

Core, halo and tile margin: the *core* of a block is what it writes. The *halo* is the extra input read
around the core in one bulk read (`context_box`). The model's own context comes from the tile margin of
the checkpoint (`TileGrid`): tiles sit on a global grid and read through the whole volume (mirrored at
the volume bounds only), so the values written never depend on the block shape or the halo; the halo
only decides how much of that context arrives in the one bulk read instead of extra small reads. The
default halo ("auto", see `vemscale.infer.predictor.tile_context_box`) is exactly the span the tiles read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vemscale.errors import UserError

Box = tuple[slice, slice, slice]
AXES = "zyx"


def parse_roi(text: str | None, shape: tuple[int, int, int]) -> tuple[tuple[int, int], ...]:
    """Parse 'z0:z1,y0:y1,x0:x1' (empty bounds mean the volume's) into (start, stop) per axis."""
    if text is None or not str(text).strip():
        return tuple((0, s) for s in shape)
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3 or any(p.count(":") != 1 for p in parts):
        raise UserError(f"roi {text!r} must look like z0:z1,y0:y1,x0:x1 (bounds may be left empty, e.g. :,0:512,:)")
    out = []
    for axis, part, size in zip(AXES, parts, shape):
        lo_s, hi_s = part.split(":")
        try:
            lo = int(lo_s) if lo_s.strip() else 0
            hi = int(hi_s) if hi_s.strip() else size
        except ValueError:
            raise UserError(f"roi {text!r}: bounds of {axis} must be integers, got {part!r}") from None
        if not 0 <= lo < hi <= size:
            raise UserError(f"roi {text!r}: {axis} range {lo}:{hi} is empty or outside the volume (size {size})")
        out.append((lo, hi))
    return tuple(out)


def format_roi(roi: tuple[tuple[int, int], ...]) -> str:
    return ",".join(f"{a}:{b}" for a, b in roi)


@dataclass(frozen=True)
class BlockPlan:
    """A regular grid of blocks over an ROI; build it with `BlockPlan.create` (which validates)."""

    volume_shape: tuple[int, int, int]
    chunk_shape: tuple[int, int, int]  # output chunks, clipped to the volume
    block_shape: tuple[int, int, int]  # block core, clipped to the ROI
    roi: tuple[tuple[int, int], ...]  # (start, stop) per axis, chunk-aligned (stop may be the volume end)

    @classmethod
    def create(
        cls,
        volume_shape: tuple[int, ...],
        chunk_shape: tuple[int, ...],
        block_shape: tuple[int, ...],
        roi: str | tuple[tuple[int, int], ...] | None = None,
    ) -> BlockPlan:
        """Validate the geometry: block a whole multiple of the chunks, ROI aligned outwards to chunks."""
        shape = tuple(int(s) for s in volume_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise UserError(f"volume shape must be z,y,x with positive sizes, got {shape}")
        for name, val in (("output_chunks", chunk_shape), ("block_shape", block_shape)):
            if len(val) != 3 or min(int(v) for v in val) < 1:
                raise UserError(f"{name} must be three positive integers z,y,x, got {tuple(val)}")
        chunks = tuple(min(int(c), s) for c, s in zip(chunk_shape, shape))
        raw_roi = parse_roi(roi, shape) if roi is None or isinstance(roi, str) else tuple(roi)
        aligned = tuple(((a // c) * c, min(-(-b // c) * c, s)) for (a, b), c, s in zip(raw_roi, chunks, shape))
        extent = tuple(b - a for a, b in aligned)
        block = tuple(int(b) for b in block_shape)
        bad = [i for i in range(3) if block[i] % chunks[i] and block[i] < extent[i]]
        if bad:
            nearest = tuple(max(1, round(block[i] / chunks[i])) * chunks[i] if i in bad else block[i] for i in range(3))
            raise UserError(
                f"block_shape {block} is not a whole multiple of the output chunk shape {chunks} along "
                f"{', '.join(AXES[i] for i in bad)}: a block core must cover whole chunks so parallel writers never "
                f"share one; nearest valid block_shape: {','.join(map(str, nearest))}"
            )
        block = tuple(min(b, e) for b, e in zip(block, extent))
        return cls(shape, chunks, block, aligned)  # type: ignore[arg-type]

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

    def block_coords(self, index: int) -> tuple[int, int, int]:
        """Grid position (C order, x fastest) of block `index`."""
        index = int(index)
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block {index} out of range [0, {self.num_blocks})")
        gz, gy, gx = self.grid_shape
        return index // (gy * gx), (index // gx) % gy, index % gx

    def block_box(self, index: int) -> Box:
        """The core box of block `index`: what it predicts and writes."""
        coords = self.block_coords(index)
        return tuple(  # type: ignore[return-value]
            slice(a + k * s, min(a + (k + 1) * s, b)) for k, s, (a, b) in zip(coords, self.block_shape, self.roi)
        )

    def context_box(self, index: int, halo: tuple[int, int, int]) -> Box:
        """The core of block `index` grown by `halo` per axis, clipped to the volume."""
        return tuple(  # type: ignore[return-value]
            slice(max(0, c.start - h), min(s, c.stop + h))
            for c, h, s in zip(self.block_box(index), halo, self.volume_shape)
        )

    def to_dict(self) -> dict:
        return {"volume_shape": list(self.volume_shape), "chunk_shape": list(self.chunk_shape),
                "block_shape": list(self.block_shape), "roi": [list(r) for r in self.roi]}

    @classmethod
    def from_dict(cls, d: dict) -> BlockPlan:
        return cls(tuple(d["volume_shape"]), tuple(d["chunk_shape"]), tuple(d["block_shape"]),  # type: ignore[arg-type]
                   tuple(tuple(r) for r in d["roi"]))
