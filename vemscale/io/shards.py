"""Shard geometry of an output layer: when to shard, and a shard shape every block covers whole.

A sharded layer stores many chunks in one object (a *shard*): 1e15 voxels in 16x128x128 chunks are ~4e9
objects unsharded, ~3e7 in shards of 2^25 voxels. Tensorstore rewrites a whole shard per write, so a shard
must have one writer: the shard shape is chosen to divide the block core (blocks start on shard
boundaries, see `vemscale.blocks.grid`), and a block then writes its shards whole.

- OME-Zarr (zarr v3 `sharding_indexed` codec): any box of whole chunks; we take the largest that divides the
  block and holds at most `target_voxels` (counting channels).
- Neuroglancer precomputed (`neuroglancer_uint64_sharded_v1`, identity hash): a shard is the set of chunks
  sharing the high bits of their compressed Morton code, i.e. a box of 2^a x 2^b x 2^c chunks whose
  exponents follow the bit interleaving (x, y, z from the least significant bit, an axis dropping out when
  its bits run out). `morton_box` computes that box, `precomputed_shard_bits` the largest one dividing the
  block.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal, Sequence

from pydantic import Field

from vemscale.config import PositiveTriple, Strict
from vemscale.errors import UserError

SHARD_ABOVE_CHUNKS = 4096  # sharded="auto": shard a layer that would have more chunk objects than this
DEFAULT_SHARD_VOXELS = 2**25  # ~32 M voxels per shard (igneous keeps shards well under 2 GB compressed)

Sharded = Literal["auto"] | bool


def num_chunks(shape_zyx: Sequence[int], chunk_zyx: Sequence[int]) -> int:
    return math.prod(-(-int(s) // int(c)) for s, c in zip(shape_zyx, chunk_zyx))


def want_sharding(sharded: Sharded, shape_zyx: Sequence[int], chunk_zyx: Sequence[int],
                  above: int = SHARD_ABOVE_CHUNKS) -> bool:
    """`sharded` as a bool; "auto" shards when the layer would have more than `above` chunks."""
    return num_chunks(shape_zyx, chunk_zyx) > above if sharded == "auto" else bool(sharded)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def zarr_shard_shape(block_zyx: Sequence[int], chunk_zyx: Sequence[int], target_voxels: int = DEFAULT_SHARD_VOXELS,
                     channels: int = 1) -> tuple[int, int, int]:
    """The largest box of whole chunks that divides the block and holds <= target voxels (x channels).

    Ties prefer the shard that is largest in x, then y (the planes a viewer reads). At least one chunk.
    """
    counts = [max(1, -(-int(b) // int(c))) for b, c in zip(block_zyx, chunk_zyx)]
    per_chunk = math.prod(int(c) for c in chunk_zyx) * max(1, channels)
    best, best_key = (1, 1, 1), (-1, -1, -1, -1)
    for n in itertools.product(*(_divisors(c) for c in counts)):
        voxels = per_chunk * math.prod(n)
        if voxels > target_voxels and n != (1, 1, 1):
            continue
        key = (math.prod(n), n[2], n[1], n[0])
        if key > best_key:
            best, best_key = n, key
    return tuple(int(k * c) for k, c in zip(best, chunk_zyx))  # type: ignore[return-value]


def grid_bits(size_xyz: Sequence[int], chunk_xyz: Sequence[int]) -> list[int]:
    """Bits of each axis in the compressed Morton code of the chunk grid."""
    return [max(0, math.ceil(math.log2(-(-int(s) // int(c))))) for s, c in zip(size_xyz, chunk_xyz)]


def morton_box(bits_xyz: Sequence[int], k: int) -> tuple[int, int, int]:
    """Chunks per shard along x,y,z when the lowest `k` Morton bits (preshift + minishard) stay inside a shard."""
    exp, assigned, level = [0, 0, 0], 0, 0
    while assigned < k:
        if level >= max(bits_xyz, default=0):
            raise ValueError(f"k={k} exceeds the {sum(bits_xyz)} bits of the chunk grid")
        for a in range(3):
            if level < bits_xyz[a] and assigned < k:
                exp[a] += 1
                assigned += 1
        level += 1
    return tuple(2**e for e in exp)  # type: ignore[return-value]


def _fits(box_chunks_xyz: Sequence[int], chunk_xyz: Sequence[int], block_xyz: Sequence[int] | None,
          size_xyz: Sequence[int]) -> bool:
    """Does every block cover whole shards? (A shard spanning an axis needs a block spanning it too.)"""
    if block_xyz is None:
        return True
    for n, c, b, s in zip(box_chunks_xyz, chunk_xyz, block_xyz, size_xyz):
        extent = n * c
        if (b % extent) and b < s:
            return False
    return True


def precomputed_shard_bits(chunk_xyz: Sequence[int], size_xyz: Sequence[int], target_voxels: int = DEFAULT_SHARD_VOXELS,
                           block_xyz: Sequence[int] | None = None) -> int:
    """The largest k (preshift + minishard bits) with shards of <= target voxels that every block covers whole."""
    bits = grid_bits(size_xyz, chunk_xyz)
    per_chunk = math.prod(int(c) for c in chunk_xyz)
    best = 0
    for k in range(1, sum(bits) + 1):
        if per_chunk * 2**k > target_voxels:
            break
        if _fits(morton_box(bits, k), chunk_xyz, block_xyz, size_xyz):
            best = k
    return best


class ShardKeys(Strict):
    """Config keys of a stage that writes a layer by blocks: whether and how its layers are sharded."""

    sharded: Literal["auto"] | bool = "auto"  # auto: sharded when a layer would have > 4096 chunk objects
    shard_shape: PositiveTriple | None = None  # z,y,x voxels per shard; None: largest dividing the block <= shard_voxels
    shard_voxels: int = Field(DEFAULT_SHARD_VOXELS, ge=1)  # target voxels per shard (x channels for probabilities)


@dataclass(frozen=True)
class Layout:
    """How a layer is stored: chunk shape, and the shard shape (z,y,x voxels) when sharded."""

    chunk: tuple[int, int, int]
    shard: tuple[int, int, int] | None = None
    shard_bits: int | None = None  # precomputed: preshift + minishard bits (log2 chunks per shard)

    @property
    def write_unit(self) -> tuple[int, int, int]:
        """What one writer must cover whole: a shard, else a chunk."""
        return self.shard or self.chunk

    def to_dict(self) -> dict:
        return {"chunk": list(self.chunk), "shard": list(self.shard) if self.shard else None,
                "shard_bits": self.shard_bits}


def plan_layout(fmt: Literal["zarr", "precomputed"], sharded: Sharded, shape_zyx: Sequence[int],
                chunk_zyx: Sequence[int], block_zyx: Sequence[int], *, shard_shape: Sequence[int] | None = None,
                target_voxels: int = DEFAULT_SHARD_VOXELS, channels: int = 1) -> Layout:
    """Chunk and shard shapes for a layer written by blocks of `block_zyx`; UserError for a shard that cannot work."""
    chunk = tuple(min(int(c), int(s)) for c, s in zip(chunk_zyx, shape_zyx))
    if sharded is False and shard_shape is not None:
        raise UserError(f"shard_shape {tuple(shard_shape)} given with sharded=false; drop one of the two keys")
    if not (want_sharding(sharded, shape_zyx, chunk) or shard_shape is not None):
        return Layout(chunk)  # type: ignore[arg-type]
    block = tuple(min(int(b), int(s)) for b, s in zip(block_zyx, shape_zyx))
    if fmt == "precomputed":
        size_xyz, chunk_xyz = list(shape_zyx)[::-1], list(chunk)[::-1]
        bits = grid_bits(size_xyz, chunk_xyz)
        if shard_shape is not None:
            want = [min(int(v), int(s)) for v, s in zip(shard_shape, shape_zyx)]
            options = {}
            for k in range(0, sum(bits) + 1):
                box = [min(n * c, s) for n, c, s in zip(morton_box(bits, k), chunk_xyz, size_xyz)][::-1]
                options[tuple(box)] = k
            if tuple(want) not in options:
                raise UserError(f"shard_shape {tuple(shard_shape)} is not a precomputed shard of this layer: with chunks "
                                f"{chunk} a shard is a Morton box of 2^k chunks, one of "
                                f"{', '.join(','.join(map(str, b)) for b in list(options)[:8])}")
            k = options[tuple(want)]
        else:
            k = precomputed_shard_bits(chunk_xyz, size_xyz, target_voxels, list(block)[::-1])
        shard = tuple(min(n * c, s) for n, c, s in zip(morton_box(bits, k), chunk_xyz, size_xyz))[::-1]
        _check_divides(block, block_zyx, shard, shape_zyx)
        return Layout(chunk, shard, k)  # type: ignore[arg-type]
    if shard_shape is not None:
        shard = tuple(min(int(v), int(s)) for v, s in zip(shard_shape, shape_zyx))
        bad = [a for a, (v, c, s) in enumerate(zip(shard, chunk, shape_zyx)) if v % c and v < s]
        if bad:
            raise UserError(f"shard_shape {tuple(shard_shape)} is not a whole multiple of the chunks {chunk}; "
                            "a shard holds whole chunks")
    else:
        shard = zarr_shard_shape(block, chunk, target_voxels, channels)
    _check_divides(block, block_zyx, shard, shape_zyx)
    return Layout(chunk, shard)  # type: ignore[arg-type]


def _check_divides(block: Sequence[int], block_zyx: Sequence[int], shard: Sequence[int], shape_zyx: Sequence[int]) -> None:
    bad = [a for a, (b, v, s) in enumerate(zip(block, shard, shape_zyx)) if b % v and b < s]
    if bad:
        raise UserError(f"shard shape {tuple(shard)} does not divide block_shape {tuple(block_zyx)} along "
                        f"{', '.join('zyx'[a] for a in bad)}: each shard must have one writer; make block_shape a "
                        f"multiple of the shard (e.g. {','.join(str(-(-b // v) * v) for b, v in zip(block, shard))})")


__all__ = ["SHARD_ABOVE_CHUNKS", "DEFAULT_SHARD_VOXELS", "Layout", "plan_layout", "want_sharding", "num_chunks",
           "zarr_shard_shape", "grid_bits", "morton_box", "precomputed_shard_bits"]
