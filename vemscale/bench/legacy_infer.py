"""The inference pipeline as it was before the block engine (kept as the benchmarks' baseline only).

What it reproduces, measured in the same run as the engine: one block id per Ray Data block
(`target_max_block_size=1`, a single id-source task), each model actor reading, predicting and writing a
block in sequence (the model idles through every read and write), tile batches padded to `batch_size` per
block (a 1-tile block computes `batch_size` tiles), and one ledger key per block. It uses today's pure
functions (grid, tiling, outputs, ledger), so only the dispatch and the stage layout differ.
"""

from __future__ import annotations

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
            t0 = time.perf_counter()
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
            rows.append({"forward_s": forward, "seconds": time.perf_counter() - t0, "start": t0})
        return {"id": np.asarray(batch["id"]), "forward_s": np.asarray([r["forward_s"] for r in rows]),
                "seconds": np.asarray([r["seconds"] for r in rows])}


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
            forward = n = 0
            for batch in ds.iter_batches(batch_size=None):
                forward += float(np.sum(batch["forward_s"]))
                n += len(batch["id"])
            seconds = time.perf_counter() - t0
        finally:
            ctx.target_max_block_size = saved
    return {"blocks": n, "seconds": seconds, "blocks_per_s": n / seconds if seconds else 0.0,
            "predict_busy": forward / (workers * seconds) if seconds else 0.0}


__all__ = ["run_legacy"]
