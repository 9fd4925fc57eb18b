"""Benchmark: precomputed pyramid + mesh time per GVoxel, against a plain full-resolution numpy write.

The volume is built by mirror-tiling the real VNC ssTEM stack (EM + mitochondria, the masks split into
objects per tile) to `--shape` and stored as OME-Zarr first (not timed). Then, in the same run:
- baseline: the full-resolution arrays, already in memory, written with one tensorstore write each into a
  precomputed scale 0 (same chunks and encodings; write only, no Ray), once before and once after the engine:
  the ratio is against their mean, as this machine's file-system speed drifts by 2x within minutes;
- engine: `vemscale export` of the image (scale 0 + pyramid) and of the objects (scale 0 + properties +
  pyramid + per-object meshes), blockwise on the local Ray cluster (Ray start-up not counted).
Usage: python -m vemscale.bench.export [--shape 32,2048,2048] [--mesh-reduction 10] [--mesh-scale auto] [--sharded]
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
VOXEL = (4.6, 4.6, 50.0)


def mirror_tile(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Tile `a` to `shape`, flipping every other copy so neighbouring tiles meet seamlessly."""
    reps = [-(-s // n) for s, n in zip(shape, a.shape)]
    out = a
    for axis, r in enumerate(reps):
        out = np.concatenate([out if k % 2 == 0 else np.flip(out, axis) for k in range(r)], axis=axis)
    return out[tuple(slice(0, s) for s in shape)]


def build_sources(root: Path, shape: tuple[int, int, int], chunk: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """EM and object labels of `shape` as OME-Zarr under `root`; returns the arrays."""
    import tifffile
    from scipy import ndimage

    from vemscale.io import create_ome_zarr

    em = tifffile.imread(DATA / "vnc_drosophila_sstem/train/image.tif")
    mito = tifffile.imread(DATA / "vnc_drosophila_sstem/train/labels_mitochondria.tif") > 0
    em_big = mirror_tile(em, shape)
    objects = np.zeros(shape, np.uint32)
    tile = mito.shape
    next_id = 1
    for idx in np.ndindex(*[-(-s // n) for s, n in zip(shape, tile)]):  # label each tile, ids unique overall
        box = tuple(slice(i * n, min((i + 1) * n, s)) for i, n, s in zip(idx, tile, shape))
        src = mirror_tile(mito, tuple(b.stop for b in box))[box]
        lab, n = ndimage.label(src)
        objects[box] = np.where(lab > 0, lab + next_id - 1, 0)
        next_id += n
    for name, arr in (("em", em_big), ("objects", objects)):
        create_ome_zarr(str(root / f"{name}.zarr"), arr.shape, arr.dtype, chunk, VOXEL).write(arr).result()
    return {"em": em_big, "objects": objects}


def baseline_write(root: Path, arrays: dict[str, np.ndarray], chunk: tuple[int, int, int], sharded: bool) -> dict[str, float]:
    """Seconds to write each in-memory array as a precomputed scale 0 (one tensorstore write)."""
    from vemscale.export.precomputed import create_precomputed

    out = {}
    os.sync()  # nothing of an earlier phase left to write back
    for name, arr in arrays.items():
        kind = "segmentation" if name == "objects" else "image"
        store = create_precomputed(str(root / f"baseline_{name}"), arr.shape, arr.dtype, VOXEL, kind, chunk=chunk,
                                   sharded=sharded)
        t0 = time.perf_counter()
        store.write(arr.astype(store.dtype.numpy_dtype, copy=False)).result()
        out[name] = time.perf_counter() - t0
    return out


def _noop() -> int:
    return os.getpid()


def warm_workers(cpus: int) -> int:
    """Start Ray's worker processes (a no-op task per CPU, at once): part of Ray start-up, not of the export.
    Nothing of vemscale or tensorstore is imported in them. Returns how many distinct workers answered."""
    import ray

    task = ray.remote(num_cpus=1)(_noop)
    return len(set(ray.get([task.remote() for _ in range(max(1, cpus))])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,2048,2048", help="z,y,x of the tiled volume")
    parser.add_argument("--chunk", default="16,128,128")
    parser.add_argument("--mesh-reduction", type=int, default=10)
    parser.add_argument("--mesh-scale", default="auto", help="scale meshed (auto: 2 on this 4.6x4.6x50 nm data)")
    parser.add_argument("--sharded", action="store_true")
    parser.add_argument("--workdir", default=None, help="where the volumes go (default: a temporary folder)")
    parser.add_argument("--json-out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    chunk = tuple(int(v) for v in args.chunk.split(","))

    from vemscale.config import build_config
    from vemscale.export.run import ExportConfig, run_export
    from vemscale.raycluster import ensure_ray

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        arrays = build_sources(root, shape, chunk)
        gvox = float(np.prod(shape)) / 1e9
        before = baseline_write(root, arrays, chunk, args.sharded)
        del arrays
        cpus = ensure_ray().get("CPU", 0)
        warm_workers(int(cpus))
        os.sync()
        common = {"chunk": chunk, "pyramid": True, "sharded": args.sharded, "run_dir": str(root / "runs")}
        img = run_export(build_config(ExportConfig, {**common, "source": str(root / "em.zarr"), "dest": str(root / "em")}))
        seg = run_export(build_config(ExportConfig, {**common, "source": str(root / "objects.zarr"),
                                                     "dest": str(root / "objects"), "layer_type": "segmentation",
                                                     "mesh": True, "mesh_reduction": args.mesh_reduction,
                                                     "mesh_scale": args.mesh_scale}))
        import shutil

        from vemscale.io import open_volume

        for name in ("em", "objects"):
            shutil.rmtree(root / f"baseline_{name}")
        arrays = {name: open_volume(str(root / f"{name}.zarr")).read() for name in ("em", "objects")}
        after = baseline_write(root, arrays, chunk, args.sharded)
        del arrays
    base = {k: (before[k] + after[k]) / 2 for k in before}
    ti, tsg = img["timings"], seg["timings"]
    pyr_mesh = ti["pyramid_s"] + tsg["pyramid_s"] + tsg["mesh_s"]
    baseline = base["em"] + base["objects"]
    result = {
        "shape_zyx": list(shape), "gvoxels": round(gvox, 4), "ray_cpus": cpus, "sharded": args.sharded,
        "objects": seg.get("segments"), "mesh_scale": seg["meshes"]["scale"], "mesh_fragments": seg["meshes"]["fragments"],
        "baseline_numpy_write_s": {k: round(v, 2) for k, v in base.items()},
        "baseline_before_after_s": [round(sum(before.values()), 2), round(sum(after.values()), 2)],
        "engine_s": {"image_scale0": ti["scale0_s"], "image_pyramid": ti["pyramid_s"], "seg_scale0": tsg["scale0_s"],
                     "seg_properties": tsg.get("properties_s"), "seg_pyramid": tsg["pyramid_s"], "seg_mesh": tsg["mesh_s"]},
        "per_gvoxel_s": {"baseline_write": round(baseline / gvox, 1), "engine_scale0": round((ti["scale0_s"] + tsg["scale0_s"]) / gvox, 1),
                         "pyramid": round((ti["pyramid_s"] + tsg["pyramid_s"]) / gvox, 1),
                         "mesh": round(tsg["mesh_s"] / gvox, 1), "pyramid_plus_mesh": round(pyr_mesh / gvox, 1)},
        "ratio_pyramid_plus_mesh_to_baseline": round(pyr_mesh / baseline, 2),
        "export_s": round(ti["total_s"] + tsg["total_s"], 2),
        "ratio_export_to_baseline": round((ti["total_s"] + tsg["total_s"]) / baseline, 2),
        "ratio_export_to_baseline_before_after": [round((ti["total_s"] + tsg["total_s"]) / sum(b.values()), 2)
                                                  for b in (before, after)],
        "ratio_engine_scale0_to_baseline": round((ti["scale0_s"] + tsg["scale0_s"]) / baseline, 2),
    }
    print(f"volume {shape} = {gvox:.3f} GVoxel (image uint8 + objects uint32), {cpus:.0f} Ray CPUs, sharded={args.sharded}")
    print(f"baseline numpy full-res write (image + seg): {baseline:.1f} s = {baseline / gvox:.0f} s/GVoxel "
          f"(mean of {sum(before.values()):.1f} s before and {sum(after.values()):.1f} s after the engine)")
    print(f"engine scale 0 (Ray, image + seg):           {ti['scale0_s'] + tsg['scale0_s']:.1f} s")
    print(f"pyramid (image + seg):                       {ti['pyramid_s'] + tsg['pyramid_s']:.1f} s = "
          f"{(ti['pyramid_s'] + tsg['pyramid_s']) / gvox:.0f} s/GVoxel")
    print(f"meshes ({seg['meshes']['labels']} objects, from scale {seg['meshes']['scale']}):     "
          f"{tsg['mesh_s']:.1f} s = {tsg['mesh_s'] / gvox:.0f} s/GVoxel")
    print(f"pyramid + mesh: {pyr_mesh / gvox:.0f} s/GVoxel = {pyr_mesh / baseline:.2f}x the baseline write")
    print(f"whole export (scale 0 + properties + pyramid + meshes): {result['export_s']:.1f} s = "
          f"{result['ratio_export_to_baseline']:.2f}x the baseline write (against the write before / after alone: "
          f"{result['ratio_export_to_baseline_before_after'][0]:.2f}x / {result['ratio_export_to_baseline_before_after'][1]:.2f}x)")
    return emit(result, args.json_out)


if __name__ == "__main__":
    raise SystemExit(main())
