"""The I/O stages of blockwise inference, plain functions of a batch of blocks (no model, no torch import):

    read_blocks  (Ray task)  block id -> the raw context box (core + halo) of the input volume
    write_blocks (Ray task)  uint8 probabilities / labels of each core -> the output layers

Between stages a batch carries its blocks as fixed-shape arrays (`pack`: stacked, zero-padded to the
largest block of the batch, with each block's true shape beside it), which Ray Data moves without a
per-block conversion. The model actor between the two is `vemscale.infer.predictor.Predictor`.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel

from vemscale.blocks.grid import BlockGrid, Box, box_voxels
from vemscale.blocks.mask import MaskMap, read_mask
from vemscale.infer.outputs import open_layers
from vemscale.infer.tiling import TileGrid, read_span
from vemscale.io.volume import open_volume_cached


class BlockJob(BaseModel):
    """Everything a stage needs, JSON-able (it travels to tasks and actors as arguments)."""

    input: str
    scale: int | str | None = None
    checkpoint: str
    weights_sha256: str
    grid: dict[str, Any]
    halo: Literal["auto"] | tuple[int, int, int] = "auto"
    mode: Literal["xy", "orthoplane"] = "xy"
    batch_size: int = 8
    threads: int = 1
    use_gpu: bool = False
    layers: dict[str, dict[str, Any]]  # layer name -> tensorstore spec
    tile: int
    margin: int
    tta: int = 1  # views averaged per tile (vemscale.infer.tta)
    mask: dict[str, Any] | None = None  # a vemscale.blocks.mask.MaskMap: blocks without tissue are not computed
    run_id: str = ""  # one per run: cached store handles never outlive the run that opened them
    lut: list[int] | None = None  # match_histogram: the input's grey values -> the reference's (io.histogram)


def tile_context_box(box: Box, volume_shape: tuple[int, int, int], grid: TileGrid, mode: str) -> Box:
    """The in-volume box the tiles of `box` read: the default ("auto") halo. z is only tiled in orthoplane mode."""
    out = []
    for axis, (s, size) in enumerate(zip(box, volume_shape)):
        if axis == 0 and mode == "xy":
            out.append(s)
        else:
            out.append(slice(*read_span(grid, s.start, s.stop, size)))
    return tuple(out)  # type: ignore[return-value]


def context_box(job: BlockJob, grid: BlockGrid, index: int) -> Box:
    if job.halo == "auto":
        return tile_context_box(grid.box(index), grid.volume_shape, TileGrid(job.tile, job.margin), job.mode)
    return grid.context(index, job.halo)


def pack(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Arrays of one ndim -> one array (n, *largest shape), zero-padded, and their shapes (n, ndim)."""
    shapes = np.asarray([a.shape for a in arrays], np.int64).reshape(len(arrays), -1)
    full = shapes.max(0) if len(arrays) else np.zeros(0, np.int64)
    if (shapes == full).all():
        return np.stack(arrays) if len(arrays) else np.zeros((0,), np.uint8), shapes
    out = np.zeros((len(arrays), *full), arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[(i, *(slice(0, n) for n in a.shape))] = a
    return out, shapes


def unpack(batch: dict[str, Any], name: str, i: int) -> np.ndarray:
    """Block i of a packed column (`name` and `name + "_shape"`)."""
    return np.asarray(batch[name][i])[tuple(slice(0, int(n)) for n in batch[name + "_shape"][i])]


@functools.lru_cache(maxsize=4)
def _open_outputs(specs_json: str, run_id: str = "") -> dict[str, Any]:
    return open_layers(json.loads(specs_json))


def read_blocks(batch: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Read the context box of every block in the batch (all reads in flight at once)."""
    t0 = time.perf_counter()
    spec = BlockJob.model_validate(job)
    grid = BlockGrid.from_dict(spec.grid)
    volume = open_volume_cached(spec.input, spec.scale, spec.run_id)
    ids = np.asarray(batch["id"], np.int64)
    lead = (slice(None),) if volume.ndim == 4 else ()
    masked, partial = np.zeros(len(ids), np.int8), np.zeros(len(ids), np.int8)
    if spec.mask is not None:  # a block with no tissue in its core is not read, predicted or stored
        mask = MaskMap.from_dict(spec.mask)
        for j, i in enumerate(ids):
            tissue = read_mask(mask, grid.box(int(i)), spec.run_id)
            masked[j], partial[j] = not tissue.any(), tissue.any() and not tissue.all()
    boxes = [context_box(spec, grid, int(i)) for i in ids]
    empty = np.zeros((0,) * (volume.ndim), volume.dtype)
    store = volume.tensorstore
    if store is not None:
        futures = [None if m else store[lead + b].read() for b, m in zip(boxes, masked)]
        data = [empty if f is None else np.asarray(f.result()) for f in futures]
    else:
        data = [empty if m else np.asarray(volume.read(lead + b)) for b, m in zip(boxes, masked)]
    seconds = time.perf_counter() - t0
    packed, shapes = pack(data)
    return {"id": ids, "context": np.asarray([[[b.start, b.stop] for b in box] for box in boxes], np.int64),
            "data": packed, "data_shape": shapes, "read_s": np.full(len(ids), seconds / max(1, len(ids))),
            "context_voxels": np.asarray([0 if m else box_voxels(b) for b, m in zip(boxes, masked)], np.int64),
            "masked": masked, "mask_partial": partial}


def write_blocks(batch: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Write every block's core into the output layers; returns only after all writes completed."""
    t0 = time.perf_counter()
    spec = BlockJob.model_validate(job)
    grid = BlockGrid.from_dict(spec.grid)
    stores = _open_outputs(json.dumps(spec.layers, sort_keys=True), spec.run_id)
    ids = np.asarray(batch["id"], np.int64)
    masked = np.asarray(batch["masked"], bool)
    mask = MaskMap.from_dict(spec.mask) if spec.mask is not None else None
    futures = []
    for i, index in enumerate(ids):
        box = grid.box(int(index))
        if masked[i]:  # the fill value: tensorstore stores no chunk equal to it (and clears one left by another run)
            futures.extend(store[(slice(None), *box) if name == "probabilities" else box].write(0)
                           for name, store in stores.items())
            continue
        tissue = read_mask(mask, box, spec.run_id) if mask is not None and batch["mask_partial"][i] else None
        if "probabilities" in stores:
            probs = unpack(batch, "probabilities", i)
            if tissue is not None:
                probs = np.where(tissue, probs, 0).astype(probs.dtype)
            futures.append(stores["probabilities"][(slice(None), *box)].write(probs))
        if "labels" in stores:
            store = stores["labels"]
            labels = unpack(batch, "labels", i).astype(store.dtype.numpy_dtype, copy=False)
            if tissue is not None:
                labels = np.where(tissue, labels, 0).astype(labels.dtype)
            futures.append(store[box].write(labels))
    for f in futures:
        f.result()
    n = len(ids)
    seconds = time.perf_counter() - t0
    keep = ("read_s", "context_voxels", "predict_s", "forward_s", "tiles", "batches", "halo_misses", "pid",
            "peak_rss_mb", "actor_init_s", "predict_start", "predict_end")
    core = np.asarray([box_voxels(grid.box(int(i))) for i in ids], np.int64)
    return {"id": ids, **{k: np.asarray(batch[k]) for k in keep},
            "voxels": np.where(masked, 0, core), "masked": masked.astype(np.int64),
            "masked_voxels": np.where(masked, core, 0),
            "write_s": np.full(n, seconds / max(1, n)), "finished_at": np.full(n, time.time())}
