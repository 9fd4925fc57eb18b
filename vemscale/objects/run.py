"""`vemscale instances`: objects from a prediction: ids across blocks, a per-object table, plots.

    vemscale instances configs/instances.yaml source=runs/pred output=runs/mito_objects classes=mitochondria
    vemscale instances source=gt_labels.tif output=runs/gt_objects classes=1 voxel_size=4.6,4.6,45

Every check a user can fail (source, classes, threshold, size, block shape, an existing output of another
shape) raises before anything is written; then the passes of `vemscale.objects.pipeline` run on Ray, each
resumable. The ids equal a whole-volume connected-components labelling (cc3d, same connectivity) of the
thresholded classes, numbered in the order a C-order scan first meets each object, whatever `block_shape`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from vemscale.config import StageConfig, Strict, absolute_url, dump_config, load_cli_config
from vemscale.errors import UserError
from vemscale.io.shards import ShardKeys

__all__ = ["InstancesConfig", "run_instances", "add_arguments", "run_cli"]

log = logging.getLogger(__name__)


class WatershedConfig(Strict):
    """`split=watershed`: touching objects split along the necks of their distance transform (vemscale.post.split)."""

    seeds: Literal["hmaxima", "distance"] = "hmaxima"  # h-maxima of the distance, or components far from the surface
    h_nm: float = Field(20.0, gt=0)  # hmaxima: how much a maximum must stand above the neck joining it to another
    seed_distance_nm: float = Field(100.0, gt=0)  # distance: voxels at least this far inside the object seed it
    # an object is split whole, in its bounding box (+1 voxel): one task's memory peaks at ~130 B x this
    # (measured: scikit-image's h-maxima reconstruction dominates); larger objects stay one (counted)
    max_object_voxels: int = Field(1 << 24, ge=1)


class InstancesConfig(StageConfig, ShardKeys):
    """`vemscale instances`: connected objects per class, their ids, morphometrics and plots."""

    run_dir: Path = Path("runs/instances")
    source: str = Field(description="a vemscale infer output, c,z,y,x probabilities, or z,y,x class labels")
    output: str = Field(description="output directory/URL: segmentation (OME-Zarr), objects/*.parquet, plots/")
    classes: list[str] | None = None  # class names (labels without names: their values); default all foreground
    threshold: float = 0.5  # probability a voxel needs to belong to a class (the most probable class wins)
    min_size_nm3: float = 0.0  # objects smaller than this (voxels x voxel volume) are removed
    connectivity: Literal[6, 18, 26] = 26  # voxel neighbourhood that joins voxels into one object (cc3d's)
    split: Literal["none", "watershed"] = "none"  # watershed: split touching objects (seeded, distance transform)
    watershed: WatershedConfig = Field(default_factory=WatershedConfig)
    voxel_size: tuple[float, float, float] | None = None  # x,y,z nm; default from the source
    block_shape: tuple[int, int, int] = (64, 512, 512)  # z,y,x voxels per block (a whole number of chunks)
    chunk: tuple[int, int, int] = (16, 128, 128)  # z,y,x chunks of the segmentation layer
    # zarr: <output>/segmentation is OME-Zarr (v3 with the sharding codec when sharded); precomputed: a Neuroglancer
    # segmentation layer (compressed_segmentation, neuroglancer_uint64_sharded_v1 when sharded) Neuroglancer reads as is
    segmentation_format: Literal["zarr", "precomputed"] = "zarr"
    # sharded / shard_shape / shard_voxels (vemscale.io.shards.ShardKeys): shards divide block_shape, one writer each
    max_in_flight: int | None = Field(None, ge=1)  # Ray tasks at once per pass; default 2 x the cluster's CPUs
    blocks_per_batch: int | None = Field(None, ge=1)
    keep_scratch: bool = True  # keep the provisional labels, so a rerun with another min_size skips 2 passes
    overwrite: bool = False
    progress: bool = True

    @field_validator("classes", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, (int, float)):
            return [str(int(v))]
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return [str(x) for x in v] if isinstance(v, list) else v

    @field_validator("voxel_size", "block_shape", "chunk", mode="before")
    @classmethod
    def _triple(cls, v: Any) -> Any:
        return [p for p in v.replace(" ", "").split(",")] if isinstance(v, str) else v


def _check(cfg: InstancesConfig) -> None:
    if not 0.0 < cfg.threshold <= 1.0:
        raise UserError(f"threshold {cfg.threshold} must be in (0, 1]: the probability a voxel needs")
    if not math.isfinite(cfg.min_size_nm3) or cfg.min_size_nm3 < 0:
        raise UserError(f"min_size_nm3 {cfg.min_size_nm3} must be >= 0 (a volume in cubic nanometres)")
    if cfg.split == "none" and cfg.watershed != WatershedConfig():
        raise UserError("watershed.* keys differ from their defaults but split=none: add split=watershed to split touching objects, "
                        "or drop the watershed keys")
    if cfg.split == "watershed" and cfg.connectivity != 26:
        log.warning("split=watershed with connectivity=%d: the pieces are still independent of the blocks, but "
                    "equal a whole-volume watershed per class only for connectivity=26", cfg.connectivity)
    if cfg.voxel_size is not None and min(cfg.voxel_size) <= 0:
        raise UserError(f"voxel_size {cfg.voxel_size} must be positive x,y,z nm")


def _check_output(output: str) -> None:
    from vemscale.io.urls import parse_url

    parsed = parse_url(output)
    if parsed.driver not in (None, "zarr") or parsed.dataset is not None:
        raise UserError(f"output {output!r} must be a directory or URL (it holds segmentation/, objects/, plots/); "
                        "for a Neuroglancer precomputed segmentation inside it add segmentation_format=precomputed")
    if not parsed.remote:
        path = parsed.location
        if os.path.isfile(path):
            raise UserError(f"output {output!r} is a file; the output is a directory")
        if os.path.isdir(path) and os.listdir(path) and not {".zattrs", "zarr.json", "segmentation"} & set(os.listdir(path)):
            raise UserError(f"output {output!r} is a non-empty directory that is not a vemscale instances output")
        from vemscale.io.writable import check_writable

        check_writable(path)


def _stored_format(kv: Any) -> str | None:
    """The format of an existing segmentation layer: precomputed (an `info`), zarr (zarr metadata), or None."""
    if kv.read("info").result().state == "value":
        return "precomputed"
    if any(kv.read(k).result().state == "value" for k in ("zarr.json", ".zattrs", ".zgroup")):
        return "zarr"
    return None


def run_instances(cfg: InstancesConfig) -> dict[str, Any]:
    """Label objects of `cfg.classes` in `cfg.source` into `cfg.output`; returns counts, paths and timings."""
    import tensorstore as ts

    from vemscale.blocks.grid import BlockGrid
    from vemscale.io.ome_zarr import create_ome_zarr, write_group_attrs
    from vemscale.io.shards import plan_layout
    from vemscale.io.urls import join_url, kvstore_url, parse_url
    from vemscale.objects.pipeline import SCRATCH_DIR, run_passes
    from vemscale.objects.source import open_source
    from vemscale.raycluster import ensure_ray

    t_start = time.perf_counter()
    _check(cfg)
    source = open_source(cfg.source, cfg.classes, cfg.threshold)
    output = absolute_url(cfg.output)
    _check_output(output)
    from vemscale.io.writable import check_writable

    check_writable(cfg.run_dir, "run_dir")
    shape = source.shape
    voxel = cfg.voxel_size or source.volume.voxel_size_xyz
    if voxel is None:
        raise UserError(f"{cfg.source!r} has no voxel size; pass voxel_size=x,y,z in nm (volumes and surfaces are in nm)")
    voxel = [float(v) for v in voxel]
    if cfg.voxel_size is None and voxel == [1.0, 1.0, 1.0]:
        log.warning("%s says its voxels are 1 x 1 x 1 nm (often a placeholder for 'unknown'); volumes and surfaces "
                    "are in those units. Pass voxel_size=x,y,z if that is not the real size", cfg.source)
    voxel_nm3 = voxel[0] * voxel[1] * voxel[2]
    min_voxels = int(math.ceil(cfg.min_size_nm3 / voxel_nm3 - 1e-9)) if cfg.min_size_nm3 > 0 else 0
    chunk = tuple(min(c, s) for c, s in zip(cfg.chunk, shape))
    BlockGrid.create(shape, chunk, cfg.block_shape, None, chunk_name="segmentation chunk")
    # a precomputed shard (a Morton box of chunks) is also a valid zarr shard: the scratch layers share it
    layout = plan_layout(cfg.segmentation_format, cfg.sharded, shape, chunk, cfg.block_shape,
                         shard_shape=cfg.shard_shape, target_voxels=cfg.shard_voxels)
    # blocks cover whole shards: each shard of `segmentation` and `provisional` has one writer
    grid = BlockGrid.create(shape, layout.write_unit, cfg.block_shape, None,
                            chunk_name="shard" if layout.shard else "segmentation chunk")
    seg_kv = ts.KvStore.open(join_url(kvstore_url(parse_url(output)), "segmentation") + "/").result()
    stored = _stored_format(seg_kv)
    if stored not in (None, cfg.segmentation_format):
        if not cfg.overwrite:
            raise UserError(f"{join_url(output, 'segmentation')} exists as {stored}, not {cfg.segmentation_format}; "
                            f"rerun with segmentation_format={stored} to resume, or overwrite=true to replace it")
        seg_kv.delete_range(ts.KvStore.KeyRange()).result()
    # every check passed: create (or reopen) the layers
    if cfg.segmentation_format == "precomputed":
        from vemscale.export.precomputed import create_precomputed

        seg = create_precomputed(join_url(output, "segmentation"), shape, np.uint64, voxel, "segmentation",
                                 chunk=chunk, sharded=layout.shard is not None, overwrite=cfg.overwrite,
                                 shard_bits=layout.shard_bits)
    else:
        seg = create_ome_zarr(join_url(output, "segmentation"), shape, np.uint64, chunk, voxel,
                              overwrite=cfg.overwrite, name="segmentation", shard=layout.shard)
    prov = create_ome_zarr(join_url(output, SCRATCH_DIR, "provisional"), shape, np.uint64, chunk, voxel,
                           overwrite=cfg.overwrite, name="provisional", shard=layout.shard)
    split = None
    if cfg.split == "watershed":
        scratch_layers = {name: create_ome_zarr(join_url(output, SCRATCH_DIR, *path), shape, np.uint64, chunk, voxel,
                                                overwrite=cfg.overwrite, name=name, shard=layout.shard)
                          for name, path in (("cc", ("cc", "segmentation")), ("pieces", ("pieces",)))}
        ws = cfg.watershed
        split = {"params": {"seeds": ws.seeds, "h_nm": ws.h_nm, "seed_distance_nm": ws.seed_distance_nm,
                            "connectivity": cfg.connectivity},
                 "max_object_voxels": ws.max_object_voxels,
                 "cc_seg_spec": scratch_layers["cc"].spec(minimal_spec=True).to_json(),
                 "pieces_spec": scratch_layers["pieces"].spec(minimal_spec=True).to_json()}
    kv = ts.KvStore.open(kvstore_url(parse_url(output)) + "/").result()
    meta = {"vemscale": {"kind": "instances", "classes": source.classes, "layers": {"segmentation": "segmentation"},
                         "table": "objects", "source": source.volume.url, "threshold": cfg.threshold,
                         "min_size_nm3": cfg.min_size_nm3, "connectivity": cfg.connectivity,
                         "split": cfg.split, **({"watershed": cfg.watershed.model_dump()} if split else {}),
                         "voxel_size_xyz": voxel, "layout": layout.to_dict(),
                         "segmentation_format": cfg.segmentation_format}}
    write_group_attrs(kv, meta, 3 if layout.shard else 2)
    ensure_ray()
    summary = run_passes(source, output, grid, prov.spec(minimal_spec=True).to_json(),
                         seg.spec(minimal_spec=True).to_json(), voxel, cfg.connectivity, min_voxels,
                         cfg.max_in_flight, cfg.blocks_per_batch, cfg.progress, split=split)
    if not cfg.keep_scratch:
        from vemscale.blocks.ledger import Ledger, ledger_url

        for step in ("label", "faces", "cc_relabel", "cc_table", "split"):  # their outputs go with the scratch: a rerun must recompute them
            Ledger.invalidate(ledger_url(kvstore_url(parse_url(output)), step))
        ts.KvStore.open(join_url(kvstore_url(parse_url(output)), SCRATCH_DIR) + "/").result() \
            .delete_range(ts.KvStore.KeyRange()).result()
    seconds = time.perf_counter() - t_start
    result = {
        "output": output, "segmentation": join_url(output, "segmentation"), "table": join_url(output, "objects"),
        "plots": join_url(output, "plots", "objects.png"), "classes": source.classes, "shape": list(shape),
        "voxel_size_xyz": voxel, "block_shape": list(grid.block_shape), "min_voxels": min_voxels,
        "sharded": layout.shard is not None, "shard_shape": list(layout.shard) if layout.shard else None, **summary,
        "seconds": round(seconds, 3), "voxels_per_s": round(math.prod(shape) / seconds, 1),
        "view": (f"vemscale view {output}   (meshes: vemscale export {join_url(output, 'segmentation')} <dest> --mesh)"
                 if cfg.segmentation_format == "precomputed" else
                 f"vemscale export {join_url(output, 'segmentation')} precomputed://<dest> --mesh --pyramid"),
    }
    kv.write("summary.json", json.dumps(result, indent=2, default=str).encode()).result()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "instances_config.yaml")
    log.info("instances: %d objects (%s) in %.1f s", summary["objects"], summary["per_class"], seconds)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="[CONFIG.yaml] key=value",
                        help="an optional YAML config, then InstancesConfig keys such as source=... output=... "
                             "classes=mitochondria min_size_nm3=1e6")


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    return run_instances(load_cli_config(InstancesConfig, args.items, verbatim=("source", "output")))
