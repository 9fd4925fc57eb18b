"""The model stage of blockwise inference: `Predictor`, a Ray Data actor that holds one model.

It does forward passes only (normalise, tile, forward, crop, quantise), so a GPU never waits on storage:
`vemscale.infer.blockio` reads and writes in tasks beside it while it computes. Tiles of all blocks in a
batch share fixed-size model batches (`TileBatcher`).
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from vemscale.blocks.grid import BlockGrid, Box
from vemscale.blocks.mask import MaskMap, read_mask
from vemscale.checkpoint import WEIGHTS_FILE, CheckpointMeta, load_checkpoint, local_checkpoint
from vemscale.infer.blockio import BlockJob, pack, unpack
from vemscale.io.volume import open_volume_cached
from vemscale.infer.outputs import argmax_labels, quantize_probabilities
from vemscale.infer.tiling import Normalizer, TileBatcher, TileGrid, predict_boxes
from vemscale.infer.tta import with_tta


def weights_sha256(checkpoint: str | Path) -> str:
    """sha256 of the checkpoint's weights file (what makes two checkpoints the same model)."""
    h = hashlib.sha256()
    with open(local_checkpoint(checkpoint) / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def grid_and_normalizer(meta: CheckpointMeta, lut: Any = None) -> tuple[TileGrid, Normalizer]:
    """The checkpoint's tiling and normalisation; `lut` (a histogram-matching table) goes before the latter."""
    n = meta.normalization
    return TileGrid(meta.tile, meta.margin), Normalizer(float(n.get("scale", 255.0)), tuple(n.get("mean", (0.5,))),
                                                        tuple(n.get("std", (0.25,))),
                                                        None if lut is None else np.asarray(lut, np.uint16))


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


def _per_block(values: list[int], masked: np.ndarray) -> np.ndarray:
    """Values of the computed blocks spread back to every block of the batch (0 for masked ones)."""
    out = np.zeros(len(masked), np.int64)
    out[~masked] = values
    return out


class Predictor:
    """Ray Data actor: one model per worker; `__call__` predicts a batch of read blocks (forward passes only)."""

    def __init__(self, job: dict[str, Any]) -> None:
        import torch

        t0 = time.perf_counter()
        self.job = BlockJob.model_validate(job)
        torch.set_num_threads(self.job.threads)
        use_cuda = self.job.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.amp_dtype = torch.bfloat16 if use_cuda else None
        if weights_sha256(self.job.checkpoint) != self.job.weights_sha256:
            raise RuntimeError(f"checkpoint {self.job.checkpoint} changed since the run was planned; rerun infer")
        model, meta = load_checkpoint(self.job.checkpoint, self.device)
        self.model = with_tta(model, self.job.tta)
        self.tiles, self.normalize = grid_and_normalizer(meta, self.job.lut)
        self.grid = BlockGrid.from_dict(self.job.grid)
        self.layers = set(self.job.layers)
        self.mask = MaskMap.from_dict(self.job.mask) if self.job.mask is not None else None
        self.init_seconds = time.perf_counter() - t0

    def _fallback(self) -> Any:
        return open_volume_cached(self.job.input, self.job.scale, self.job.run_id)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        t0, wall0 = time.perf_counter(), time.time()
        ids = np.asarray(batch["id"], np.int64)
        masked = np.asarray(batch["masked"], bool)
        readers, jobs = [], []
        for i, index in enumerate(ids):
            if masked[i]:
                continue
            ctx = tuple(slice(int(a), int(b)) for a, b in batch["context"][i])
            reader = BlockReader(unpack(batch, "data", i), ctx, self._fallback)  # type: ignore[arg-type]
            readers.append(reader)
            box = self.grid.box(int(index))
            # a block on the tissue's edge: only the tiles with tissue run (the rest is background when written)
            tissue = read_mask(self.mask, box, self.job.run_id) if batch["mask_partial"][i] else None
            jobs.append((reader, box, tissue))
        batcher = TileBatcher(self.model, self.job.batch_size, self.tiles.margin, self.device, self.amp_dtype)
        probs_out, labels_out = [], []
        predicted = predict_boxes(batcher, jobs, self.grid.volume_shape, self.tiles, self.normalize, self.job.mode)
        for i in range(len(ids)):  # masked blocks carry empty arrays (nothing computed, nothing stored)
            probs = None if masked[i] else next(predicted)
            if "probabilities" in self.layers:
                probs_out.append(np.zeros((0, 0, 0, 0), np.uint8) if probs is None else quantize_probabilities(probs))
            if "labels" in self.layers:
                labels_out.append(np.zeros((0, 0, 0), np.uint8) if probs is None else
                                  argmax_labels(probs, np.uint8 if probs.shape[0] <= 256 else np.uint32))
        n = len(ids)
        out: dict[str, Any] = {k: batch[k] for k in ("id", "read_s", "context_voxels", "masked", "mask_partial")}
        if probs_out:
            out["probabilities"], out["probabilities_shape"] = pack(probs_out)
        if labels_out:
            out["labels"], out["labels_shape"] = pack(labels_out)
        seconds = time.perf_counter() - t0
        out.update({
            "predict_s": np.full(n, seconds / n), "forward_s": np.full(n, batcher.forward_seconds / n),
            "tiles": np.full(n, batcher.tiles_run / n), "batches": np.full(n, batcher.batches_run / n),
            "halo_misses": _per_block([r.misses for r in readers], masked),
            "pid": np.full(n, os.getpid(), np.int64), "peak_rss_mb": np.full(n, peak_rss_mb()),
            "actor_init_s": np.full(n, self.init_seconds), "predict_start": np.full(n, wall0),
            "predict_end": np.full(n, time.time()),
        })
        return out


