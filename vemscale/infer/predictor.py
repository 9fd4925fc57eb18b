"""Predict one block: read core + context, run the tiled model, write the core, mark the ledger.

`process_block` and the functions below are plain functions of one block (the igneous idea: the task is
an idempotent function of its box); `Predictor` is the thin Ray Data actor around them that loads the
checkpoint once and opens the input, outputs and ledger once per worker.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel

from vemscale.checkpoint import WEIGHTS_FILE, CheckpointMeta, load_checkpoint, local_checkpoint
from vemscale.infer.ledger import Ledger
from vemscale.infer.outputs import open_layers, write_block
from vemscale.infer.plan import BlockPlan, Box
from vemscale.infer.tiling import Normalizer, TileGrid, predict_block_orthoplane, predict_block_xy, read_span

log = logging.getLogger(__name__)


class BlockJob(BaseModel):
    """Everything a worker needs, JSON-able (it travels to actors as constructor kwargs)."""

    input: str
    scale: int | str | None = None
    checkpoint: str
    weights_sha256: str
    plan: dict[str, Any]
    halo: Literal["auto"] | tuple[int, int, int] = "auto"
    mode: Literal["xy", "orthoplane"] = "xy"
    batch_size: int = 8
    threads: int = 2
    use_gpu: bool = False
    layers: dict[str, dict[str, Any]]  # layer name -> tensorstore spec
    ledger_url: str
    ledger_fingerprint: str


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


class BlockReader:
    """A tiling Reader over one bulk read of the context box; reads outside it go to the volume (counted)."""

    def __init__(self, volume: Any, context: Box) -> None:
        self.volume = volume
        self.context = context
        self.data = self._read(context)
        self.misses = 0

    def _read(self, box: Box) -> np.ndarray:
        data = np.asarray(self.volume.read(box))
        return data if data.ndim == 4 else data[None]

    def __call__(self, z: slice, y: slice, x: slice) -> np.ndarray:
        want = (z, y, x)
        if all(c.start <= w.start and w.stop <= c.stop for c, w in zip(self.context, want)):
            return self.data[(slice(None), *(slice(w.start - c.start, w.stop - c.start) for c, w in zip(self.context, want)))]
        self.misses += 1
        return self._read(want)


def predict_block(
    model: torch.nn.Module,
    reader: BlockReader,
    box: Box,
    volume_shape: tuple[int, int, int],
    grid: TileGrid,
    normalize: Normalizer,
    mode: str,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> np.ndarray:
    """Class probabilities (K, z, y, x) of the core `box` (xy or orthoplane)."""
    fn = predict_block_xy if mode == "xy" else predict_block_orthoplane
    return fn(model, reader, box, volume_shape, grid, normalize, batch_size=batch_size, device=device, amp_dtype=amp_dtype)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def box_voxels(box: Box) -> int:
    return int(np.prod([s.stop - s.start for s in box]))


class Predictor:
    """Ray Data actor: one model per worker; `__call__` predicts and writes a batch of block ids."""

    def __init__(self, job: dict[str, Any]) -> None:
        from vemscale.io.volume import open_volume

        t0 = time.perf_counter()
        self.job = BlockJob.model_validate(job)
        torch.set_num_threads(self.job.threads)
        use_cuda = self.job.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.amp_dtype = torch.bfloat16 if use_cuda else None
        if weights_sha256(self.job.checkpoint) != self.job.weights_sha256:
            raise RuntimeError(f"checkpoint {self.job.checkpoint} changed since the run was planned; rerun infer")
        self.model, meta = load_checkpoint(self.job.checkpoint, self.device)
        self.grid, self.normalize = grid_and_normalizer(meta)
        self.volume = open_volume(self.job.input, scale=self.job.scale)
        self.plan = BlockPlan.from_dict(self.job.plan)
        self.stores = open_layers(self.job.layers)
        self.ledger = Ledger(self.job.ledger_url, self.job.ledger_fingerprint)
        self.init_seconds = time.perf_counter() - t0

    def context_box(self, index: int) -> Box:
        if self.job.halo == "auto":
            return tile_context_box(self.plan.block_box(index), self.plan.volume_shape, self.grid, self.job.mode)
        return self.plan.context_box(index, self.job.halo)

    def process_block(self, index: int) -> dict[str, Any]:
        """Read, predict, write, then mark block `index` done; returns its stats."""
        t0 = time.perf_counter()
        box = self.plan.block_box(index)
        context = self.context_box(index)
        reader = BlockReader(self.volume, context)
        t1 = time.perf_counter()
        probs = predict_block(self.model, reader, box, self.plan.volume_shape, self.grid, self.normalize,
                              self.job.mode, self.job.batch_size, self.device, self.amp_dtype)
        t2 = time.perf_counter()
        write_block(self.stores, box, probs)
        t3 = time.perf_counter()
        stats = {"index": int(index), "voxels": box_voxels(box), "context_voxels": box_voxels(context),
                 "seconds": t3 - t0, "read_s": t1 - t0, "predict_s": t2 - t1, "write_s": t3 - t2,
                 "halo_misses": reader.misses}
        self.ledger.mark_done(index, {k: stats[k] for k in ("voxels", "seconds")})
        stats["peak_rss_mb"] = peak_rss_mb()
        stats["pid"] = os.getpid()
        stats["actor_init_s"] = self.init_seconds
        stats["finished_at"] = time.time()
        return stats

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.process_block(int(i)) for i in batch["id"]]
        return {k: np.asarray([r[k] for r in rows]) for k in rows[0]} if rows else {}
