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

__all__ = ["plan_factors", "downsample_method", "plan_pyramid", "fusable_levels", "downsample_array",
           "downsample_in_memory", "build_pyramid"]

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


def _windows(slab: np.ndarray, f: Sequence[int]) -> list[np.ndarray]:
    """The prod(f) strided views of `slab` (..., f[0], y, x), one per offset inside a downsampling window."""
    return [slab[..., dz::f[0], dy::f[1], dx::f[2]] for dz in range(f[0]) for dy in range(f[1]) for dx in range(f[2])]


def _mode_of(values: list[np.ndarray]) -> np.ndarray:
    """Per position, the most frequent of `values` (equal-shaped arrays), the smallest on ties."""
    k = len(values)
    counts = [np.zeros(values[0].shape, np.uint8) for _ in range(k)]
    for i in range(k):
        for j in range(i + 1, k):
            eq = values[i] == values[j]
            counts[i] += eq
            counts[j] += eq
    best, best_count = values[0].copy(), counts[0]
    for i in range(1, k):
        better = (counts[i] > best_count) | ((counts[i] == best_count) & (values[i] < best))
        best = np.where(better, values[i], best)
        best_count = np.where(better, counts[i], best_count)
    return best


def _mode_slab(slab: np.ndarray, f: Sequence[int], out: np.ndarray, same: np.ndarray, tmp: np.ndarray) -> None:
    """Mode of one slab of f[0] planes into `out`: windows of one value (most of a label volume) are copied,
    only the others are counted."""
    views = _windows(slab, f)
    np.copyto(out, views[0])
    np.equal(views[0], views[1], out=same)
    for v in views[2:]:
        np.equal(views[0], v, out=tmp)
        same &= tmp
    if not same.all():
        mixed = ~same
        out[mixed] = _mode_of([v[mixed] for v in views])


def _mean_slab(slab: np.ndarray, f: Sequence[int], out: np.ndarray, acc: np.ndarray, parity: np.ndarray) -> None:
    """Integer mean of one slab of f[0] planes into `out`, rounded half to even as tensorstore's mean. The window
    size k = 2^m, so with s the window's sum and q = s >> m (floor): round(s / k) = (s + k/2 - 1 + (q & 1)) >> m."""
    views = _windows(slab, f)
    m = len(views).bit_length() - 1
    np.add(views[0], views[1], out=acc, dtype=acc.dtype)
    for v in views[2:]:
        np.add(acc, v, out=acc, dtype=acc.dtype)
    np.right_shift(acc, m, out=parity)
    parity &= 1
    acc += (1 << (m - 1)) - 1
    acc += parity
    acc >>= m
    np.copyto(out, acc, casting="unsafe")


def downsample_array(data: np.ndarray, factors_zyx: Sequence[int], method: str,
                     out: np.ndarray | None = None) -> np.ndarray:
    """`data` (..., z, y, x) downsampled by `factors_zyx`: the bytes `ts.downsample` gives (mean rounded half to
    even, mode smallest on ties). Computed plane by plane in numpy, in cache-sized temporaries, where the shape
    divides, the dtype is an integer of <= 4 bytes and (means) the window has 2^m voxels: a label block's mode
    2.2x, an image's mean 1.2x faster than tensorstore's here. Else by tensorstore. `out` (the result's shape
    and dtype) receives the numpy path's result."""
    f = [int(k) for k in factors_zyx]
    shape = data.shape[-3:]
    k = math.prod(f)
    fast = (data.dtype.kind in "iu" and data.dtype.itemsize <= 4 and 1 < k <= 64
            and all(n % m == 0 for n, m in zip(shape, f))
            and (method == "mode" or method == "mean" and k & (k - 1) == 0))
    if not fast:
        lead = (1,) * (data.ndim - 3)
        return ts.downsample(ts.array(data), [*lead, *f], method=method).read().result()
    lead_shape = data.shape[:-3]
    out_shape = lead_shape + tuple(n // m for n, m in zip(shape, f))
    if out is None:
        out = np.empty(out_shape, data.dtype)
    elif out.shape != out_shape or out.dtype != data.dtype:
        raise ValueError(f"downsampled into {out.shape} {out.dtype}; needs {out_shape} {data.dtype}")
    plane = lead_shape + (1, shape[1] // f[1], shape[2] // f[2])
    if method == "mode":
        same, tmp = np.empty(plane, bool), np.empty(plane, bool)
        for z in range(out.shape[-3]):
            _mode_slab(data[..., z * f[0]:(z + 1) * f[0], :, :], f, out[..., z:z + 1, :, :], same, tmp)
    else:
        acc = np.empty(plane, np.dtype(f"{'i' if data.dtype.kind == 'i' else 'u'}{2 * data.dtype.itemsize}"))
        parity = np.empty_like(acc)
        for z in range(out.shape[-3]):
            _mean_slab(data[..., z * f[0]:(z + 1) * f[0], :, :], f, out[..., z:z + 1, :, :], acc, parity)
    return out


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
    from vemscale.blocks.scratch import scratch

    cum = [1, 1, 1]
    for n, level in enumerate(levels):
        f = [int(k) for k in level["factors_zyx"]]
        cum = [c * k for c, k in zip(cum, f)]
        shape = data.shape[:-3] + tuple(-(-s // k) for s, k in zip(data.shape[-3:], f))
        data = downsample_array(data, f, method, out=scratch(f"export.level{n + 1}", shape, data.dtype))
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
