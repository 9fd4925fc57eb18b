"""Benchmark of `vemscale curate`: patches/s of the Ray engine vs a plain loop doing the same work, same run.

Both cut the same 224x224 patches of the same volumes (the CEM500K grid), convert them to 8 bit, compute the
statistics and dHash and write each kept patch as a PNG; the loop does it in this one process (no Ray, no
ledger, no manifest, no de-duplication), the engine runs every pass (sample, duplicates, manifest, report).
The volumes are the real VNC unlabeled split, mirror-tiled in y,x to `--size` (real texture, so the filters
and hashes see EM), written as zarr.

    python -m vemscale.bench.curate                 # 20 x 4096 x 4096 (6,400 patches), ~3 min on 2 cores
    python -m vemscale.bench.curate --size 2048     # quick
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from vemscale.bench import emit

DATA = Path(os.environ.get("VEMSCALE_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def plain_loop(url: str, out: Path, patch: int) -> int:
    """The same reads and per-patch work, one process: returns the patches cut."""
    from vemscale.curate import patches as P
    from vemscale.curate.tasks import png_bytes
    from vemscale.io.volume import open_volume

    vol = open_volume(url)
    z, h, w = vol.shape
    ys, xs = P.patch_starts(h, patch), P.patch_starts(w, patch)
    n = 0
    for k in range(z):
        for y in ys:
            band = np.asarray(vol.read((slice(k, k + 1), slice(int(y), int(y) + patch), slice(0, w))))[0]
            for x in xs:
                x8 = band[:, int(x) : int(x) + patch]
                st = P.patch_stats(x8)
                P.dhash(x8)
                if P.reason(st, P.Filters()) == "":
                    d = out / f"{k:06d}"
                    d.mkdir(parents=True, exist_ok=True)
                    (d / f"{y}_{x}.png").write_bytes(png_bytes(x8))
                n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="y and x of the tiled volume")
    ap.add_argument("--slices", type=int, default=20)
    ap.add_argument("--patch", type=int, default=224)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import tifffile

    from vemscale.bench.scale import mirror_tile
    from vemscale.curate.run import CurateConfig, run_curate
    from vemscale.io import create_ome_zarr

    src = tifffile.imread(DATA / "vnc_drosophila_sstem" / "test_unlabeled" / "image.tif")[: a.slices]
    with tempfile.TemporaryDirectory(prefix="vemscale-bench-curate-") as tmp:
        root = Path(tmp)
        url = str(root / "vol.ome.zarr")
        store = create_ome_zarr(url, (src.shape[0], a.size, a.size), np.uint8, (1, 512, 512), (4.6, 4.6, 50.0))
        for k in range(src.shape[0]):
            store[k].write(mirror_tile(src[k], (a.size, a.size))).result()
        # warm-up: Ray start-up and imports, outside the timed runs
        run_curate(CurateConfig(sources=[{"path": url, "slices": "0:1"}], output=str(root / "warm"),
                                run_dir=str(root / "run-warm"), patch=a.patch, progress=False))
        t = time.perf_counter()
        n_loop = plain_loop(url, root / "loop", a.patch)
        loop_s = time.perf_counter() - t
        t = time.perf_counter()
        res = run_curate(CurateConfig(sources=[url], output=str(root / "engine"), run_dir=str(root / "run"),
                                      patch=a.patch, progress=False))
        engine_s = time.perf_counter() - t
    result = {"shape": [int(src.shape[0]), a.size, a.size], "patch": a.patch, "patches": res["drawn"],
              "kept": res["kept"], "duplicates": res["duplicates"], "loop_patches": n_loop,
              "loop_s": round(loop_s, 2), "engine_s": round(engine_s, 2),
              "loop_patches_per_s": round(n_loop / loop_s, 1), "engine_patches_per_s": round(res["drawn"] / engine_s, 1),
              "speedup_engine_over_loop": round((res["drawn"] / engine_s) / (n_loop / loop_s), 3),
              "engine_timings": res["timings"], "cpus": os.cpu_count()}
    return emit(result, a.json)


if __name__ == "__main__":
    raise SystemExit(main())
