"""Scale 0 of an export: decide the layer from the source volume, then copy it in write-chunk-aligned Ray tasks."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import ray

from vemscale.config import absolute_url
from vemscale.errors import UserError
from vemscale.export.grid import BoxGrid, box_to_list, list_to_box
from vemscale.export.precomputed import default_encoding, layer_kvstore, precomputed_dtype, view_spec, \
    write_chunk_aligned_block, write_chunk_shape
from vemscale.export.tasks import open_spec, run_tasks

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


def plan_layer(cfg: Any, shard_above_chunks: int = 4096) -> dict[str, Any]:
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
    chunks = math.prod(-(-s // min(c, s)) for s, c in zip(shape, cfg.chunk))
    sharded = chunks > shard_above_chunks if cfg.sharded == "auto" else bool(cfg.sharded)
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
            "encoding": encoding, "sharded": sharded, "attrs": attrs, "url": dest_url(cfg.dest)}


@ray.remote(num_cpus=1)
def _copy_task(volume: Any, dst_spec: dict[str, Any], box: list[list[int]], count: bool) -> dict[int, int] | int:
    """Copy one write-chunk-aligned box of scale 0; returns label counts (segmentation) or voxels written."""
    from vemscale.post.stats import label_counts

    dst = open_spec(dst_spec, write=True)
    zyx = list_to_box(box)
    data = volume.read(((slice(None),) if volume.ndim == 4 else ()) + zyx)
    if data.ndim == 4 and dst.rank == 3:  # one channel: the layer view has no channel axis
        data = data[0]
    dtype = dst.dtype.numpy_dtype
    if data.dtype.kind == "f" and dtype.kind != "f":
        raise ValueError(f"float data into {dtype}")
    write_chunk_aligned_block(dst, zyx, data.astype(dtype, copy=False))
    return label_counts(data) if count else int(np.prod(data.shape[-3:]))


def copy_scale0(volume: Any, store: Any, task_voxels: int, count: bool, max_in_flight: int | None) -> dict[int, int]:
    """Copy `volume` into the scale-0 view `store` blockwise on Ray; returns label counts when `count`."""
    from vemscale.post.stats import merge_counts

    grid = BoxGrid.aligned(store.shape[-3:], write_chunk_shape(store)[-3:], task_voxels)
    ref, spec = ray.put(volume), view_spec(store)
    counts: dict[int, int] = {}
    run_tasks(lambda i: _copy_task.remote(ref, spec, box_to_list(grid.box(i)), count), range(grid.num_boxes),
              (lambda c: merge_counts(counts, c)) if count else None, max_in_flight=max_in_flight, desc="scale 0")
    return counts
