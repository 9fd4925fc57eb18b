"""`vemscale export SRC DST`: any volume `open_volume` reads -> a Neuroglancer precomputed layer, blockwise on Ray.

Order of work: every check a user can fail (source, layer type, dtype, encoding, existing output) raises a
UserError before Ray starts; then scale 0 is copied in write-chunk-aligned blocks (counting labels on the
way, and writing the first pyramid levels from each block in memory where their chunks allow), then segment
properties, the rest of the pyramid and the meshes, as asked. Every step runs on the block runner with
a ledger inside the layer: rerunning a killed export recomputes only the blocks that were not finished.

    vemscale export vol.zarr precomputed://file:///data/em --pyramid
    vemscale export labels.tif /data/seg --layer-type segmentation --voxel-size 4.6,4.6,50 --pyramid --mesh
    vemscale export configs/export.yaml source=... dest=... sharded=true
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from vemscale.config import StageConfig, dump_config, load_config
from vemscale.errors import UserError
from vemscale.io.shards import SHARD_ABOVE_CHUNKS, ShardKeys

__all__ = ["ExportConfig", "run_export", "add_arguments", "run_cli"]

log = logging.getLogger(__name__)

class ExportConfig(StageConfig, ShardKeys):
    """`vemscale export`: write a volume as a Neuroglancer precomputed layer (+ pyramid, meshes, properties)."""

    run_dir: Path = Path("runs/export")
    source: str = Field(description="any volume URL open_volume reads (zarr, OME-Zarr, n5, precomputed, tiff, ...)")
    dest: str = Field(description="layer directory/URL: a path, file://, s3://, gs:// or precomputed://...")
    scale: int | str | None = None  # multiscale level of the source; None = finest
    layer_type: Literal["auto", "image", "segmentation"] = "auto"  # auto: integer labels wider than uint8 -> segmentation
    voxel_size: tuple[float, float, float] | None = None  # x,y,z nm; default from the source (1,1,1 when unknown)
    chunk: tuple[int, int, int] = (16, 128, 128)  # z,y,x storage chunks
    encoding: Literal["auto", "raw", "jpeg", "compressed_segmentation"] = "auto"  # auto: raw / compressed_segmentation
    jpeg_quality: int = Field(90, ge=1, le=100)
    classes: list[str] | None = None  # class names: segment labels (ids 0..), or probability channel names
    pyramid: bool = False
    max_scales: int | None = Field(None, ge=2)  # total scales incl. 0; None = until the xy extent fits one chunk
    mesh: bool = False  # segmentation only
    mesh_scale: Literal["auto"] | int = "auto"  # scale meshed; auto: coarsest xy-only scale with xy voxel <= z/2
    mesh_reduction: int = Field(10, ge=0)  # triangle reduction factor of the simplification (0/1 = none)
    mesh_max_error_nm: float | None = None  # simplification error bound; default the mesh scale's xy voxel size
    mesh_objects_per_shard: int = Field(2048, ge=1)  # objects per mesh shard file (one Ray task writes one)
    properties: bool = True  # segment properties (labels, volume in um^3) for segmentation layers
    # sharded / shard_shape / shard_voxels (vemscale.io.shards.ShardKeys): shard_shape is scale 0's shard (a
    # Morton-aligned 2^k box of chunks); downsampled scales take the largest 2^k box of <= shard_voxels
    task_voxels: int = Field(2**24, ge=1)  # voxels per Ray task (rounded to whole write chunks)
    max_in_flight: int | None = Field(None, ge=1)  # tasks at once per step; default: as many as the cluster's CPUs
    blocks_per_batch: int | None = Field(None, ge=1)  # block ids per Ray Data block; default ~16 MiB, >= 4 per CPU
    overwrite: bool = False

    @field_validator("classes", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v

    @field_validator("voxel_size", "chunk", mode="before")
    @classmethod
    def _triple(cls, v: Any) -> Any:
        return [p for p in v.replace(" ", "").split(",")] if isinstance(v, str) else v


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Export `cfg.source` to the precomputed layer `cfg.dest`; returns the layer URL, scales and timings."""
    from vemscale.export.meshes import write_meshes
    from vemscale.export.precomputed import create_precomputed, write_chunk_shape
    from vemscale.export.properties import write_segment_properties
    from vemscale.export.pyramid import build_pyramid, downsample_method, plan_pyramid
    from vemscale.export.scale0 import copy_scale0, plan_layer
    from vemscale.raycluster import ensure_ray

    t_start = time.perf_counter()
    plan = plan_layer(cfg)
    from vemscale.io.urls import parse_url
    from vemscale.io.writable import check_writable

    layer = parse_url(plan["url"])
    if not layer.remote:  # a remote store answers its first write
        check_writable(layer.location, "dest")
    check_writable(cfg.run_dir, "run_dir")
    vol, url, seg = plan["volume"], plan["url"], plan["layer_type"] == "segmentation"
    store = create_precomputed(url, vol.shape[-3:], plan["dtype"], plan["voxel"], plan["layer_type"], plan["channels"],
                               cfg.chunk, plan["sharded"], plan["encoding"],
                               cfg.jpeg_quality if plan["encoding"] == "jpeg" else None, cfg.overwrite,
                               shard_voxels=cfg.shard_voxels, attrs=plan["attrs"], shard_bits=plan["shard_bits"])
    levels = plan_pyramid(url, cfg.max_scales, shard_voxels=cfg.shard_voxels) if cfg.pyramid else []
    ensure_ray()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    counts, scale0 = copy_scale0(vol, store, cfg.task_voxels, seg, cfg.max_in_flight, url=url,
                                 describe={"voxel_size": list(plan["voxel"]), "encoding": plan["encoding"]},
                                 blocks_per_batch=cfg.blocks_per_batch, pyramid=levels,
                                 method=downsample_method(plan["layer_type"]), encoding=plan["encoding"])
    timings["scale0_s"] = time.perf_counter() - t0
    if scale0["fused"]:
        log.info("export: scales %s written with scale 0 (from its blocks in memory)", scale0["fused"])
    result: dict[str, Any] = {"layer": url, "type": plan["layer_type"], "dtype": plan["dtype"].name,
                              "shape_zyx": list(vol.shape[-3:]), "channels": plan["channels"],
                              "voxel_size_xyz": list(plan["voxel"]), "encoding": plan["encoding"],
                              "sharded": plan["sharded"], "shard_shape": plan["shard_shape"], "write_chunk_zyx": list(write_chunk_shape(store)[-3:]),
                              "blocks": {"scale0": {k: scale0[k] for k in ("blocks", "computed", "skipped")}}}
    if seg and cfg.properties:
        t0 = time.perf_counter()
        from vemscale.config import absolute_url
        from vemscale.export.properties import instance_table

        table = instance_table(absolute_url(cfg.source))  # a vemscale instances output: its table's columns
        props = write_segment_properties(url, cfg.classes, counts, table_url=table)
        timings["properties_s"] = time.perf_counter() - t0
        result["segments"] = len(props["inline"]["ids"])
    if cfg.pyramid:
        t0 = time.perf_counter()
        result["scales"] = build_pyramid(url, cfg.max_scales, cfg.task_voxels, shard_voxels=cfg.shard_voxels,
                                         max_in_flight=cfg.max_in_flight, source_generation=scale0["generation"],
                                         blocks_per_batch=cfg.blocks_per_batch,
                                         fused={index: scale0 for index in scale0["fused"]}, plans=levels)
        for level in result["scales"]:
            result["blocks"][f"scale{level['scale']}"] = {k: level[k] for k in ("blocks", "computed", "skipped")}
        timings["pyramid_s"] = time.perf_counter() - t0
    if cfg.mesh:
        t0 = time.perf_counter()
        scale_gens = {0: scale0["generation"], **{lv["scale"]: lv["generation"] for lv in result.get("scales", [])}}
        mesh_scale = cfg.mesh_scale
        if mesh_scale == "auto":
            from vemscale.export.meshes import auto_mesh_scale
            from vemscale.export.precomputed import read_info

            mesh_scale = auto_mesh_scale(read_info(url))
        result["meshes"] = write_meshes(url, mesh_scale, cfg.mesh_reduction, cfg.mesh_max_error_nm,
                                        min(cfg.task_voxels, 2**22), cfg.max_in_flight,
                                        source_generation=scale_gens.get(int(mesh_scale)),
                                        blocks_per_batch=cfg.blocks_per_batch,
                                        objects_per_shard=cfg.mesh_objects_per_shard)
        result["blocks"]["meshes"] = {k: result["meshes"][k] for k in ("blocks", "computed", "skipped")}
        timings["mesh_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    result["timings"] = {k: round(v, 3) for k, v in timings.items()}
    result["view"] = f"vemscale view {url}"
    log.info("export: %s layer %s written in %.1f s", plan["layer_type"], url, timings["total_s"])
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "export_config.yaml")
    from vemscale.io.atomic import write_text

    write_text(run_dir / "export_summary.json", json.dumps(result, indent=2, default=str))
    return result


_FLAGS = ("layer_type", "pyramid", "max_scales", "mesh", "mesh_scale", "sharded", "encoding", "classes", "voxel_size",
          "chunk", "overwrite", "scale", "run_dir")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="[CONFIG.yaml] SRC DST [key=value]",
                        help="source volume URL and destination layer (or source=/dest= in a YAML config), then "
                             "ExportConfig overrides such as mesh_reduction=20 task_voxels=8000000")
    parser.add_argument("--layer-type", choices=["auto", "image", "segmentation"], default=None)
    parser.add_argument("--pyramid", action="store_true", default=None, help="add downsampled scales")
    parser.add_argument("--max-scales", type=int, default=None, help="total scales including scale 0")
    parser.add_argument("--mesh", action="store_true", default=None, help="meshes of every label (segmentation)")
    parser.add_argument("--mesh-scale", default=None, help="mesh from this scale (default auto: the coarsest xy-only scale with xy voxel <= z/2)")
    parser.add_argument("--sharded", action=argparse.BooleanOptionalAction, default=None,
                        help=f"sharded format (default: when scale 0 has more than {SHARD_ABOVE_CHUNKS} chunks)")
    parser.add_argument("--encoding", choices=["auto", "raw", "jpeg", "compressed_segmentation"], default=None)
    parser.add_argument("--classes", default=None, help="class names a,b,...: segment labels or channel names")
    parser.add_argument("--voxel-size", default=None, help="x,y,z nm (default from the source)")
    parser.add_argument("--chunk", default=None, help="z,y,x storage chunk (default 16,128,128)")
    parser.add_argument("--scale", default=None, help="multiscale level of the source")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an existing layer")
    parser.add_argument("--run-dir", default=None, help="where export_config.yaml and export_summary.json go")


def load_export_config(args: argparse.Namespace) -> ExportConfig:
    """ExportConfig from [config.yaml] SRC DST key=value... and the flags (flags win)."""
    items = list(args.items)
    path = items.pop(0) if items and items[0].endswith((".yaml", ".yml")) and "=" not in items[0] else None
    urls: dict[str, str] = {}  # source/dest are set verbatim: override parsing would split URLs at commas
    overrides = []
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key in ("source", "dest"):
            urls[key] = value
        elif sep and "://" not in key and "/" not in key:
            overrides.append(item)
        elif len(urls) < 2:
            urls["dest" if "source" in urls else "source"] = item
        else:
            raise UserError(f"unexpected argument {item!r}: give SRC and DST once, then key=value overrides")
    cfg = load_config(ExportConfig, path, overrides + [f"{k}=placeholder" for k in urls])
    for key, value in urls.items():
        setattr(cfg, key, value)
    for name in _FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
    return cfg


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    return run_export(load_export_config(args))
