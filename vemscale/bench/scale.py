"""Benchmark of the block engine: dispatch rate, predict-actor duty cycle, end to end vs MONAI, export.

Each figure is a ratio against a baseline measured in the same run:

- dispatch: >= 1e5 one-tile blocks of a generated volume through the whole `run_infer` pipeline (read tasks ->
  model actors -> write tasks -> ledger) with the registered `pixel_linear` model, so compute is tiny;
  baseline: the pre-engine pipeline (`vemscale.bench.legacy_infer`: one id per Ray Data block, fused actor,
  per-block padded batches) on a smaller ROI of the same volume. Driver RSS sampled during a 1e4- and a
  1e5-block run of the same volume.
- duty: the input served over HTTP by a local server with a fixed bandwidth and per-request latency; the
  model actors' busy fraction (forward passes / their wall time), engine vs the fused baseline.
- e2e: the whole `vemscale infer` command (a subprocess: Ray start-up, actor start-up, reads, writes) on the
  real VNC stack mirror-tiled to >= 80 Mvoxel, vs MONAI `sliding_window_inference` of the same checkpoint on
  the in-memory volume (same tile, overlap = 2 x margin / tile, same threads, argmax kept in memory).
- export: `vemscale export` scale 0 + pyramid + meshes vs one plain tensorstore write (`vemscale.bench.export`).

    python -m vemscale.bench.scale                      # every section (about 20 min on 2 cores)
    python -m vemscale.bench.scale --sections dispatch --blocks 100000
    python -m vemscale.bench.scale --quick              # small sizes: every figure's name in ~2 min
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from vemscale.bench import emit

DATA = Path(os.environ.get("VEMSCALE_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
ROOT = Path(__file__).resolve().parents[2]


# --- helpers ---------------------------------------------------------------------------------------------------


class RssSampler:
    """Peak resident memory of this process, sampled every 50 ms while in the `with` block (MiB)."""

    def __enter__(self) -> RssSampler:
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0.0, threading.Event()
        self.start = self.proc.memory_info().rss / 2**20
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)
            time.sleep(0.05)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self.thread.join()


def pixel_checkpoint(path: Path, tile: int) -> str:
    import torch

    from vemscale.checkpoint import CheckpointMeta, save_checkpoint
    from vemscale.models import create_model

    torch.manual_seed(0)
    model = create_model("pixel_linear", in_chans=1, num_classes=2)
    return str(save_checkpoint(path, model, CheckpointMeta(model=model.spec, tile=tile, margin=0)))


def tiny_checkpoint(path: Path, tile: int = 256, margin: int = 32) -> str:
    import torch

    from vemscale.checkpoint import CheckpointMeta, save_checkpoint
    from vemscale.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny", in_chans=1, num_classes=2)
    return str(save_checkpoint(path, model, CheckpointMeta(model=model.spec, tile=tile, margin=margin)))


def generated_volume(path: Path, shape: tuple[int, int, int], chunks: tuple[int, int, int],
                     flat_right: bool = False) -> str:
    """A raw-encoded zarr of EM-like noise, written slab by slab (never whole in memory); flat_right: the right
    half is constant resin (200)."""
    import tensorstore as ts

    store = ts.open({"driver": "zarr", "kvstore": f"file://{path}/",
                     "metadata": {"shape": list(shape), "chunks": list(chunks), "dtype": "|u1", "compressor": None,
                                  "fill_value": 0}}, create=True, delete_existing=True).result()
    rng = np.random.default_rng(0)
    for z in range(0, shape[0], chunks[0]):
        slab = rng.integers(60, 200, (min(chunks[0], shape[0] - z), *shape[1:]), dtype=np.uint8)
        if flat_right:
            slab[:, :, shape[2] // 2:] = 200
        store[z : z + slab.shape[0]].write(slab).result()
    return str(path)


def mirror_tile(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    from vemscale.bench.export import mirror_tile as tile

    return tile(a, shape)


def infer_config(**kw: Any) -> Any:
    from vemscale.infer.pipeline import InferConfig

    base = dict(progress=False, overwrite=True, num_gpus_per_worker=0, threads_per_worker=1)
    return InferConfig(**{**base, **kw})


def run_engine(cfg: Any) -> dict[str, Any]:
    from vemscale.infer.pipeline import run_infer

    return run_infer(cfg)["summary"]


def run_baseline(cfg: Any) -> dict[str, float]:
    from vemscale.bench.legacy_infer import run_legacy
    from vemscale.infer.pipeline import prepare_infer

    prep = prepare_infer(cfg)
    return run_legacy(prep["job"], prep["ledger"], prep["workers"], cfg.threads_per_worker)


# --- dispatch --------------------------------------------------------------------------------------------------


def dispatch(root: Path, blocks: int, baseline_blocks: int, workers: int) -> dict[str, Any]:
    """Blocks/s of one-tile blocks through the whole pipeline, and driver RSS at 1e4 vs `blocks` blocks."""
    side = 32
    gx = 64
    gy = 16
    nz = -(-blocks // (gx * gy))
    shape = (nz, gy * side, gx * side)
    vol = generated_volume(root / "gen.zarr", shape, (1, 256, 256))
    ckpt = pixel_checkpoint(root / "pixel", tile=side)
    common = dict(input=vol, checkpoint=ckpt, block_shape=(1, side, side), output_chunks=(1, side, side),
                  write="labels", workers=workers, batch_size=8)
    small_z = max(1, -(-10_000 // (gx * gy)))
    out: dict[str, Any] = {"volume_shape": list(shape), "block_shape": [1, side, side]}
    with RssSampler() as rss_small:
        small = run_engine(infer_config(**common, output=str(root / "d_small"), run_dir=str(root / "r_small"),
                                        roi=f"0:{small_z},:,:"))
    with RssSampler() as rss_big:
        big = run_engine(infer_config(**common, output=str(root / "d_big"), run_dir=str(root / "r_big")))
    base_z = max(1, -(-baseline_blocks // (gx * gy)))
    base = run_baseline(infer_config(**common, output=str(root / "d_base"), run_dir=str(root / "r_base"),
                                     roi=f"0:{base_z},:,:"))
    out.update({
        "engine_blocks": big["computed"], "engine_blocks_per_s": big["blocks_per_s"],
        "engine_seconds": big["seconds"], "blocks_per_batch": big["blocks_per_batch"],
        "engine_small_blocks": small["computed"], "engine_small_blocks_per_s": small["blocks_per_s"],
        "baseline_blocks": base["blocks"], "baseline_blocks_per_s": round(base["blocks_per_s"], 1),
        "speedup": round(big["blocks_per_s"] / base["blocks_per_s"], 1),
        "driver_peak_rss_mb_1e4": round(rss_small.peak, 1), "driver_peak_rss_mb_full": round(rss_big.peak, 1),
        "driver_rss_growth": round(rss_big.peak / rss_small.peak - 1, 4),
        "tiles_computed_per_block": round(big["tiles"] / big["computed"], 3),
        "seconds_to_first_block": big["seconds_to_first_block"],
    })
    return out


# --- duty cycle ------------------------------------------------------------------------------------------------


class ThrottledFiles(http.server.SimpleHTTPRequestHandler):
    """Serves a directory at a fixed total bandwidth (bytes/s) plus a fixed latency per request."""

    bandwidth = 8e6
    latency = 0.01
    lock = threading.Lock()
    next_free = [0.0]

    def log_message(self, *args: Any) -> None:
        pass

    def copyfile(self, source: Any, outputfile: Any) -> None:
        data = source.read()
        time.sleep(self.latency)
        with self.lock:  # one shared pipe: transfers queue behind each other
            start = max(time.monotonic(), self.next_free[0])
            self.next_free[0] = start + len(data) / self.bandwidth
        time.sleep(max(0.0, self.next_free[0] - time.monotonic()))
        outputfile.write(data)


def serve(directory: Path, bandwidth: float, latency: float) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = type("Handler", (ThrottledFiles,), {"bandwidth": bandwidth, "latency": latency, "next_free": [0.0]})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a, **k: handler(*a, directory=str(directory), **k))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def duty(root: Path, shape: tuple[int, int, int], bandwidth: float, latency: float) -> dict[str, Any]:
    """Forward-pass share of the model actor's time with reads over a throttled HTTP store."""
    import tensorstore as ts
    import tifffile

    em = tifffile.imread(DATA / "vnc_drosophila_sstem" / "test_unlabeled" / "image.tif")
    vol = mirror_tile(em, shape)
    src = root / "served" / "vol.zarr"
    store = ts.open({"driver": "zarr", "kvstore": f"file://{src}/",
                     "metadata": {"shape": list(shape), "chunks": [1, 256, 256], "dtype": "|u1", "fill_value": 0}},
                    create=True, delete_existing=True).result()
    store.write(vol).result()
    ckpt = tiny_checkpoint(root / "tiny")
    server, url = serve(root / "served", bandwidth, latency)
    try:
        common = dict(input=f"zarr://{url}/vol.zarr", checkpoint=ckpt, block_shape=(2, 384, 384),
                      output_chunks=(2, 128, 128), write="labels", workers=1, batch_size=8, read_tasks=2)
        eng = run_engine(infer_config(**common, output=str(root / "u_eng"), run_dir=str(root / "r_eng")))
        base = run_baseline(infer_config(**common, output=str(root / "u_base"), run_dir=str(root / "r_base")))
    finally:
        server.shutdown()
    mb = float(np.prod(shape)) / 1e6
    return {"volume_shape": list(shape), "bandwidth_mb_s": bandwidth / 1e6, "latency_ms": latency * 1e3,
            "input_mb": round(mb, 1), "engine_predict_busy": eng["predict_busy"],
            "engine_seconds": eng["seconds"], "engine_read_mb_s": round(mb / eng["seconds"], 2),
            "baseline_predict_busy": round(base["predict_busy"], 4), "baseline_seconds": round(base["seconds"], 2),
            "busy_ratio": round(eng["predict_busy"] / base["predict_busy"], 2)}


# --- end to end vs MONAI ---------------------------------------------------------------------------------------


def monai_reference(vol: np.ndarray, ckpt: str, threads: int, batch_size: int) -> float:
    """Seconds for MONAI sliding-window inference of every slice (in memory), argmax kept."""
    import torch
    from monai.inferers import sliding_window_inference

    from vemscale.checkpoint import load_checkpoint
    from vemscale.infer.predictor import grid_and_normalizer

    torch.set_num_threads(threads)
    model, meta = load_checkpoint(ckpt)
    grid, norm = grid_and_normalizer(meta)
    labels = np.empty(vol.shape, np.uint8)
    t0 = time.perf_counter()
    with torch.no_grad():
        for z in range(vol.shape[0]):
            x = torch.from_numpy(norm(vol[None, z : z + 1])).permute(1, 0, 2, 3)  # (1, C, Y, X)
            logits = sliding_window_inference(x, (grid.tile, grid.tile), batch_size, model,
                                              overlap=2 * grid.margin / grid.tile, mode="constant")
            labels[z] = torch.argmax(logits[0], 0).numpy().astype(np.uint8)
    return time.perf_counter() - t0


def e2e(root: Path, shape: tuple[int, int, int], threads: int) -> dict[str, Any]:
    import tifffile

    from vemscale.io import create_ome_zarr

    em = tifffile.imread(DATA / "vnc_drosophila_sstem" / "train" / "image.tif")
    vol = mirror_tile(em, shape)
    src = root / "e2e.zarr"
    create_ome_zarr(str(src), shape, np.uint8, (8, 256, 256), (4.6, 4.6, 50.0)).write(vol).result()
    ckpt = tiny_checkpoint(root / "tiny_e2e")
    t_monai = monai_reference(vol, ckpt, threads, 8)
    del vol
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "vemscale.cli", "infer", f"input={src}", f"output={root / 'e2e_out'}",
           f"checkpoint={ckpt}", f"run_dir={root / 'e2e_run'}", "write=labels", "progress=false", "overwrite=true",
           "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    t_cmd = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"vemscale infer failed: {proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])["summary"]
    voxels = float(np.prod(shape))
    return {"volume_shape": list(shape), "mvoxels": round(voxels / 1e6, 1), "threads": threads,
            "monai_seconds": round(t_monai, 2), "monai_voxels_per_s": round(voxels / t_monai),
            "vemscale_infer_command_seconds": round(t_cmd, 2), "vemscale_voxels_per_s": round(voxels / t_cmd),
            "ratio": round(t_monai / t_cmd, 3), "pipeline_seconds": summary["seconds"],
            "seconds_to_first_block": summary["seconds_to_first_block"], "predict_busy": summary.get("predict_busy"),
            "workers": summary["workers"]}


# --- export ----------------------------------------------------------------------------------------------------


def export(root: Path, shape: tuple[int, int, int]) -> dict[str, Any]:
    from vemscale.bench.export import main as export_main

    out = root / "export.json"
    export_main(["--shape", ",".join(map(str, shape)), "--workdir", str(root), "--json-out", str(out)])
    return json.loads(out.read_text())


SECTIONS = ("dispatch", "duty", "e2e", "export")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vemscale.bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--blocks", type=int, default=100_000, help="blocks in the dispatch run")
    parser.add_argument("--baseline-blocks", type=int, default=2048, help="blocks the pre-engine baseline runs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run: every figure's name)")
    parser.add_argument("--e2e-shape", default="20,2048,2048", help="z,y,x of the mirror-tiled real volume for e2e")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json-out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.quick:
        args.blocks, args.baseline_blocks = 4096, 256
    from vemscale.raycluster import ensure_ray

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        cpus = ensure_ray().get("CPU", 0)
        results["ray_cpus"] = cpus
        if "dispatch" in sections:
            r = results["dispatch"] = dispatch(root, args.blocks, args.baseline_blocks, args.workers)
            print(f"dispatch: {r['engine_blocks']} blocks at {r['engine_blocks_per_s']:.0f} blocks/s "
                  f"(baseline {r['baseline_blocks_per_s']:.1f} blocks/s: {r['speedup']}x); driver peak RSS "
                  f"{r['driver_peak_rss_mb_1e4']:.0f} MiB at {r['engine_small_blocks']} blocks vs "
                  f"{r['driver_peak_rss_mb_full']:.0f} MiB at {r['engine_blocks']} (growth {100 * r['driver_rss_growth']:.1f}%)",
                  flush=True)
        if "duty" in sections:
            shape = (4, 768, 768) if args.quick else (16, 1536, 1536)
            r = results["duty"] = duty(root, shape, bandwidth=8e6, latency=0.01)
            print(f"duty: predict busy {r['engine_predict_busy']:.3f} (baseline {r['baseline_predict_busy']:.3f}: "
                  f"{r['busy_ratio']}x) with reads at {r['bandwidth_mb_s']:.0f} MB/s + {r['latency_ms']:.0f} ms", flush=True)
        if "e2e" in sections:
            shape = (4, 512, 512) if args.quick else tuple(int(v) for v in args.e2e_shape.split(","))
            r = results["e2e"] = e2e(root, shape, threads=int(cpus) or 2)
            print(f"e2e: vemscale infer (whole command) {r['vemscale_voxels_per_s']:.0f} voxels/s vs MONAI "
                  f"{r['monai_voxels_per_s']:.0f} voxels/s: ratio {r['ratio']} on {r['mvoxels']} Mvoxel", flush=True)
        if "export" in sections:
            shape = (8, 512, 512) if args.quick else (32, 2048, 2048)
            r = results["export"] = export(root, shape)
            print(f"export: scale 0 + pyramid + meshes = {r['ratio_export_to_baseline']}x one tensorstore write",
                  flush=True)
    return emit(results, args.json_out)


if __name__ == "__main__":
    raise SystemExit(main())
