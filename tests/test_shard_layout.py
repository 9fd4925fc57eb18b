"""Shard parameters chosen from a target shard size, checked against the formats' own rules (not our helpers):
the Neuroglancer `neuroglancer_uint64_sharded_v1` spec (the shard index is 16 bytes per minishard, a minishard
index 24 bytes per chunk before compression; with the identity hash a shard is the chunks whose compressed Morton
code agrees above the lowest preshift + minishard bits) and igneous's bounds (shard index ~8 KiB, minishard index
<= 32 KiB), and zarr v3's sharding codec (a shard is a whole number of chunks)."""

from __future__ import annotations

import itertools
import math

import pytest

from vemscale.errors import UserError
from vemscale.export.precomputed import sharding_spec
from vemscale.io.shards import SHARD_ABOVE_CHUNKS, plan_layout


def _morton_shards(grid_xyz, k):
    """Chunk grid position -> shard id by the spec: compressed Morton code (bits of x, y, z interleaved from the
    least significant end, a dimension dropping out once its bits are used up) shifted right by k."""
    bits = [max(0, math.ceil(math.log2(n))) for n in grid_xyz]
    out = {}
    for pos in itertools.product(*(range(n) for n in grid_xyz)):
        code, j = 0, 0
        for b in range(max(bits)):
            for d in range(3):
                if b < bits[d]:
                    code |= ((pos[d] >> b) & 1) << j
                    j += 1
        out[pos] = code >> k
    return out


@pytest.mark.parametrize("shape, block", [((64, 2048, 2048), (64, 1024, 1024)), ((16, 4096, 4096), (16, 768, 768)),
                                          ((48, 1000, 1500), (16, 512, 512)), ((128, 8192, 8192), (64, 1024, 1024))])
def test_precomputed_shards_are_block_aligned_morton_boxes_with_small_indices(shape, block):
    chunk = (16, 128, 128)
    layout = plan_layout("precomputed", True, shape, chunk, block)
    spec = sharding_spec(chunk[::-1], shape[::-1], "compressed_segmentation", k=layout.shard_bits)
    k = spec["preshift_bits"] + spec["minishard_bits"]
    assert 16 * 2 ** spec["minishard_bits"] <= 8 * 1024  # shard index
    assert 24 * 2 ** spec["preshift_bits"] <= 32 * 1024  # one minishard's index
    assert math.prod(layout.shard) <= 2**25 * 1.0001  # the target shard size
    # every shard of the spec is exactly one box of layout.shard voxels, inside one block (one writer per shard)
    grid = [-(-s // c) for s, c in zip(shape[::-1], chunk[::-1])]
    block_xyz, chunk_xyz = block[::-1], chunk[::-1]
    ids = _morton_shards(grid, k)
    for sid in set(ids.values()):
        members = [p for p, v in ids.items() if v == sid]
        lo = [min(m[d] for m in members) for d in range(3)]
        hi = [max(m[d] for m in members) for d in range(3)]
        assert len(members) == math.prod(h - l + 1 for l, h in zip(lo, hi))  # a box
        assert [min((h + 1) * c, n) - l * c for l, h, c, n in zip(lo, hi, chunk_xyz, shape[::-1])] == \
            [min(v, n - l * c) for v, l, c, n in zip(layout.shard[::-1], lo, chunk_xyz, shape[::-1])]  # of layout.shard
        blocks = {tuple(m[d] * chunk_xyz[d] // block_xyz[d] for d in range(3)) for m in members}
        assert len(blocks) == 1  # inside one block


def test_zarr_shards_hold_whole_chunks_and_stay_under_the_target():
    layout = plan_layout("zarr", True, (64, 8192, 8192), (16, 128, 128), (16, 768, 768))
    assert layout.shard == (16, 768, 768) and all(s % c == 0 for s, c in zip(layout.shard, layout.chunk))
    big = plan_layout("zarr", True, (256, 8192, 8192), (16, 128, 128), (64, 2048, 2048))
    assert math.prod(big.shard) <= 2**25 and all(b % s == 0 for b, s in zip((64, 2048, 2048), big.shard))
    with pytest.raises(UserError, match="whole multiple of the chunks"):
        plan_layout("zarr", True, (64, 8192, 8192), (16, 128, 128), (16, 768, 768), shard_shape=(16, 200, 200))


def test_auto_shards_only_above_the_chunk_count():
    chunk = (16, 128, 128)
    side = 128 * int(math.isqrt(SHARD_ABOVE_CHUNKS))  # exactly SHARD_ABOVE_CHUNKS chunks in one z plane of chunks
    assert plan_layout("zarr", "auto", (16, side, side), chunk, (16, 512, 512)).shard is None
    assert plan_layout("zarr", "auto", (32, side, side), chunk, (16, 512, 512)).shard is not None
    assert plan_layout("precomputed", "auto", (32, side, side), chunk, (16, 512, 512)).shard_bits is not None
