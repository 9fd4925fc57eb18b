"""Benchmark of `vemscale instances`: voxels/s against one in-memory pass, and the table of >= 1e5 objects.

- speed: the instance stage (ids across blocks, segmentation, the per-object table with surfaces and hulls,
  plots; a local Ray on this machine's CPUs) on the real VNC mitochondria labels, vs one in-memory pass over
  the same volume in this process: tifffile read + whole-volume cc3d + scikit-image `regionprops_table`
  (area, bbox, centroid). The baseline computes less (no surfaces, hulls, ledgers or files); the ratio is
  what the blockwise, resumable, unbounded-size stage costs over holding everything in memory.
- split: the same with `split=watershed` (h-maxima 20 nm) vs one in-memory whole-volume watershed (scipy
  distance transform, h-maxima, scikit-image watershed) and vs the stage without the split.
- table: a generated label volume of small blobs on a lattice plus long bars crossing every block, with
  >= 1e5 objects; the driver's resident memory is sampled during the run, at 1/8 and at full object count,
  so its growth shows whether the driver holds objects (it holds one slab of block keys and the face pairs).

    python -m vemscale.bench.instances            # about 5 min on 2 cores
    python -m vemscale.bench.instances --quick    # small sizes, every figure's name in ~1 min
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from vemscale.bench import emit

from vemscale.bench.scale import DATA, RssSampler


def lattice_labels(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Blobs of 2 x 4 x 4 voxels on a 4 x 8 x 8 lattice (each present with p = 0.8) and bars along x every 64 rows."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    present = rng.random((z // 4, y // 8, x // 8)) < 0.8
    cell = np.zeros((4, 8, 8), np.uint8)
    cell[1:3, 2:6, 2:6] = 1
    out = np.kron(present.astype(np.uint8), cell)
    out[1:3, 4::64, :] = 1  # long objects: each crosses every block along x
    return np.pad(out, [(0, s - o) for s, o in zip(shape, out.shape)])


def _run_stage(source: str, output: Path, block: tuple[int, int, int], voxel: tuple[float, float, float],
               **keys: Any) -> dict[str, Any]:
    from vemscale.objects.run import InstancesConfig, run_instances

    cfg = InstancesConfig(source=source, output=str(output), classes=["1"], voxel_size=voxel, block_shape=block,
                          chunk=(min(16, block[0]), 128, 128), progress=False, run_dir=str(output) + "_run", **keys)
    with RssSampler() as rss:
        t0 = time.perf_counter()
        result = run_instances(cfg)
        seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "objects": result["objects"], "timings": result["timings"],
            "split": result.get("split"),
            "driver_rss_growth_mb": round(rss.peak - rss.start, 1), "crossing_components": result["crossing_components"]}


def speed(root: Path, quick: bool) -> dict[str, Any]:
    import cc3d
    import tifffile
    from skimage.measure import regionprops_table

    src = DATA / "vnc_drosophila_sstem" / "train" / "labels_mitochondria.tif"
    if quick:
        tifffile.imwrite(root / "mito.tif", tifffile.imread(src)[:8, :512, :512])
        src = root / "mito.tif"
    t0 = time.perf_counter()
    labels = tifffile.imread(src)
    cc = cc3d.connected_components(labels, connectivity=26)
    props = regionprops_table(cc, properties=("label", "area", "bbox", "centroid"))
    base_s = time.perf_counter() - t0
    voxels = labels.size
    stage = _run_stage(str(src), root / "vnc_objects", (8, 512, 512) if not quick else (8, 256, 256), (4.6, 4.6, 50.0))
    assert stage["objects"] == len(props["label"]), "the stage and the in-memory pass disagree on the object count"
    return {"volume": str(src), "voxels": voxels, "objects": stage["objects"],
            "baseline_in_memory_s": round(base_s, 2), "baseline_voxels_per_s": round(voxels / base_s),
            "stage_s": stage["seconds"], "stage_voxels_per_s": round(voxels / stage["seconds"]),
            "ratio_stage_to_in_memory": round(base_s / stage["seconds"], 3), "stage_timings": stage["timings"]}


def split(root: Path, quick: bool) -> dict[str, Any]:
    """`split=watershed` on the real VNC mitochondria labels vs one in-memory whole-volume pass (scipy distance
    transform, h-maxima, scikit-image watershed), and vs the stage without the split."""
    import cc3d
    import tifffile
    from scipy import ndimage
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    src = DATA / "vnc_drosophila_sstem" / "train" / "labels_mitochondria.tif"
    if quick:
        tifffile.imwrite(root / "mito_split.tif", tifffile.imread(src)[:8, :512, :512])
        src = root / "mito_split.tif"
    voxel, h_nm = (4.6, 4.6, 50.0), 20.0
    t0 = time.perf_counter()
    mask = tifffile.imread(src) > 0
    dist = ndimage.distance_transform_edt(mask, sampling=voxel[::-1])
    markers = cc3d.connected_components((h_maxima(dist, h_nm) > 0).astype(np.uint8), connectivity=26)
    ws = watershed(-dist, markers, mask=mask, connectivity=3)
    base_s = time.perf_counter() - t0
    pieces = int(len(np.unique(ws[ws > 0])))
    block = (8, 512, 512) if not quick else (8, 256, 256)
    plain = _run_stage(str(src), root / "vnc_plain", block, voxel)
    stage = _run_stage(str(src), root / "vnc_split", block, voxel, split="watershed", watershed={"h_nm": h_nm})
    return {"volume": str(src), "voxels": int(mask.size), "h_nm": h_nm, "objects_before": plain["objects"],
            "pieces": stage["objects"], "baseline_pieces": pieces, "split": stage["split"],
            "baseline_in_memory_s": round(base_s, 2), "stage_s": stage["seconds"], "stage_without_split_s": plain["seconds"],
            "ratio_stage_to_in_memory": round(base_s / stage["seconds"], 3),
            "ratio_split_to_no_split": round(stage["seconds"] / plain["seconds"], 2), "stage_timings": stage["timings"]}


def table(root: Path, quick: bool) -> dict[str, Any]:
    from vemscale.io import create_ome_zarr

    full = (16, 512, 1024) if quick else (32, 1024, 2048)
    out: dict[str, Any] = {}
    for name, shape in (("eighth", (full[0], full[1] // 2, full[2] // 4)), ("full", full)):
        labels = lattice_labels(shape)
        url = str(root / f"lattice_{name}.zarr")
        store = create_ome_zarr(url, shape, np.uint8, (16, 128, 128), (8.0, 8.0, 30.0))
        store[...].write(labels).result()
        del labels
        run = _run_stage(url, root / f"lattice_{name}_objects", (16, 512, 512), (8.0, 8.0, 30.0))
        import pyarrow.parquet as pq

        rows = pq.read_metadata(str(next((root / f"lattice_{name}_objects" / "objects").glob("*.parquet")))).num_rows \
            if run["objects"] else 0
        out[name] = {"shape": list(shape), "voxels": int(math.prod(shape)), **run, "rows_in_first_part": rows}
    grow = out["full"]["driver_rss_growth_mb"] - out["eighth"]["driver_rss_growth_mb"]
    out["objects_ratio"] = round(out["full"]["objects"] / max(1, out["eighth"]["objects"]), 2)
    out["driver_rss_growth_full_minus_eighth_mb"] = round(grow, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vemscale.bench.instances", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run of every figure)")
    parser.add_argument("--sections", default="speed,split,table", help="comma-separated: speed, split, table")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    from vemscale.raycluster import ensure_ray

    ensure_ray()
    result: dict[str, Any] = {"quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="vemscale-bench-instances-") as tmp:
        root = Path(tmp)
        for section in [s.strip() for s in args.sections.split(",") if s.strip()]:
            result[section] = {"speed": speed, "split": split, "table": table}[section](root, args.quick)
            print(f"{section}: {json.dumps(result[section])}", flush=True)
    return emit(result, args.json_out)


if __name__ == "__main__":
    raise SystemExit(main())
