"""`python -m vemscale.bench.infer`: how close `vemscale infer` gets to the bare model, and what memory it needs.

In one process, on a real ssTEM stack (tiny model, CPU, the checkpoint's 256/32 tiles):
- model only: the forward passes of exactly the tiles and batches the pipeline runs (no I/O, no Ray);
- in-process: `predict_block_xy` over the same blocks from a numpy array (tiling + model, no I/O, no Ray);
- `vemscale infer` end to end per pool shape (workers x threads): wall time of the block pipeline including
  actor start-up, and the steady state after the first block;
- halo overhead: input voxels read per core voxel, tile pixels computed per core voxel;
- peak actor RSS on a volume and on one 8x larger (same blocks): memory is O(block), not O(volume).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATA = Path(os.environ.get("VEMSCALE_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")) \
    / "vnc_drosophila_sstem" / "test_unlabeled" / "image.tif"


class TimedModel(torch.nn.Module):
    """Wraps a model and accumulates the seconds spent in forward passes (and the tiles seen)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.seconds, self.tiles, self.pixels = model, 0.0, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        out = self.model(x)
        self.seconds += time.perf_counter() - t
        self.tiles += x.shape[0]
        self.pixels += x.shape[0] * x.shape[-2] * x.shape[-1]
        return out


def make_volume(path: Path, shape: tuple[int, int, int], chunks: tuple[int, int, int]) -> np.ndarray:
    """An OME-Zarr of `shape` from the ssTEM stack (z mirrored past its 20 sections, xy tiled)."""
    import tifffile

    from vemscale.io.volume import create_ome_zarr

    stack = tifffile.imread(DATA)
    zi = np.arange(shape[0]) % (2 * len(stack))
    zi = np.where(zi < len(stack), zi, 2 * len(stack) - 1 - zi)
    vol = np.ascontiguousarray(np.tile(stack[zi], (1, -(-shape[1] // stack.shape[1]), -(-shape[2] // stack.shape[2])))
                               [:, : shape[1], : shape[2]])
    create_ome_zarr(path, shape, np.uint8, chunks, (4.6, 4.6, 45.0), overwrite=True).write(vol).result()
    return vol


def make_checkpoint(path: Path) -> str:
    from vemscale.checkpoint import CheckpointMeta, save_checkpoint
    from vemscale.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny", in_chans=1, num_classes=2)
    return str(save_checkpoint(path, model, CheckpointMeta(model=model.spec, tile=256, margin=32)))


def model_only(ckpt: str, vol: np.ndarray, block: tuple[int, int, int], chunks: tuple[int, int, int],
               batch_size: int, threads: int) -> dict[str, float]:
    """Forward-pass time and in-process time over the pipeline's blocks, tiles and batches."""
    from vemscale.checkpoint import load_checkpoint
    from vemscale.blocks.grid import BlockGrid
    from vemscale.infer.predictor import grid_and_normalizer
    from vemscale.infer.tiling import numpy_reader, predict_block_xy

    torch.set_num_threads(threads)
    model, meta = load_checkpoint(ckpt)
    grid, norm = grid_and_normalizer(meta)
    timed = TimedModel(model).eval()
    plan = BlockGrid.create(vol.shape, chunks, block)
    read = numpy_reader(vol)
    t = time.perf_counter()
    for i in range(plan.num_blocks):
        predict_block_xy(timed, read, plan.box(i), vol.shape, grid, norm, batch_size=batch_size)
    return {"model_s": timed.seconds, "inprocess_s": time.perf_counter() - t, "tile_pixels": timed.pixels}


def run_pipeline(vol_url: str, ckpt: str, out: Path, block: tuple[int, int, int], chunks: tuple[int, int, int],
                 workers: int, threads: int, batch_size: int) -> dict[str, Any]:
    from vemscale.infer.pipeline import InferConfig, run_infer

    cfg = InferConfig(input=vol_url, output=str(out), checkpoint=ckpt, block_shape=block, output_chunks=chunks,
                      workers=workers, threads_per_worker=threads, batch_size=batch_size, overwrite=True,
                      progress=False, run_dir=str(out.parent / f"run-{out.name}"), num_gpus_per_worker=0)
    return run_infer(cfg)["summary"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vemscale.bench.infer", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,1536,1536", help="z,y,x of the throughput volume (the '8x' RSS volume)")
    parser.add_argument("--block", default="8,768,768", help="z,y,x block shape")
    parser.add_argument("--chunks", default="8,256,256", help="z,y,x output chunks")
    parser.add_argument("--pools", default="2x1,1x2", help="workers x threads per worker, comma separated (1x1 adds a "
                        "1-thread model-only pass)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    shape = tuple(int(v) for v in args.shape.split(","))
    block = tuple(int(v) for v in args.block.split(","))
    chunks = tuple(int(v) for v in args.chunks.split(","))
    pools = [tuple(int(v) for v in p.split("x")) for p in args.pools.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vemscale-bench-infer-"))
    work.mkdir(parents=True, exist_ok=True)

    from vemscale.raycluster import ensure_ray

    load_before = os.getloadavg()[0]
    ckpt = make_checkpoint(work / "ckpt")
    vol = make_volume(work / "vol.ome.zarr", shape, (8, 256, 256))  # type: ignore[arg-type]
    voxels = int(np.prod(shape))
    refs = {n: model_only(ckpt, vol, block, chunks, args.batch_size, n)  # type: ignore[arg-type]
            for n in sorted({w * t for w, t in pools}, reverse=True)}
    ensure_ray()
    rows = []
    for workers, threads in pools:
        s = run_pipeline(str(work / "vol.ome.zarr"), ckpt, work / f"out-{workers}x{threads}", block, chunks,  # type: ignore[arg-type]
                         workers, threads, args.batch_size)
        steady_s = s["seconds"] - (s["seconds_to_first_block"] or 0)
        rows.append((workers, threads, s, steady_s))

    # peak actor RSS: the same pool on a volume 8x smaller (halved axes) than the throughput volume
    small = tuple(max(1, v // 2) for v in shape)
    make_volume(work / "small.ome.zarr", small, (8, 256, 256))  # type: ignore[arg-type]
    s_small = run_pipeline(str(work / "small.ome.zarr"), ckpt, work / "out-small", block, chunks,  # type: ignore[arg-type]
                           pools[0][0], pools[0][1], args.batch_size)
    s_big = rows[0][2]

    print(f"\nvemscale infer benchmark: volume {shape} ({voxels / 1e6:.1f} Mvoxel), block {block}, tiny model, "
          f"tile 256/32, batch {args.batch_size}, CPU; 'vs model' = voxels/s over the model-only row with as many threads")
    print(f"{'what':46s} {'seconds':>8s} {'voxels/s':>11s} {'vs model':>9s}")
    for n, ref in refs.items():
        print(f"{f'model only, {n} thread(s) (forward passes)':46s} {ref['model_s']:8.1f} {voxels / ref['model_s']:11,.0f} "
              f"{1.0:9.2f}")
        print(f"{f'in-process predict_block_xy, {n} thread(s)':46s} {ref['inprocess_s']:8.1f} "
              f"{voxels / ref['inprocess_s']:11,.0f} {ref['model_s'] / ref['inprocess_s']:9.2f}")
    for workers, threads, s, steady_s in rows:
        model_vps = voxels / refs[workers * threads]["model_s"]
        print(f"{f'vemscale infer {workers}x{threads} end to end (blocks)':46s} {s['seconds']:8.1f} {s['voxels_per_s']:11,.0f} "
              f"{s['voxels_per_s'] / model_vps:9.2f}")
        steady = s["voxels"] * (s["blocks"] - 1) / s["blocks"] / steady_s if steady_s > 0 else float("nan")
        print(f"{'  steady state after the first block':46s} {steady_s:8.1f} {steady:11,.0f} {steady / model_vps:9.2f}")
        print(f"{'  actor start-up / time to first block (s)':46s} {s['actor_init_s']:8.1f} {s['seconds_to_first_block']:11.1f}")
        busy = s["predict_s"] / (s["seconds"] * min(workers, s["blocks"]))
        print(f"    actor time: {100 * busy:.0f}% predicting (load-independent efficiency); of block time "
              f"{100 * s['read_s'] / s['block_seconds']:.1f}% read, {100 * s['write_s'] / s['block_seconds']:.1f}% write")
    ref = refs[max(refs)]
    print(f"halo overhead: {s_big['halo_overhead']:.2f} input voxels read per core voxel; "
          f"{ref['tile_pixels'] / voxels:.2f} tile pixels computed per core voxel "
          f"({s_big['tile_recompute']:.2f}x a whole-volume pass: tiles on block seams run once per block)")
    p0 = f"{pools[0][0]}x{pools[0][1]}"
    print(f"peak actor RSS ({p0}): {s_small['peak_actor_rss_mb']:.0f} MiB on {small} ({s_small['blocks']} blocks), "
          f"{s_big['peak_actor_rss_mb']:.0f} MiB on {shape} ({s_big['blocks']} blocks, 8x the voxels): "
          f"{s_big['peak_actor_rss_mb'] / s_small['peak_actor_rss_mb']:.3f}x")
    print(f"load average (1 min) before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(other processes skew every row; OpenMP threads spin-wait badly on a busy machine)")
    print(f"(work dir {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
