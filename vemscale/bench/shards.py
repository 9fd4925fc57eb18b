"""Benchmark of sharded outputs and tissue masks: objects written, write throughput, time saved on empty resin.

Each figure is a ratio against a baseline measured in the same run, on generated volumes (EM-like noise):

- shards: `run_infer` with `write=labels`, `sharded=true` vs `sharded=false` (same blocks, chunks, workers;
  the `pixel_linear` model, so the model costs little and storage dominates): output objects on disk, voxels/s.
- mask: a volume whose right half is flat resin, `mask=auto` (its mask pass included; with the default one-cell
  dilation of the tissue and with none) vs no mask, with the
  `tiny` TransUNet (tile 288, margin 16: a tile core is 256, so tiles do not straddle 512 blocks) so that
  prediction costs what it costs in a real run.

    python -m vemscale.bench.shards                       # shards on 64x4096x4096 (1.07 GVoxel), mask on
                                                          # 16x4096x4096; ~25 min on 2 cores
    python -m vemscale.bench.shards --shape 16,2048,2048 --mask-shape 16,2048,2048  # quick
    python -m vemscale.bench.shards --sections mask        # the mask arms only: none, auto from scale 0, from scale 2
    python -m vemscale.bench.shards --sections mask --shape 16,512,512 --mask-shape 16,8192,8192  # the mask on
                                                          # 1.07 GVoxel, as in BENCHMARKS.md; 35 min
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from vemscale.bench import emit
from vemscale.bench.scale import generated_volume, infer_config, pixel_checkpoint, tiny_checkpoint


def _objects(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and ".vemscale" not in str(p))


def _run(**kw: Any) -> tuple[dict[str, Any], float]:
    """The run's summary (with the mask pass's seconds, when there is one) and its wall time."""
    from vemscale.infer.pipeline import run_infer

    t = time.perf_counter()
    result = run_infer(infer_config(**kw))
    summary = dict(result["summary"])
    if "tissue_mask" in result:
        summary["mask_pass_s"] = result["tissue_mask"]["seconds"]
    return summary, time.perf_counter() - t


def pyramid_volume(src: str, path: Path, levels: int) -> str:
    """An OME-Zarr copy of the zarr `src` with `levels` scales (xy mean-downsampled by 2 per level, z kept), written
    slab by slab: the layout of a real pyramid, so a mask can be made from a coarse scale."""
    import json

    import tensorstore as ts

    from vemscale.io.ome_zarr import create_ome_zarr

    vol = ts.open({"driver": "zarr", "kvstore": f"file://{src}/"}, open=True, read=True).result()
    shape, voxel = tuple(vol.shape), [5.0, 5.0, 50.0]
    stores = [create_ome_zarr(path, shape, np.uint8, (16, 256, 256), voxel, overwrite=True)]
    for lv in range(1, levels):
        f = 2 ** lv
        stores.append(ts.open({"driver": "zarr", "kvstore": f"file://{path}/{lv}/",
                               "metadata": {"shape": [shape[0], shape[1] // f, shape[2] // f], "chunks": [16, 256, 256],
                                            "dtype": "|u1", "compressor": None, "fill_value": 0}},
                              create=True, delete_existing=True).result())
    for z in range(0, shape[0], 16):
        slab = vol[z:z + 16].read().result()
        stores[0][z:z + 16].write(slab).result()
    for lv in range(1, levels):  # tensorstore's mean, as the export pyramid
        down = ts.downsample(stores[0], [1, 2 ** lv, 2 ** lv], method="mean")
        for z in range(0, shape[0], 16):
            stores[lv][z:z + 16].write(down[z:z + 16, : stores[lv].shape[1], : stores[lv].shape[2]].read().result()).result()
    attrs = json.loads((path / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    ms["datasets"] = [{"path": str(lv), "coordinateTransformations": [
        {"type": "scale", "scale": [voxel[2], voxel[1] * 2 ** lv, voxel[0] * 2 ** lv]}]} for lv in range(levels)]
    (path / ".zattrs").write_text(json.dumps(attrs))
    return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="64,4096,4096")
    ap.add_argument("--block", default="16,512,512")
    ap.add_argument("--chunks", default="16,128,128")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--mask-shape", default="16,4096,4096")
    ap.add_argument("--mask-workers", type=int, default=2)
    ap.add_argument("--mask-scale", type=int, default=2, help="also run mask=auto made from this scale of a pyramid")
    ap.add_argument("--sections", default="shards,mask")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    sections = set(a.sections.split(","))
    shape = tuple(int(v) for v in a.shape.split(","))
    block = tuple(int(v) for v in a.block.split(","))
    chunks = tuple(int(v) for v in a.chunks.split(","))
    voxels = int(np.prod(shape))
    with tempfile.TemporaryDirectory(prefix="vemscale-bench-shards-") as tmp:
        root = Path(tmp)
        ckpt = pixel_checkpoint(root / "pixel", tile=256)
        src = generated_volume(root / "vol.zarr", shape, (16, 256, 256))
        common = dict(input=src, checkpoint=ckpt, block_shape=block, output_chunks=chunks, workers=a.workers,
                      write="labels", batch_size=8)
        _run(output=str(root / "warm"), run_dir=str(root / "run-warm"), roi=f"0:{block[0]},0:{block[1]},0:{block[2]}",
             **common)  # Ray and worker start-up, outside the timed runs
        runs: dict[str, Any] = {}
        for name, sharded in (("unsharded", False), ("sharded", True)) if "shards" in sections else ():
            s, t = _run(output=str(root / name), run_dir=str(root / f"run-{name}"), sharded=sharded, **common)
            runs[name] = {"seconds": round(t, 2), "voxels_per_s": round(voxels / t), "objects": _objects(root / name),
                          "shard_shape": s["shard_shape"]}
            print(name, runs[name], flush=True)
        mshape = tuple(int(v) for v in a.mask_shape.split(","))
        if "mask" in sections:
            half = generated_volume(root / "half.zarr", mshape, (16, 256, 256), flat_right=True)
            if a.mask_scale:  # the same voxels as an OME-Zarr with a pyramid: every arm reads its scale 0
                half = pyramid_volume(half, root / "half.ome.zarr", a.mask_scale + 1)
            tiny = tiny_checkpoint(root / "tiny", tile=288, margin=16)
            mask_common = dict(common, input=half, checkpoint=tiny, workers=a.mask_workers)
            _run(output=str(root / "warm-tiny"), run_dir=str(root / "run-warm-tiny"),
                 roi=f"0:{block[0]},0:{block[1]},0:{block[2]}", **mask_common)
            arms: list[tuple[str, dict[str, Any]]] = [("nomask", {}), ("mask_auto", {"mask": "auto"}),
                                                      ("mask_auto_dilate0", {"mask": "auto", "mask_dilate": 0})]
            if a.mask_scale:  # a cell of the same extent in nm: 32 / 2^scale pixels of that scale
                cell = (4, 32 // 2 ** a.mask_scale, 32 // 2 ** a.mask_scale)
                arms.append((f"mask_auto_scale{a.mask_scale}", {"mask": "auto", "mask_scale": a.mask_scale,
                                                                 "mask_cell": cell}))
            for name, extra in arms:
                s, t = _run(output=str(root / name), run_dir=str(root / f"run-{name}"), **extra, **mask_common)
                runs[name] = {"seconds": round(t, 2), "masked_blocks": s["masked"], "blocks": s["blocks"],
                              "tiles": s["tiles"], **{k: s.get(k) for k in (
                                  "mask_pass_s", "seconds_to_first_block", "read_s", "predict_s", "forward_s",
                                  "write_s", "predict_busy", "actor_init_s")},
                              "forward_ms_per_tile": round(1000 * s["forward_s"] / max(1, s["tiles"]), 1)}
                print(name, runs[name], flush=True)
    result: dict[str, Any] = {"shape": list(shape), "gvoxels": voxels / 1e9, "mask_shape": list(mshape),
                              "block": list(block), "chunks": list(chunks), **runs}
    if "shards" in sections:
        result["objects_ratio_unsharded_over_sharded"] = round(runs["unsharded"]["objects"] / max(1, runs["sharded"]["objects"]), 1)
        result["throughput_ratio_sharded_over_unsharded"] = round(runs["unsharded"]["seconds"] / runs["sharded"]["seconds"], 3)
    if "mask" in sections:
        for name in runs:
            if name.startswith("mask_auto"):
                result[f"time_ratio_{name}_over_nomask"] = round(runs[name]["seconds"] / runs["nomask"]["seconds"], 3)
                # the floor of that ratio: the tiles run, and their forward time, as a share of the baseline's
                result[f"tile_ratio_{name}"] = round(runs[name]["tiles"] / runs["nomask"]["tiles"], 4)
                result[f"forward_ratio_{name}"] = round(runs[name]["forward_s"] / runs["nomask"]["forward_s"], 3)
    return emit(result, a.json)


if __name__ == "__main__":
    raise SystemExit(main())
