"""`run_infer(config)`: validate everything, plan blocks, stream pending block ids through a Ray Data actor pool.

Order of work: (1) every check a user can fail (input, checkpoint, channels, block geometry, existing
output) raises a UserError before Ray starts or any block runs; (2) outputs and the ledger are created or
reopened; (3) pending block ids stream from a lazy source that lists the ledger one shard at a time into
`map_batches(Predictor, batch_size=1, compute=ActorPoolStrategy(size=workers))`; (4) the driver counts
the per-block stats as they arrive (progress bar) and checks at the end that the ledger holds every block.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np
import ray.data
from pydantic import Field, field_validator
from ray.data import Datasource
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import ReadTask

from vemscale.checkpoint import checkpoint_location
from vemscale.config import StageConfig, dump_config
from vemscale.errors import UserError
from vemscale.infer.ledger import SHARD, Ledger, ledger_url
from vemscale.infer.outputs import check_output, prepare_outputs
from vemscale.infer.plan import BlockPlan, format_roi
from vemscale.infer.predictor import BlockJob, grid_and_normalizer, weights_sha256
from vemscale.infer.tiling import TileGrid

log = logging.getLogger(__name__)

PREDICTION_VERSION = 1  # bump when the bytes written for the same inputs change


class InferConfig(StageConfig):
    """`vemscale infer`: predict a volume blockwise with a checkpoint."""

    input: str = Field(description="volume URL (zarr, OME-Zarr, n5, precomputed, tiff...; local or s3/gs)")
    output: str = Field(description="output directory/URL (OME-Zarr group; precomputed://... for precomputed)")
    checkpoint: str = Field(description="vemscale checkpoint directory (local path, or s3:// gs:// URL)")
    scale: int | str | None = None  # multiscale level of the input (OME-Zarr index/path); None = finest
    block_shape: tuple[int, int, int] = (16, 768, 768)  # z,y,x block core; whole output chunks (768 = 4 tile cores of 192)
    halo: Literal["auto"] | tuple[int, int, int] = "auto"  # z,y,x context read with each block; auto = what tiles read
    output_chunks: tuple[int, int, int] = (16, 128, 128)  # z,y,x storage chunks of the outputs
    roi: str | None = None  # z0:z1,y0:y1,x0:x1 (aligned outwards to output chunks); None = whole volume
    mode: Literal["xy", "orthoplane"] = "xy"
    write: Literal["labels", "probabilities", "both"] = "both"
    workers: Literal["auto"] | int = "auto"  # actors (one model each); auto: one per GPU, else CPUs // threads
    threads_per_worker: int = Field(1, ge=1)  # torch threads (and Ray CPUs) per actor
    batch_size: int = Field(8, ge=1)  # 2D tiles per forward pass
    num_gpus_per_worker: Literal["auto"] | float = "auto"  # auto: 1 when the cluster has GPUs, else 0
    overwrite: bool = False  # replace an existing output (and its ledger) instead of resuming
    progress: bool = True  # a progress bar over blocks on stderr

    @field_validator("roi", mode="before")
    @classmethod
    def _roi_text(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            if not all(isinstance(p, str) for p in v):
                raise ValueError("roi must be a string 'z0:z1,y0:y1,x0:x1' (quote it in YAML)")
            return ",".join(v)
        return v

    @field_validator("workers")
    @classmethod
    def _workers_positive(cls, v: Any) -> Any:
        if v != "auto" and v < 1:
            raise ValueError("workers must be 'auto' or a positive integer")
        return v

    @field_validator("halo")
    @classmethod
    def _halo_non_negative(cls, v: Any) -> Any:
        if v != "auto" and min(v) < 0:
            raise ValueError("halo must be 'auto' or three non-negative integers z,y,x")
        return v


class PendingBlocks(Datasource):
    """A Ray Data datasource of the block ids not yet in the ledger, one id per Ray Data block.

    Read tasks take no CPU (`ray.data.range`'s take one each, so an actor pool using every core starves
    them and the run hangs) and run one at a time; each lists one ledger shard at a time, so no one holds
    all ids. One id per Ray Data block lets the actor pool balance blocks one by one.
    """

    def __init__(self, num_blocks: int, ledger: Ledger) -> None:
        self.num_blocks, self.ledger = int(num_blocks), ledger

    def estimate_inmemory_data_size(self) -> int:
        return 8 * self.num_blocks

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None) -> list:
        n, ledger = self.num_blocks, self.ledger
        n_tasks = max(1, min(parallelism if parallelism > 0 else 1, -(-n // SHARD)))
        step = -(-n // n_tasks)

        def read(lo: int, hi: int) -> Iterable[Any]:
            for ids in ledger.pending(lo, hi):
                for i in ids:
                    yield BlockAccessor.batch_to_block({"id": np.asarray([i], np.int64)})

        return [ReadTask(lambda lo=lo, hi=min(lo + step, n): read(lo, hi),
                         BlockMetadata(num_rows=None, size_bytes=8 * (min(lo + step, n) - lo), exec_stats=None))
                for lo in range(0, n, step)]


def _channels(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) == 4 else 1


def validate(cfg: InferConfig) -> dict[str, Any]:
    """All user-facing checks that need no Ray: returns the opened volume, checkpoint meta and plan."""
    from vemscale.checkpoint import load_checkpoint
    from vemscale.io.volume import open_volume

    volume = open_volume(cfg.input, scale=cfg.scale)
    if volume.ndim not in (3, 4):
        raise UserError(f"input {cfg.input!r} has shape {volume.shape}; infer needs z,y,x or c,z,y,x")
    model, meta = load_checkpoint(cfg.checkpoint, "cpu")  # UserError when unreadable
    del model
    in_chans = int(meta.model.get("in_chans", 1))
    if in_chans != _channels(volume.shape):
        raise UserError(f"checkpoint {cfg.checkpoint!r} expects {in_chans} input channel(s) but {cfg.input!r} has "
                        f"{_channels(volume.shape)} (shape {volume.shape})")
    plan = BlockPlan.create(volume.shape[-3:], cfg.output_chunks, cfg.block_shape, cfg.roi)
    if cfg.roi is not None and format_roi(plan.roi) != cfg.roi.replace(" ", ""):
        log.info("roi %s aligned outwards to output chunks %s: %s", cfg.roi, plan.chunk_shape, format_roi(plan.roi))
    return {"volume": volume, "meta": meta, "plan": plan}


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


def tile_recompute_factor(plan: BlockPlan, grid: TileGrid, mode: str) -> float:
    """Tiles computed blockwise / tiles of one whole-ROI pass: tiles straddling block seams run once per block.

    1.0 when every block edge inside the ROI falls on the tile grid (block y/x a multiple of the tile core).
    """
    factor = 1.0
    for axis in ((1, 2) if mode == "xy" else (0, 1, 2)):
        (lo, hi), step = plan.roi[axis], plan.block_shape[axis]
        blockwise = sum(len(grid.tile_range(a, min(a + step, hi))) for a in range(lo, hi, step))
        factor *= blockwise / len(grid.tile_range(lo, hi))
    return factor


def describe_run(cfg: InferConfig, volume: Any, meta: Any, plan: BlockPlan, weights: str, use_gpu: bool) -> dict[str, Any]:
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
    }


@contextlib.contextmanager
def _one_block_per_ray_block() -> Iterator[None]:
    """Ray Data settings for the run, restored afterwards.

    A tiny target block size makes every id, and every result row, its own Ray Data block: the pool then
    hands out one block per actor call (load balancing, prompt progress, a killed actor retries one block)
    instead of buffering all ids of a read task into one block. Also no Ray Data progress bars.
    """
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.target_max_block_size, ctx.enable_progress_bars, ctx.print_on_execution_start)
    ctx.target_max_block_size, ctx.enable_progress_bars, ctx.print_on_execution_start = 1, False, False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    try:
        yield
    finally:
        ctx.target_max_block_size, ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def _run_pool(job: BlockJob, num_blocks: int, ledger: Ledger, workers: int, num_gpus: float,
              bar: Any) -> dict[str, Any]:
    """Stream pending blocks through the actor pool; aggregate the per-block stats."""
    from vemscale.infer.predictor import Predictor

    agg = {"computed": 0, "voxels": 0, "context_voxels": 0, "block_seconds": 0.0, "read_s": 0.0, "predict_s": 0.0,
           "write_s": 0.0, "halo_misses": 0, "peak_actor_rss_mb": 0.0, "actor_init_s": 0.0, "actors": set(),
           "first_block_at": None}
    with _one_block_per_ray_block():
        # one read task at a time: 0-CPU tasks are not capped by CPUs, and a flood of one-id blocks from many
        # concurrent readers slows the executor down (with 50k blocks ~60 ms per block vs ~12 ms)
        ds = ray.data.read_datasource(PendingBlocks(num_blocks, ledger), num_cpus=0, concurrency=1)
        ds = ds.map_batches(Predictor, fn_constructor_kwargs={"job": job.model_dump(mode="json")}, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=job.threads, num_gpus=num_gpus)
        for row in ds.iter_rows():
            _fold(agg, row)
            bar.update(1)
    agg["actors"] = len(agg["actors"])
    return agg


def _fold(agg: dict[str, Any], row: dict[str, Any]) -> None:
    """Add one block's stats to the run's."""
    agg["computed"] += 1
    for k in ("voxels", "context_voxels", "halo_misses"):
        agg[k] += int(row[k])
    for k in ("read_s", "predict_s", "write_s"):
        agg[k] += float(row[k])
    agg["block_seconds"] += float(row["seconds"])
    agg["peak_actor_rss_mb"] = max(agg["peak_actor_rss_mb"], float(row["peak_rss_mb"]))
    agg["actor_init_s"] = max(agg["actor_init_s"], float(row["actor_init_s"]))
    agg["actors"].add(int(row["pid"]))
    agg["first_block_at"] = min(agg["first_block_at"] or np.inf, float(row["finished_at"]))


def run_infer(cfg: InferConfig) -> dict[str, Any]:
    """Predict `cfg.input` blockwise into `cfg.output`; resumes from the ledger. Returns outputs and a summary."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    checked = validate(cfg)
    volume, meta, plan = checked["volume"], checked["meta"], checked["plan"]
    k = int(meta.model.get("num_classes", len(meta.classes)))
    classes = list(meta.classes) if len(meta.classes) == k else [f"class_{i}" for i in range(k)]
    check_output(cfg.output)
    if cfg.overwrite:  # forget done blocks before any output is deleted, so a kill in between cannot skip them
        Ledger(ledger_url(cfg.output), "").clear()
    layers = prepare_outputs(cfg.output, plan.volume_shape, volume.voxel_size_xyz, classes, plan.chunk_shape,
                             cfg.write, cfg.overwrite, attrs={"checkpoint": cfg.checkpoint, "input": cfg.input})
    weights = weights_sha256(cfg.checkpoint)

    from vemscale.raycluster import ensure_ray

    ensure_ray()
    num_gpus = _num_gpus(cfg)
    workers = _num_workers(cfg, num_gpus)
    describe = describe_run(cfg, volume, meta, plan, weights, num_gpus > 0)
    ledger = Ledger.open(ledger_url(cfg.output), describe, reset=cfg.overwrite)
    num_blocks = plan.num_blocks
    skipped = ledger.count_done(num_blocks)
    pending = num_blocks - skipped
    log.info("%d blocks of %s over roi %s: %d done before, %d to compute", num_blocks, plan.block_shape,
             format_roi(plan.roi), skipped, pending)
    grid, _ = grid_and_normalizer(meta)
    recompute = tile_recompute_factor(plan, grid, cfg.mode)
    if recompute > 1.05:
        best = math.lcm(grid.core, *plan.chunk_shape[1:])
        log.info("blocks recompute %.0f%% of the tiles at their seams; a block y,x that is a multiple of %d (tile core "
                 "%d, output chunks %s) computes each tile once", 100 * (recompute - 1), best, grid.core,
                 plan.chunk_shape[1:])
    job = BlockJob(input=cfg.input, scale=cfg.scale, checkpoint=checkpoint_location(cfg.checkpoint),
                   weights_sha256=weights, plan=plan.to_dict(), halo=cfg.halo, mode=cfg.mode,
                   batch_size=cfg.batch_size, threads=cfg.threads_per_worker, use_gpu=num_gpus > 0,
                   layers={n: layer.spec for n, layer in layers.items()}, ledger_url=ledger.url,
                   ledger_fingerprint=ledger.fingerprint)
    t_pool, t_pool_wall = time.perf_counter(), time.time()
    agg: dict[str, Any] = {"computed": 0, "voxels": 0, "context_voxels": 0, "first_block_at": None}
    if pending:
        with tqdm(total=pending, unit="block", desc="infer", disable=not cfg.progress, mininterval=1.0) as bar:
            try:
                agg = _run_pool(job, num_blocks, ledger, min(workers, pending), num_gpus, bar)
            except Exception as err:
                done = ledger.count_done(num_blocks)
                raise RuntimeError(f"inference failed with {done}/{num_blocks} blocks done (rerun to resume): "
                                   f"{type(err).__name__}: {err}") from err
    seconds = time.perf_counter() - t_pool
    done = ledger.count_done(num_blocks)
    if done != num_blocks or agg["computed"] != pending:
        raise RuntimeError(f"inference incomplete: ledger holds {done}/{num_blocks} blocks, {agg['computed']} of "
                           f"{pending} pending blocks reported; rerun to resume")
    summary = {
        "blocks": num_blocks, "computed": agg["computed"], "skipped": skipped, "workers": workers,
        "threads_per_worker": cfg.threads_per_worker, "num_gpus_per_worker": num_gpus,
        "voxels": agg["voxels"], "seconds": round(seconds, 3),
        "voxels_per_s": round(agg["voxels"] / seconds, 1) if agg["computed"] and seconds > 0 else 0.0,
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "halo_overhead": round(agg["context_voxels"] / agg["voxels"], 4) if agg["voxels"] else None,
        "tile_recompute": round(recompute, 4),
        "seconds_to_first_block": round(agg["first_block_at"] - t_pool_wall, 3) if agg["first_block_at"] else None,
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in agg.items()
           if k not in ("computed", "voxels", "context_voxels", "first_block_at")},
    }
    log.info("infer: %d blocks computed, %d skipped, %d voxels in %.1f s (%.0f voxels/s)", summary["computed"],
             skipped, summary["voxels"], seconds, summary["voxels_per_s"])
    result = {
        "outputs": {n: layer.url for n, layer in layers.items()},
        "output": cfg.output, "ledger": ledger.url, "classes": classes,
        "plan": {**plan.to_dict(), "num_blocks": num_blocks, "grid_shape": list(plan.grid_shape)},
        "summary": summary,
    }
    _write_run_files(cfg, result)
    return result


def _write_run_files(cfg: InferConfig, result: dict[str, Any]) -> None:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "infer_config.yaml")
    (run_dir / "infer_summary.json").write_text(json.dumps(result, indent=2, default=str))


__all__ = ["InferConfig", "run_infer", "validate", "describe_run", "PendingBlocks"]
