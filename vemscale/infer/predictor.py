"""The three stages of blockwise inference, each a plain function of a batch of blocks (plus one model actor).

    read_blocks  (Ray task)   block id -> the raw context box (core + halo) from the input volume
    Predictor    (actor pool) context -> normalise, tile, forward, crop, quantise: uint8 probabilities / labels
    write_blocks (Ray task)   -> write each core into the output layers (then the runner marks them done)

The model actor does forward passes only, so a GPU never waits on storage: reads and writes run in tasks
beside it while it computes. Tiles of all blocks in a batch share fixed-size model batches (`TileBatcher`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import resource
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel

from vemscale.blocks.grid import BlockGrid, Box, box_voxels
from vemscale.checkpoint import WEIGHTS_FILE, CheckpointMeta, load_checkpoint, local_checkpoint
from vemscale.infer.outputs import argmax_labels, open_layers, quantize_probabilities
from vemscale.infer.tiling import Normalizer, TileBatcher, TileGrid, predict_boxes, read_span


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
    run_id: str = ""  # one per run: cached store handles never outlive the run that opened them


def weights_sha256(checkpoint: str | Path) -> str:
    """sha256 of the checkpoint's weights file (what makes two checkpoints the same model)."""
    h = hashlib.sha256()
    with open(local_checkpoint(checkpoint) / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def grid_and_normalizer(meta: CheckpointMeta) -> tuple[TileGrid, Normalizer]:
    n = meta.normalization
    return TileGrid(meta.tile, meta.margin), Normalizer(float(n.get("scale", 255.0)), tuple(n.get("mean", (0.5,))),
                                                        tuple(n.get("std", (0.25,))))


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


class BlockReader:
    """A tiling Reader over one bulk read of the context box; reads outside it go to `fallback` (counted)."""

    def __init__(self, data: np.ndarray, context: Box, fallback: Any = None) -> None:
        self.data = data if data.ndim == 4 else data[None]
        self.context = context
        self.fallback = fallback
        self.misses = 0

    def __call__(self, z: slice, y: slice, x: slice) -> np.ndarray:
        want = (z, y, x)
        if all(c.start <= w.start and w.stop <= c.stop for c, w in zip(self.context, want)):
            return self.data[(slice(None), *(slice(w.start - c.start, w.stop - c.start) for c, w in zip(self.context, want)))]
        self.misses += 1
        data = np.asarray(self.fallback().read(want))
        return data if data.ndim == 4 else data[None]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@functools.lru_cache(maxsize=4)
def _open_input(url: str, scale: int | str | None, run_id: str = "") -> Any:
    from vemscale.io.volume import open_volume

    return open_volume(url, scale=scale)


@functools.lru_cache(maxsize=4)
def _open_outputs(specs_json: str, run_id: str = "") -> dict[str, Any]:
    import json

    return open_layers(json.loads(specs_json))


def _column(batch: dict[str, Any], name: str, i: int) -> np.ndarray:
    return np.asarray(batch[name][i])


# --- stage 1: read ---------------------------------------------------------------------------------------------


def read_blocks(batch: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Read the context box of every block in the batch (all reads in flight at once)."""
    t0 = time.perf_counter()
    spec = BlockJob.model_validate(job)
    grid = BlockGrid.from_dict(spec.grid)
    volume = _open_input(spec.input, spec.scale, spec.run_id)
    ids = np.asarray(batch["id"], np.int64)
    lead = (slice(None),) if volume.ndim == 4 else ()
    boxes = [context_box(spec, grid, int(i)) for i in ids]
    store = volume.tensorstore
    if store is not None:
        futures = [store[lead + b].read() for b in boxes]
        data = [np.asarray(f.result()) for f in futures]
    else:
        data = [np.asarray(volume.read(lead + b)) for b in boxes]
    seconds = time.perf_counter() - t0
    return {"id": ids, "context": [np.asarray([[b.start, b.stop] for b in box], np.int64) for box in boxes],
            "data": data, "read_s": np.full(len(ids), seconds / max(1, len(ids))),
            "context_voxels": np.asarray([box_voxels(b) for b in boxes], np.int64)}


# --- stage 2: predict (the model actor) ------------------------------------------------------------------------


class Predictor:
    """Ray Data actor: one model per worker; `__call__` predicts a batch of read blocks (forward passes only)."""

    def __init__(self, job: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        self.job = BlockJob.model_validate(job)
        torch.set_num_threads(self.job.threads)
        use_cuda = self.job.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.amp_dtype = torch.bfloat16 if use_cuda else None
        if weights_sha256(self.job.checkpoint) != self.job.weights_sha256:
            raise RuntimeError(f"checkpoint {self.job.checkpoint} changed since the run was planned; rerun infer")
        self.model, meta = load_checkpoint(self.job.checkpoint, self.device)
        self.tiles, self.normalize = grid_and_normalizer(meta)
        self.grid = BlockGrid.from_dict(self.job.grid)
        self.layers = set(self.job.layers)
        self.init_seconds = time.perf_counter() - t0

    def _fallback(self) -> Any:
        return _open_input(self.job.input, self.job.scale, self.job.run_id)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        t0, wall0 = time.perf_counter(), time.time()
        ids = np.asarray(batch["id"], np.int64)
        readers, jobs = [], []
        for i, index in enumerate(ids):
            ctx = tuple(slice(int(a), int(b)) for a, b in _column(batch, "context", i))
            reader = BlockReader(_column(batch, "data", i), ctx, self._fallback)  # type: ignore[arg-type]
            readers.append(reader)
            jobs.append((reader, self.grid.box(int(index))))
        batcher = TileBatcher(self.model, self.job.batch_size, self.tiles.margin, self.device, self.amp_dtype)
        probs_out, labels_out = [], []
        for probs in predict_boxes(batcher, jobs, self.grid.volume_shape, self.tiles, self.normalize, self.job.mode):
            if "probabilities" in self.layers:
                probs_out.append(quantize_probabilities(probs))
            if "labels" in self.layers:
                labels_out.append(argmax_labels(probs, np.uint8 if probs.shape[0] <= 256 else np.uint32))
        n = len(ids)
        out: dict[str, Any] = {k: batch[k] for k in ("id", "read_s", "context_voxels")}
        if probs_out:
            out["probabilities"] = probs_out
        if labels_out:
            out["labels"] = labels_out
        seconds = time.perf_counter() - t0
        out.update({
            "predict_s": np.full(n, seconds / n), "forward_s": np.full(n, batcher.forward_seconds / n),
            "tiles": np.full(n, batcher.tiles_run / n), "batches": np.full(n, batcher.batches_run / n),
            "halo_misses": np.asarray([r.misses for r in readers], np.int64),
            "pid": np.full(n, os.getpid(), np.int64), "peak_rss_mb": np.full(n, peak_rss_mb()),
            "actor_init_s": np.full(n, self.init_seconds), "predict_start": np.full(n, wall0),
            "predict_end": np.full(n, time.time()),
        })
        return out


# --- stage 3: write --------------------------------------------------------------------------------------------


def write_blocks(batch: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Write every block's core into the output layers; returns only after all writes completed."""
    import json

    t0 = time.perf_counter()
    spec = BlockJob.model_validate(job)
    grid = BlockGrid.from_dict(spec.grid)
    stores = _open_outputs(json.dumps(spec.layers, sort_keys=True), spec.run_id)
    ids = np.asarray(batch["id"], np.int64)
    futures = []
    for i, index in enumerate(ids):
        box = grid.box(int(index))
        if "probabilities" in stores:
            futures.append(stores["probabilities"][(slice(None), *box)].write(_column(batch, "probabilities", i)))
        if "labels" in stores:
            store = stores["labels"]
            futures.append(store[box].write(_column(batch, "labels", i).astype(store.dtype.numpy_dtype, copy=False)))
    for f in futures:
        f.result()
    n = len(ids)
    seconds = time.perf_counter() - t0
    keep = ("read_s", "context_voxels", "predict_s", "forward_s", "tiles", "batches", "halo_misses", "pid",
            "peak_rss_mb", "actor_init_s", "predict_start", "predict_end")
    return {"id": ids, **{k: np.asarray(batch[k]) for k in keep},
            "voxels": np.asarray([box_voxels(grid.box(int(i))) for i in ids], np.int64),
            "write_s": np.full(n, seconds / max(1, n)), "finished_at": np.full(n, time.time())}
