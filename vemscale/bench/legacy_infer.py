"""The inference pipeline as it was before the block engine (kept as the benchmarks' baseline only).

What it reproduces, measured in the same run as the engine: one block id per Ray Data block
(`target_max_block_size=1`, a single id-source task), each model actor reading, predicting and writing a
block in sequence (the model idles through every read and write), tile batches padded to `batch_size` per
block (a 1-tile block computes `batch_size` tiles), and one ledger key per block. It uses today's pure
functions (grid, tiling, outputs, ledger), so only the dispatch and the stage layout differ.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from vemscale.blocks.grid import BlockGrid
from vemscale.blocks.ledger import Ledger
from vemscale.infer.outputs import argmax_labels, quantize_probabilities
from vemscale.infer.blockio import pack, read_blocks, unpack, write_blocks
from vemscale.infer.predictor import BlockReader, peak_rss_mb
from vemscale.infer.tiling import TileBatcher, predict_boxes


class FusedPredictor:
    """The old actor: read + predict + write + mark, one block per call."""

    def __init__(self, job: dict[str, Any], ledger: Ledger) -> None:
        from vemscale.infer.predictor import Predictor

        self.inner = Predictor(job)
        self.job, self.ledger = job, ledger

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = []
        for index in batch["id"]:
            t0, wall0 = time.perf_counter(), time.time()
            read = read_blocks({"id": np.asarray([index])}, self.job)
            p = self.inner
            ctx = tuple(slice(int(a), int(b)) for a, b in read["context"][0])
            reader = BlockReader(unpack(read, "data", 0), ctx, p._fallback)
            batcher = TileBatcher(p.model, p.job.batch_size, p.tiles.margin, p.device, p.amp_dtype)
            probs = next(predict_boxes(batcher, [(reader, p.grid.box(int(index)))], p.grid.volume_shape, p.tiles,
                                       p.normalize, p.job.mode))
            forward = batcher.forward_seconds  # a batcher per block: its last batch padded, as the old code did
            out = {"id": np.asarray([index]), "read_s": read["read_s"], "context_voxels": read["context_voxels"]}
            if "probabilities" in p.layers:
                out["probabilities"], out["probabilities_shape"] = pack([quantize_probabilities(probs)])
            if "labels" in p.layers:
                out["labels"], out["labels_shape"] = pack([argmax_labels(probs)])
            n = 1
            out.update({"predict_s": np.full(n, 0.0), "forward_s": np.full(n, forward), "tiles": np.full(n, 0),
                        "batches": np.full(n, 0), "halo_misses": np.zeros(n, np.int64),
                        "pid": np.zeros(n, np.int64), "peak_rss_mb": np.full(n, peak_rss_mb()),
                        "actor_init_s": np.zeros(n), "predict_start": np.zeros(n), "predict_end": np.zeros(n)})
            write_blocks(out, self.job)
            self.ledger.mark_done([int(index)])
            rows.append({"forward_s": forward, "seconds": time.perf_counter() - t0, "start": wall0, "end": time.time()})
        return {"id": np.asarray(batch["id"]), **{k: np.asarray([r[k] for r in rows]) for k in rows[0]},
                "pid": np.full(len(rows), os.getpid())}


def run_legacy(job: dict[str, Any], ledger: Ledger, workers: int, threads: int) -> dict[str, float]:
    """Every pending block of the job's grid through the old one-id-per-block fused actor pool."""
    import ray.data

    from vemscale.blocks.runner import _quiet_ray_data, pending_batches

    grid = BlockGrid.from_dict(job["grid"])
    ids = np.concatenate(list(pending_batches(grid.num_blocks, ledger, 1 << 16)) or [np.zeros(0, np.int64)])
    with _quiet_ray_data() as ctx:
        saved = ctx.target_max_block_size
        ctx.target_max_block_size = 1  # one id per Ray Data block, as before
        try:
            t0 = time.perf_counter()
            ds = ray.data.from_items([{"id": int(i)} for i in ids], override_num_blocks=1)
            ds = ds.map_batches(FusedPredictor, fn_constructor_kwargs={"job": job, "ledger": ledger}, batch_size=1,
                                compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads)
            n = 0
            busy: dict[int, list[float]] = {}  # pid -> forward seconds, first start, last end (as the engine's)
            for batch in ds.iter_batches(batch_size=None):
                n += len(batch["id"])
                for i in range(len(batch["id"])):
                    b = busy.setdefault(int(batch["pid"][i]), [0.0, np.inf, 0.0])
                    b[0] += float(batch["forward_s"][i])
                    b[1], b[2] = min(b[1], float(batch["start"][i])), max(b[2], float(batch["end"][i]))
            seconds = time.perf_counter() - t0
        finally:
            ctx.target_max_block_size = saved
    wall = sum(max(b[2] - b[1], 1e-9) for b in busy.values())
    return {"blocks": n, "seconds": seconds, "blocks_per_s": n / seconds if seconds else 0.0,
            "predict_busy": sum(b[0] for b in busy.values()) / wall if busy else 0.0}


__all__ = ["run_legacy"]
