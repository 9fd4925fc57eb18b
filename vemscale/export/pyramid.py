"""Multiscale pyramids for precomputed layers, computed blockwise by the block runner (resumable per scale).

Scale s+1 is made from scale s only: each task reads the source box of one target box (a whole number of
the target's write chunks), downsamples it with `ts.downsample` (mean for images, mode for labels: the
most frequent value, the smallest on ties) and writes it. Memory per task is O(box); scales run in order.

The first levels are *fused* into the scale-0 copy where they can be (`fusable_levels`): a scale-0 block
downsamples the data it has just written in memory and writes those levels too, so scale 0 is never read
back (igneous's downsample tasks make several mips per read for the same reason). Only levels whose boxes
are whole write chunks of theirs for every block, and only lossless encodings (jpeg would change what the
next level is computed from), are fused; the bytes are those of the level-by-level pyramid.
Factors are [2,2,1] (x,y,z) while the data are anisotropic and [2,2,2] once near-isotropic (z voxel size
below sqrt(2) times the xy one), the choice that keeps each scale closest to isotropic.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from vemscale.blocks.grid import BlockGrid, Box
from vemscale.errors import UserError
from vemscale.export.precomputed import DEFAULT_SHARD_VOXELS, add_scale, open_scale, read_info, view_spec, \
    write_chunk_aligned_block, write_chunk_shape
from vemscale.export.steps import open_spec, run_step

__all__ = ["plan_factors", "downsample_method", "plan_pyramid", "fusable_levels", "downsample_in_memory",
           "build_pyramid"]

log = logging.getLogger(__name__)


def plan_factors(voxel_size_xyz: Sequence[float], shape_zyx: Sequence[int], chunk_zyx: Sequence[int],
                 max_scales: int | None = None) -> list[tuple[int, int, int]]:
    """Downsampling factors (z,y,x) of scales 1, 2, ... until the xy extent fits one chunk or `max_scales` total."""
    res = [float(v) for v in voxel_size_xyz][::-1]  # z,y,x
    shape = [int(s) for s in shape_zyx]
    out: list[tuple[int, int, int]] = []
    while max_scales is None or len(out) + 1 < max_scales:
        if shape[1] <= chunk_zyx[1] and shape[2] <= chunk_zyx[2]:
            break
        r_xy = min(res[1], res[2])
        fz = 2 if shape[0] > 1 and res[0] < math.sqrt(2) * r_xy else 1
        f = (fz, 2 if shape[1] > 1 else 1, 2 if shape[2] > 1 else 1)
        out.append(f)
        shape = [-(-s // k) for s, k in zip(shape, f)]
        res = [r * k for r, k in zip(res, f)]
    return out


def downsample_method(layer_type: str) -> str:
    return "mode" if layer_type == "segmentation" else "mean"


def downsample_block(box: Box, src_spec: dict[str, Any], dst_spec: dict[str, Any], factors_zyx: Sequence[int],
                     method: str, run: str) -> None:
    """Read the source of one target box of scale s+1, downsample it, write it."""
    src, dst = open_spec(src_spec, run=run), open_spec(dst_spec, write=True, run=run)
    lead = (1,) * (src.rank - 3)
    full = (slice(None),) * (dst.rank - 3) + tuple(box)
    data = ts.downsample(src, [*lead, *factors_zyx], method=method)[full].read().result()
    write_chunk_aligned_block(dst, full, data)


def plan_pyramid(url: str, max_scales: int | None = None, sharded: bool | None = None,
                 shard_voxels: int = DEFAULT_SHARD_VOXELS) -> list[tuple[int, ts.TensorStore, tuple[int, int, int]]]:
    """Create (or reopen) scales 1.. of the layer at `url`: (scale index, writable view, factors z,y,x) each.

    `sharded=None` shards a new scale when scale 0 is sharded. Existing scales with the planned resolution
    are reused, so calling this twice is safe."""
    info = read_info(url)
    if info is None:
        raise UserError(f"{url!r} is not a precomputed layer (no info)")
    s0 = info["scales"][0]
    chunk_zyx = [int(c) for c in s0["chunk_sizes"][0][::-1]]
    shard = ("sharding" in s0) if sharded is None else sharded
    shape, res = [int(s) for s in s0["size"][::-1]], [float(r) for r in s0["resolution"]]
    plans = []
    for f in plan_factors(res, shape, chunk_zyx, max_scales):
        shape = [-(-s // k) for s, k in zip(shape, f)]
        res = [r * k for r, k in zip(res, f[::-1])]
        index, view = add_scale(url, shape, res, chunk_zyx, sharded=shard, shard_voxels=shard_voxels)
        plans.append((index, view, f))
    return plans


def fusable_levels(grid: BlockGrid, levels: Sequence[tuple[int, ts.TensorStore, Sequence[int]]],
                   encoding: str) -> int:
    """How many leading `levels` the scale-0 blocks of `grid` can write themselves: each block's box, divided
    by the cumulative factors, must start on the level's write-chunk grid and end on it or at the volume's end
    (so the grid must reach the volume's end: a partial cell there is the same in memory and in the store)."""
    if encoding == "jpeg":  # lossy: the next level must be computed from what was stored, not from memory
        return 0
    cum = [1, 1, 1]
    for n, (_, view, f) in enumerate(levels):
        cum = [c * int(k) for c, k in zip(cum, f)]
        chunk = write_chunk_shape(view)[-3:]
        for axis in range(3):
            (lo, hi), b = grid.roi[axis], grid.block_shape[axis]
            one_block = hi - lo <= b
            if (hi != grid.volume_shape[axis] or lo % cum[axis] or (lo // cum[axis]) % chunk[axis]
                    or (not one_block and (b % cum[axis] or (b // cum[axis]) % chunk[axis]))):
                return n
    return len(levels)


def downsample_in_memory(data: np.ndarray, box: Box, levels: Sequence[dict[str, Any]], method: str,
                         run: str) -> None:
    """Write the fused `levels` ({"spec", "factors_zyx"}) of one scale-0 block from its data (already cast to
    the layer's dtype): each level from the previous one, as `downsample_block` would from the stored scale."""
    cum = [1, 1, 1]
    lead = (1,) * (data.ndim - 3)
    for level in levels:
        f = [int(k) for k in level["factors_zyx"]]
        cum = [c * k for c, k in zip(cum, f)]
        data = ts.downsample(ts.array(data), [*lead, *f], method=method).read().result()
        dst = open_spec(level["spec"], write=True, run=run)
        target = tuple(slice(s.start // c, -(-s.stop // c)) for s, c in zip(box, cum))
        write_chunk_aligned_block(dst, (slice(None),) * (dst.rank - 3) + target, data)


def build_pyramid(url: str, max_scales: int | None = None, target_voxels: int = 2**24, sharded: bool | None = None,
                  shard_voxels: int = DEFAULT_SHARD_VOXELS, max_in_flight: int | None = None,
                  source_generation: str | None = None, blocks_per_batch: int | None = None,
                  fused: dict[int, dict[str, Any]] | None = None,
                  plans: list[tuple[int, ts.TensorStore, tuple[int, int, int]]] | None = None) -> list[dict[str, Any]]:
    """Add scales 1.. to the precomputed layer at `url` from its scale 0; returns per-scale size, resolution, time.

    Existing scales with the planned resolution are reused (`plan_pyramid`), and each scale's ledger resumes
    an interrupted pyramid; `source_generation` (scale 0's ledger generation) makes a rewritten scale 0
    rebuild every level. `fused` maps the scale indices the scale-0 step already wrote to its run summary;
    `plans` are `plan_pyramid`'s levels when the caller has them already.
    """
    from vemscale.raycluster import ensure_ray

    info = read_info(url)
    if info is None:
        raise UserError(f"{url!r} is not a precomputed layer (no info)")
    method = downsample_method(info.get("type", "image"))
    if plans is None:
        plans = plan_pyramid(url, max_scales, sharded, shard_voxels)
    resolutions = [sc["resolution"] for sc in read_info(url)["scales"]]  # every planned scale is in the info now
    ensure_ray()
    src = open_scale(url, 0)
    out: list[dict[str, Any]] = []
    parent = source_generation or "external"
    run = uuid.uuid4().hex
    fused = fused or {}
    for index, dst, f in plans:
        if index in fused:  # written by the scale-0 blocks; its generation is scale 0's
            s0 = fused[index]
            out.append({"scale": index, "factors_zyx": list(f), "shape_zyx": list(dst.shape[-3:]),
                        "resolution_xyz": resolutions[index], "blocks": s0["blocks"],
                        "computed": s0["computed"], "skipped": s0["skipped"], "seconds": 0.0,
                        "generation": s0["generation"], "fused_into": "scale0"})
            src, parent = dst, s0["generation"]
            continue
        t0 = time.perf_counter()
        grid = BlockGrid.aligned(dst.shape[-3:], write_chunk_shape(dst)[-3:], max(1, target_voxels // math.prod(f)))
        src_spec, dst_spec = view_spec(src), view_spec(dst)
        desc = {"step": f"scale{index}", "version": 1, "parent": parent, "factors_zyx": list(f), "method": method,
                "dest": dst_spec}
        ledger, summary = run_step(url, f"scale{index}", desc, grid, downsample_block,
                                   {"src_spec": src_spec, "dst_spec": dst_spec, "factors_zyx": list(f),
                                    "method": method, "run": run},
                                   bytes_per_voxel=4.0 * math.prod(f), max_in_flight=max_in_flight,
                                   blocks_per_batch=blocks_per_batch)
        parent = ledger.generation
        seconds = time.perf_counter() - t0
        out.append({"scale": index, "factors_zyx": list(f), "shape_zyx": list(dst.shape[-3:]),
                    "resolution_xyz": resolutions[index], "blocks": grid.num_blocks,
                    "computed": summary["computed"], "skipped": summary["skipped"], "seconds": round(seconds, 3),
                    "generation": ledger.generation})
        log.info("pyramid scale %d %s: %d blocks (%d computed), %.1f s", index, tuple(dst.shape[-3:]),
                 grid.num_blocks, summary["computed"], seconds)
        src = dst
    return out
