"""`run_infer(config)`: validate everything, plan blocks, stream pending blocks through read -> predict -> write.

Order of work: (1) every check a user can fail (input, checkpoint, channels, block geometry, existing
output) raises a UserError before Ray starts or any block runs; (2) outputs and the ledger are created or
reopened; (3) `vemscale.blocks.runner.run_blocks` streams the pending block ids (batches of contiguous ids,
listed from the ledger one shard at a time) through three stages: read tasks, the model actor pool, write
tasks that mark the blocks done; (4) the driver folds the per-block stats as they arrive (progress bar) and
checks at the end that the ledger holds every block.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray

from vemscale.blocks.grid import BlockGrid, format_roi
from vemscale.blocks.ledger import Ledger, ledger_url, volume_identity
from vemscale.blocks.mask import plan_mask
from vemscale.blocks.runner import Stage, ids_per_batch, run_blocks
from vemscale.checkpoint import checkpoint_location
from vemscale.config import absolute_url, dump_config
from vemscale.errors import UserError
from vemscale.infer.blockio import BlockJob, read_blocks, write_blocks
from vemscale.infer.config import InferConfig  # re-exported: the stage's config beside its runner
from vemscale.infer.outputs import check_output, prepare_outputs
from vemscale.infer.predictor import Predictor, grid_and_normalizer, weights_sha256
from vemscale.infer.tiling import TileGrid
from vemscale.infer.tissue import check_mask_cell, make_tissue_mask
from vemscale.io.writable import check_writable
from vemscale.io.shards import Layout, plan_layout
from vemscale.io.urls import parse_url

log = logging.getLogger(__name__)

PREDICTION_VERSION = 2  # bump when the bytes written for the same inputs change


def _channels(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) == 4 else 1


def check_input_dtype(volume: Any, meta: Any, input_url: str, checkpoint: str) -> None:
    """UserError unless the input's grey-value range is the one the checkpoint was trained on (x / scale)."""
    from vemscale.train.data import dtype_scale

    if volume.dtype == np.bool_:
        raise UserError(f"input {input_url!r} is boolean (a mask?), not an EM image; infer takes the grey-value volume")
    if not (np.issubdtype(volume.dtype, np.integer) or np.issubdtype(volume.dtype, np.floating)):
        raise UserError(f"input {input_url!r} has dtype {volume.dtype}; infer takes integer or float grey values")
    trained = float(meta.normalization.get("scale", 255.0))
    scale = dtype_scale(volume.dtype)
    if scale != trained:
        kinds = {255.0: "uint8", 65535.0: "uint16", 1.0: "float in [0, 1]"}
        raise UserError(f"input {input_url!r} is {volume.dtype} (full scale {scale:g}) but checkpoint {checkpoint!r} was "
                        f"trained on {kinds.get(trained, f'full scale {trained:g}')} images: its normalisation would "
                        f"put these grey values out of range. Convert the volume to {kinds.get(trained, 'that range')} "
                        f"(rescale its grey-value range, e.g. its 0.1-99.9 percentiles, to 0..255) or fine-tune on "
                        f"{volume.dtype} data")


def validate(cfg: InferConfig) -> dict[str, Any]:
    """All user-facing checks that need no Ray: returns the opened volume, checkpoint meta and plan."""
    from vemscale.checkpoint import load_checkpoint
    from vemscale.io.volume import open_volume

    volume = open_volume(cfg.input, scale=cfg.scale)
    if volume.ndim not in (3, 4):
        raise UserError(f"input {cfg.input!r} has shape {volume.shape}; infer needs z,y,x or c,z,y,x")
    model, meta = load_checkpoint(cfg.checkpoint, "cpu")  # UserError when unreadable
    del model
    if meta.kind == "pretrain":
        raise UserError(f"checkpoint {cfg.checkpoint!r} is a pre-training checkpoint (its head reconstructs images, it "
                        "has no classes); fine-tune it first (vemscale finetune ... init=<it>) and infer with the result")
    check_input_dtype(volume, meta, cfg.input, cfg.checkpoint)
    run_tta(cfg, meta)  # a checkpoint's tta that is not 1 or 8 fails here, before any output
    in_chans = int(meta.model.get("in_chans", 1))
    if in_chans != _channels(volume.shape):
        raise UserError(f"checkpoint {cfg.checkpoint!r} expects {in_chans} input channel(s) but {cfg.input!r} has "
                        f"{_channels(volume.shape)} (shape {volume.shape})")
    zyx = volume.shape[-3:]
    BlockGrid.create(zyx, cfg.output_chunks, cfg.block_shape, cfg.roi)  # block a whole number of chunks
    k = int(meta.model.get("num_classes", len(meta.classes)))
    fmt = "precomputed" if parse_url(cfg.output).driver == "neuroglancer_precomputed" else "zarr"
    layout = plan_layout(fmt, cfg.sharded, zyx, cfg.output_chunks, cfg.block_shape, shard_shape=cfg.shard_shape,
                         target_voxels=cfg.shard_voxels, channels=k if cfg.write != "labels" else 1)
    plan = BlockGrid.create(zyx, layout.write_unit, cfg.block_shape, cfg.roi,
                            chunk_name="shard" if layout.shard else "output chunk")
    if cfg.roi is not None and format_roi(plan.roi) != cfg.roi.replace(" ", ""):
        log.info("roi %s aligned outwards to %s %s: %s", cfg.roi, "shards" if layout.shard else "output chunks",
                 plan.chunk_shape, format_roi(plan.roi))
    mask = None
    if cfg.mask == "auto":
        open_volume(cfg.input, scale=cfg.mask_scale)  # UserError for a scale that does not exist
        check_mask_cell(cfg.mask_cell)
    elif cfg.mask is not None:
        mask = plan_mask(cfg.mask, cfg.mask_scale, zyx, volume.voxel_size_xyz)
    elif cfg.mask_scale is not None:
        raise UserError("mask_scale is given without mask; set mask=<volume URL> or mask=auto, or drop mask_scale")
    lut = None
    if cfg.match_histogram is not None:  # measured here, once: every block goes through the same table
        from vemscale.io.histogram import match_lut, reference_histogram, volume_histogram

        if _channels(volume.shape) != 1:
            raise UserError(f"match_histogram works on one-channel volumes; {cfg.input!r} has shape {volume.shape}")
        ref = reference_histogram(cfg.match_histogram, getattr(meta, "input_histogram", None))
        src = volume_histogram(cfg.input, scale=cfg.scale)
        if ref.dtype != src.dtype:
            raise UserError(f"match_histogram: the reference is {ref.dtype} but {cfg.input!r} is {src.dtype}; "
                            "match volumes of the same dtype")
        lut = match_lut(src, ref)
    return {"volume": volume, "meta": meta, "plan": plan, "layout": layout, "mask": mask, "lut": lut}


def _num_gpus(cfg: InferConfig) -> float:
    if cfg.num_gpus_per_worker != "auto":
        return float(cfg.num_gpus_per_worker)
    from vemscale.raycluster import cluster_has_gpus

    return 1.0 if cluster_has_gpus() else 0.0


def _num_workers(cfg: InferConfig, num_gpus: float) -> int:
    """Pool size: as configured, or (auto) one actor per GPU share, else one per `threads_per_worker` CPUs."""
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if cfg.workers == "auto":
        workers = int(gpus // num_gpus) if num_gpus > 0 else int(cpus // cfg.threads_per_worker)
        return max(1, workers)
    if cfg.workers * cfg.threads_per_worker > cpus or cfg.workers * num_gpus > gpus:
        log.warning("%d workers x (%d CPUs, %g GPUs) exceed the cluster's %g CPUs, %g GPUs: fewer actors will run",
                    cfg.workers, cfg.threads_per_worker, num_gpus, cpus, gpus)
    return int(cfg.workers)


def tile_recompute_factor(plan: BlockGrid, grid: TileGrid, mode: str) -> float:
    """Tiles computed blockwise / tiles of one whole-ROI pass: tiles straddling block seams run once per block.

    1.0 when every block edge inside the ROI falls on the tile grid (block y/x a multiple of the tile core).
    """
    factor = 1.0
    for axis in ((1, 2) if mode == "xy" else (0, 1, 2)):
        (lo, hi), step = plan.roi[axis], plan.block_shape[axis]
        blockwise = sum(len(grid.tile_range(a, min(a + step, hi))) for a in range(lo, hi, step))
        factor *= blockwise / len(grid.tile_range(lo, hi))
    return factor


def describe_run(cfg: InferConfig, volume: Any, meta: Any, plan: BlockGrid, weights: str, use_gpu: bool,
                 layout: Layout | None = None, mask: dict[str, Any] | None = None, lut: Any = None) -> dict[str, Any]:
    """What decides the bytes of each block (the ledger fingerprint); halo and workers do not.

    threads_per_worker is left out on purpose: torch's CPU kernels can move a probability by one ulp with
    another thread count, which flips a rounded byte only rarely; restarting a whole run for that would cost
    more than it protects. Bytes are identical for the same threads_per_worker and device.
    """
    return {
        "version": PREDICTION_VERSION,
        "input": cfg.input, "scale": cfg.scale, "input_shape": list(volume.shape), "input_dtype": str(volume.dtype),
        "plan": plan.to_dict(),
        "weights_sha256": weights, "model": meta.model, "tile": meta.tile, "margin": meta.margin,
        "normalization": meta.normalization,
        "mode": cfg.mode, "write": cfg.write, "batch_size": cfg.batch_size,
        "device": "cuda-bf16" if use_gpu else "cpu-fp32",
        "layout": layout.to_dict() if layout else None, "mask": mask,
        "match_histogram": None if lut is None else hashlib.sha256(np.asarray(lut, np.uint16).tobytes()).hexdigest(),
        # only when on, so the outputs of runs without it keep their fingerprint (and resume)
        **({"tta": tta} if (tta := run_tta(cfg, meta)) != 1 else {}),
    }


def run_tta(cfg: InferConfig, meta: Any) -> int:
    """The views averaged per tile: the command line's, else the checkpoint's (checked before any output exists)."""
    from vemscale.infer.tta import VIEWS

    views = int(cfg.tta if cfg.tta is not None else getattr(meta, "tta", 1))
    if views not in VIEWS:
        raise UserError(f"checkpoint {cfg.checkpoint!r} asks for tta={views}; use one of {VIEWS}, or override it "
                        "with tta=1 or tta=8")
    return views


class _Stats:
    """The run's per-block stats, folded batch by batch in the driver (O(actors) memory)."""

    def __init__(self) -> None:
        self.sums = {k: 0.0 for k in ("voxels", "context_voxels", "halo_misses", "read_s", "predict_s", "forward_s",
                                      "write_s", "tiles", "batches", "masked", "masked_voxels")}
        self.peak_rss_mb = self.actor_init_s = 0.0
        self.busy: dict[int, list[float]] = {}  # pid -> [forward seconds, first start, last end]
        self.first_block_at: float | None = None

    def __call__(self, batch: dict[str, Any]) -> None:
        for k in self.sums:
            self.sums[k] += float(np.sum(batch[k]))
        self.peak_rss_mb = max(self.peak_rss_mb, float(np.max(batch["peak_rss_mb"])))
        self.actor_init_s = max(self.actor_init_s, float(np.max(batch["actor_init_s"])))
        for pid in np.unique(batch["pid"]):
            sel = batch["pid"] == pid
            b = self.busy.setdefault(int(pid), [0.0, math.inf, 0.0])
            b[0] += float(np.sum(batch["forward_s"][sel]))
            b[1] = min(b[1], float(np.min(batch["predict_start"][sel])))
            b[2] = max(b[2], float(np.max(batch["predict_end"][sel])))
        first = float(np.min(batch["finished_at"]))
        self.first_block_at = first if self.first_block_at is None else min(self.first_block_at, first)

    def summary(self) -> dict[str, Any]:
        s = self.sums
        out: dict[str, Any] = {k: int(s[k]) for k in ("voxels", "context_voxels", "halo_misses", "tiles", "batches",
                                                      "masked", "masked_voxels")}
        out.update({k: round(s[k], 3) for k in ("read_s", "predict_s", "forward_s", "write_s")})
        out["actors"] = len(self.busy)
        if self.busy:
            start = min(b[1] for b in self.busy.values())
            wall = sum(max(b[2] - b[1], 1e-9) for b in self.busy.values())  # each actor's first input to last output
            out["predict_busy"] = round(sum(b[0] for b in self.busy.values()) / wall, 4)
            out["pool_ready_to_first_block_s"] = round(self.first_block_at - start, 3) if self.first_block_at else None
        out["peak_actor_rss_mb"] = round(self.peak_rss_mb, 1)
        out["actor_init_s"] = round(self.actor_init_s, 3)
        return out


def _io_cpus(cfg: InferConfig, workers: int) -> float:
    """CPUs per read/write task: 0 when the actor pool takes every CPU (else the pipeline could not run), else 1."""
    if cfg.io_cpus != "auto":
        return float(cfg.io_cpus)
    cpus = ray.cluster_resources().get("CPU", 0.0)
    return 0.0 if workers * cfg.threads_per_worker >= cpus else 1.0


def prepare_infer(cfg: InferConfig) -> dict[str, Any]:
    """Everything before the first block: checks, outputs, Ray, the ledger and the job the stages share."""
    t_start = time.perf_counter()
    checked = validate(cfg)
    volume, meta, plan, layout, mask = (checked[n] for n in ("volume", "meta", "plan", "layout", "mask"))
    k = int(meta.model.get("num_classes", len(meta.classes)))
    classes = list(meta.classes) if len(meta.classes) == k else [f"class_{i}" for i in range(k)]
    check_output(cfg.output)
    check_writable(cfg.run_dir, "run_dir")  # written at the end: refuse now, not after every block
    if cfg.overwrite:  # forget done blocks before any output is deleted, so a kill in between cannot skip them
        Ledger.invalidate(ledger_url(cfg.output))
    layers = prepare_outputs(cfg.output, plan.volume_shape, volume.voxel_size_xyz, classes, layout,
                             cfg.write, cfg.overwrite, attrs={"checkpoint": cfg.checkpoint, "input": cfg.input,
                                                              "mask": cfg.mask})
    weights = weights_sha256(cfg.checkpoint)

    from vemscale.raycluster import ensure_ray

    ensure_ray()
    tissue = None
    if cfg.mask == "auto":
        tissue = make_tissue_mask(absolute_url(cfg.input), cfg.mask_scale, cfg.output, cfg.mask_cell, cfg.mask_min_std,
                                  cfg.mask_dilate, progress=cfg.progress)
        mask = plan_mask(tissue["url"], None, plan.volume_shape, volume.voxel_size_xyz, where="tissue mask")
        mask_describe: dict[str, Any] | None = {"auto": tissue["fingerprint"], "factors": mask.to_dict()["factors"]}
    elif mask is not None:
        from vemscale.io.volume import open_volume

        mask_describe = {"volume": volume_identity(open_volume(mask.url, scale=mask.scale)),
                         "factors": mask.to_dict()["factors"]}
    else:
        mask_describe = None
    num_gpus = _num_gpus(cfg)
    workers = _num_workers(cfg, num_gpus)
    describe = describe_run(cfg, volume, meta, plan, weights, num_gpus > 0, layout, mask_describe, checked["lut"])
    ledger = Ledger.open(ledger_url(cfg.output), describe, reset=cfg.overwrite)
    num_blocks = plan.num_blocks
    pending = num_blocks - ledger.count_done(num_blocks)
    log.info("%d blocks of %s over roi %s", num_blocks, plan.block_shape, format_roi(plan.roi))
    grid, _ = grid_and_normalizer(meta)
    recompute = tile_recompute_factor(plan, grid, cfg.mode)
    if recompute > 1.05:
        best = math.lcm(grid.core, *plan.chunk_shape[1:])
        log.info("blocks recompute %.0f%% of the tiles at their seams; a block y,x that is a multiple of %d (tile core "
                 "%d, output chunks %s) computes each tile once", 100 * (recompute - 1), best, grid.core,
                 plan.chunk_shape[1:])
    job = BlockJob(input=absolute_url(cfg.input), scale=cfg.scale, checkpoint=checkpoint_location(cfg.checkpoint),
                   weights_sha256=weights, grid=plan.to_dict(), halo=cfg.halo, mode=cfg.mode,
                   batch_size=cfg.batch_size, threads=cfg.threads_per_worker, use_gpu=num_gpus > 0,
                   layers={n: layer.spec for n, layer in layers.items()}, tile=grid.tile, margin=grid.margin,
                   tta=run_tta(cfg, meta), mask=mask.to_dict() if mask is not None else None,
                   lut=None if checked["lut"] is None else checked["lut"].tolist(),
                   run_id=uuid.uuid4().hex).model_dump(mode="json")
    return {"t_start": t_start, "plan": plan, "layers": layers, "classes": classes, "k": k, "ledger": ledger,
            "workers": workers, "num_gpus": num_gpus, "pending": pending, "recompute": recompute, "job": job,
            "layout": layout, "tissue": tissue}


def run_infer(cfg: InferConfig) -> dict[str, Any]:
    """Predict `cfg.input` blockwise into `cfg.output`; resumes from the ledger. Returns outputs and a summary."""
    prep = prepare_infer(cfg)
    t_start, plan, layers, classes, k, ledger = (prep[n] for n in ("t_start", "plan", "layers", "classes", "k", "ledger"))
    workers, num_gpus, pending, recompute, job = (prep[n] for n in ("workers", "num_gpus", "pending", "recompute", "job"))
    num_blocks = plan.num_blocks
    actors = max(1, min(workers, pending))
    io_cpus = _io_cpus(cfg, actors)
    voxel_bytes = 1 + (k if "probabilities" in layers else 0) + (1 if "labels" in layers else 0)  # input + outputs
    per_batch = (cfg.blocks_per_batch if cfg.blocks_per_batch != "auto"
                 else ids_per_batch(plan.block_bytes(voxel_bytes), pending, actors))
    stages = [
        Stage("read", read_blocks, {"job": job}, num_cpus=io_cpus, concurrency=cfg.read_tasks),
        Stage("predict", Predictor, {"job": job}, actors=actors, num_cpus=cfg.threads_per_worker, num_gpus=num_gpus),
        Stage("write", write_blocks, {"job": job}, num_cpus=io_cpus, concurrency=cfg.write_tasks),
    ]
    stats = _Stats()
    t_pool_wall = time.time()
    run = run_blocks("infer", num_blocks, ledger, stages, batch_ids=per_batch, on_batch=stats,
                     progress=cfg.progress)
    summary = {
        "blocks": num_blocks, "computed": run["computed"], "skipped": run["skipped"], "workers": workers,
        "threads_per_worker": cfg.threads_per_worker, "num_gpus_per_worker": num_gpus,
        "blocks_per_batch": per_batch, "read_tasks": cfg.read_tasks, "write_tasks": cfg.write_tasks,
        "seconds": run["seconds"], "blocks_per_s": run["blocks_per_s"],
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "tile_recompute": round(recompute, 4),
        "sharded": prep["layout"].shard is not None, "shard_shape": prep["layout"].shard,
        "seconds_to_first_block": round(stats.first_block_at - t_pool_wall, 3) if stats.first_block_at else None,
        **stats.summary(),
    }
    summary["voxels_per_s"] = round(summary["voxels"] / run["seconds"], 1) if run["computed"] and run["seconds"] else 0.0
    summary["halo_overhead"] = round(summary["context_voxels"] / summary["voxels"], 4) if summary["voxels"] else None
    log.info("infer: %d blocks computed (%d of them outside the mask, written as background), %d done before, %d "
             "voxels in %.1f s (%.0f voxels/s)", summary["computed"], summary["masked"], summary["skipped"],
             summary["voxels"], summary["seconds"], summary["voxels_per_s"])
    result = {
        "outputs": {n: layer.url for n, layer in layers.items()},
        "output": cfg.output, "ledger": ledger.url, "classes": classes,
        "plan": {**plan.to_dict(), "num_blocks": num_blocks, "grid_shape": list(plan.grid_shape)},
        "summary": summary,
    }
    if prep["tissue"] is not None:
        result["tissue_mask"] = prep["tissue"]
    _write_run_files(cfg, result)
    return result


def _write_run_files(cfg: InferConfig, result: dict[str, Any]) -> None:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "infer_config.yaml")
    from vemscale.io.atomic import write_text

    write_text(run_dir / "infer_summary.json", json.dumps(result, indent=2, default=str))


__all__ = ["InferConfig", "run_infer", "prepare_infer", "validate", "describe_run"]
