"""Scale 0 of an export: decide the layer from the source volume, then copy it in write-chunk-aligned blocks."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import numpy as np

from vemscale.blocks.grid import BlockGrid, Box
from vemscale.config import absolute_url
from vemscale.errors import UserError
from vemscale.export.precomputed import default_encoding, layer_kvstore, precomputed_dtype, view_spec, \
    write_chunk_aligned_block, write_chunk_shape
from vemscale.export.steps import open_spec, payloads, run_step
from vemscale.io.shards import plan_layout

__all__ = ["dest_url", "plan_layer", "copy_scale0"]

log = logging.getLogger(__name__)


def dest_url(dest: str) -> str:
    """precomputed://<kvstore url> for a local path or URL (the form Neuroglancer and open_volume take)."""
    return "precomputed://" + layer_kvstore(dest if dest.startswith("precomputed://") else absolute_url(dest)).rstrip("/")


def _layer_type(cfg: Any, dtype: np.dtype, ndim: int) -> str:
    if cfg.layer_type != "auto":
        return cfg.layer_type
    if ndim == 3 and (cfg.classes is not None and dtype.kind in "biu" or dtype.kind == "b"
                      or dtype.kind in "iu" and dtype.itemsize > 1):
        return "segmentation"
    return "image"


def plan_layer(cfg: Any) -> dict[str, Any]:
    """Open the source and decide type, dtype, channels, encoding and sharding; UserError on what cannot work."""
    from vemscale.io import open_volume

    vol = open_volume(absolute_url(cfg.source), scale=cfg.scale, voxel_size_xyz=cfg.voxel_size)  # workers may run elsewhere
    if vol.ndim not in (3, 4):
        raise UserError(f"{cfg.source!r} has shape {vol.shape}; export needs z,y,x or c,z,y,x")
    layer_type = _layer_type(cfg, vol.dtype, vol.ndim)
    if layer_type == "segmentation" and vol.ndim == 4:
        raise UserError(f"{cfg.source!r} has channels {vol.shape}; a segmentation layer needs z,y,x labels")
    dtype = precomputed_dtype(vol.dtype, layer_type)
    channels = vol.shape[0] if vol.ndim == 4 else 1
    voxel = vol.voxel_size_xyz
    if voxel is None:
        log.warning("%s has no voxel size; writing 1,1,1 nm (give --voxel-size x,y,z)", cfg.source)
        voxel = (1.0, 1.0, 1.0)
    encoding = default_encoding(layer_type) if cfg.encoding == "auto" else cfg.encoding
    shape = vol.shape[-3:]
    # tasks are whole write chunks (shards), so any shard has one writer: the "block" is the whole volume
    layout = plan_layout("precomputed", cfg.sharded, shape, cfg.chunk, shape, shard_shape=cfg.shard_shape,
                         target_voxels=cfg.shard_voxels)
    if cfg.mesh and layer_type != "segmentation":
        raise UserError("--mesh needs a segmentation layer (--layer-type segmentation)")
    if cfg.classes is not None and channels > 1 and len(cfg.classes) != channels:
        raise UserError(f"{len(cfg.classes)} class names for {channels} channels")
    attrs: dict[str, Any] = {}
    if layer_type == "image" and channels > 1:
        attrs = {"vemscale": {"kind": "probabilities", "classes": cfg.classes or [f"class_{i}" for i in range(channels)]}}
    elif layer_type == "segmentation" and cfg.classes:
        attrs = {"vemscale": {"kind": "classes", "classes": cfg.classes}}
    return {"volume": vol, "layer_type": layer_type, "dtype": dtype, "channels": channels, "voxel": tuple(voxel),
            "encoding": encoding, "sharded": layout.shard is not None, "attrs": attrs, "url": dest_url(cfg.dest),
            "shard_bits": layout.shard_bits, "shard_shape": list(layout.shard) if layout.shard else None}


def copy_block(box: Box, volume: Any, dst_spec: dict[str, Any], count: bool, run: str,
               levels: list[dict[str, Any]] | None = None, method: str = "mean") -> bytes | None:
    """Copy one write-chunk-aligned box of scale 0 (and write the pyramid `levels` fused into it from memory);
    returns its label counts (segmentation) as a payload."""
    from vemscale.blocks.scratch import scratch
    from vemscale.export.pyramid import downsample_in_memory
    from vemscale.post.stats import encode_counts, label_counts

    dst = open_spec(dst_spec, write=True, run=run)
    full = ((slice(0, volume.shape[0]),) if volume.ndim == 4 else ()) + tuple(box)
    data = volume.read(full, out=scratch("export.block", [s.stop - s.start for s in full], volume.dtype))
    if data.ndim == 4 and dst.rank == 3:  # one channel: the layer view has no channel axis
        data = data[0]
    dtype = dst.dtype.numpy_dtype
    if data.dtype.kind == "f" and dtype.kind != "f":
        raise ValueError(f"float data into {dtype}")
    stored = data.astype(dtype, copy=False)
    write_chunk_aligned_block(dst, box, stored)
    if levels:
        downsample_in_memory(stored, box, levels, method, run)
    return encode_counts(label_counts(data)) if count else None


def copy_scale0(volume: Any, store: Any, task_voxels: int, count: bool, max_in_flight: int | None,
                url: str = "", describe: dict[str, Any] | None = None, blocks_per_batch: int | None = None,
                pyramid: list[tuple[int, Any, tuple[int, int, int]]] | None = None,
                method: str = "mean", encoding: str = "raw") -> tuple[dict[int, int], dict[str, Any]]:
    """Copy `volume` into the scale-0 view `store` blockwise (resumable through the layer's ledger), writing
    the leading `pyramid` levels (`plan_pyramid`) that `fusable_levels` allows in the same blocks.

    Returns the label counts of all blocks (when `count`) and the step's run summary; its `fused` lists the
    scale indices written."""
    from vemscale.export.pyramid import fusable_levels
    from vemscale.post.stats import decode_counts, merge_counts

    grid = BlockGrid.aligned(store.shape[-3:], write_chunk_shape(store)[-3:], task_voxels)
    spec = view_spec(store)
    pyramid = list(pyramid or [])
    fused = pyramid[: fusable_levels(grid, pyramid, encoding)]
    levels = [{"spec": view_spec(view), "factors_zyx": [int(k) for k in f]} for _, view, f in fused]
    desc = {"step": "scale0", "version": 1, "source": volume.url, "scale": volume.scale, "shape": list(volume.shape),
            "dtype": str(volume.dtype), "dest": spec, **(describe or {})}
    if levels:  # a scale 0 written with other fused levels is another step's result
        desc["fused_levels"] = {"levels": levels, "method": method}
    ledger, summary = run_step(url, "scale0", desc, grid, copy_block,
                               {"volume": volume, "dst_spec": spec, "count": count, "run": uuid.uuid4().hex,
                                "levels": levels, "method": method},
                               bytes_per_voxel=2 * volume.dtype.itemsize * (volume.shape[0] if volume.ndim == 4 else 1),
                               max_in_flight=max_in_flight, blocks_per_batch=blocks_per_batch)
    counts: dict[int, int] = {}
    if count:
        for p in payloads(ledger, grid.num_blocks):
            merge_counts(counts, decode_counts(p))
    summary["generation"] = ledger.generation
    summary["fused"] = [index for index, _, _ in fused]
    return counts, summary
