"""Stage `ingest`: convert a TIFF stack, HDF5 dataset, MRC file or folder of slices into an OME-Zarr image.

The source is streamed in slabs one output chunk deep (z), so memory holds about two slabs (one being
read, one being written), never the whole volume. Anything `open_volume` reads can be ingested, so the
same stage also re-chunks zarr/n5/precomputed sources. A rerun with the same output reopens it and
rewrites the same bytes; an output of another shape or dtype is refused without `overwrite`.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, Sequence

from vemscale.errors import UserError
from vemscale.io.ome_zarr import create_ome_zarr
from vemscale.io.shards import DEFAULT_SHARD_VOXELS, plan_layout
from vemscale.io.urls import parse_url
from vemscale.io.volume import open_volume, parse_voxel_size

__all__ = ["ingest", "add_arguments", "run_cli", "DEFAULT_CHUNKS"]

log = logging.getLogger(__name__)

DEFAULT_CHUNKS = (16, 256, 256)


def parse_ints(text: str | Sequence[int], n: int, what: str) -> tuple[int, ...]:
    """`'16,256,256'` -> (16, 256, 256); UserError unless `n` positive integers."""
    parts = text.replace(" ", "").split(",") if isinstance(text, str) else list(text)
    try:
        vals = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != n or min(vals) < 1:
        raise UserError(f"{what} {text!r} must be {n} positive integers separated by commas")
    return vals


def ingest(
    src: str,
    dst: str,
    voxel_size_xyz: str | Sequence[float] | None = None,
    chunks: str | Sequence[int] = DEFAULT_CHUNKS,
    overwrite: bool = False,
    zarr_format: int = 2,
    sharded: bool = False,
    shard_voxels: int = DEFAULT_SHARD_VOXELS,
) -> dict[str, Any]:
    """Copy `src` into a new OME-Zarr image at `dst` and return what was written.

    `voxel_size_xyz` (x,y,z nm) wins over the source's own metadata (OME/ImageJ TIFF tags, HDF5
    `resolution`/`element_size_um`, MRC header in Å); without either it is a UserError. `chunks` is z,y,x
    (clipped to the shape); multi-channel sources get one channel per chunk. `sharded` writes OME-Zarr 0.5
    (zarr v3) with the sharding codec: shards one slab deep, whole chunks up to `shard_voxels`, so each slab
    write covers whole shards.
    """
    src_parsed, dst_parsed = parse_url(src), parse_url(dst)
    if src_parsed.location.rstrip("/") == dst_parsed.location.rstrip("/"):
        raise UserError(f"source and output are the same location {src!r}; choose another output")
    vol = open_volume(src)
    voxel = parse_voxel_size(voxel_size_xyz) or vol.voxel_size_xyz
    if voxel is None:
        raise UserError(f"{src!r} has no voxel size in its metadata; pass --voxel-size X,Y,Z in nanometres "
                        "(e.g. --voxel-size 4.6,4.6,50)")
    zyx = parse_ints(chunks, 3, "chunks")
    out_chunks = ((1,) if vol.ndim == 4 else ()) + zyx
    shape_zyx = vol.shape[-3:]
    depth = min(zyx[0], shape_zyx[0])
    shard = None
    if sharded:  # a slab (one chunk deep, the whole plane) is the block: its shards have one writer
        if zarr_format == 2:
            log.info("ingest: sharded output is zarr v3 (OME-Zarr 0.5)")
        zarr_format = 3
        shard = plan_layout("zarr", True, shape_zyx, zyx, (depth, *shape_zyx[1:]), target_voxels=shard_voxels).shard
        shard = tuple(min(v, s) for v, s in zip(shard, shape_zyx))
    store = create_ome_zarr(dst, vol.shape, vol.dtype, out_chunks, voxel, overwrite=overwrite, zarr_format=zarr_format,
                            shard=((1,) if vol.ndim == 4 else ()) + shard if shard else None)  # one channel per shard
    nz = vol.shape[-3]
    lead = (slice(None),) * (vol.ndim - 3)
    pending = None
    t0 = time.monotonic()
    last_report = t0
    for z0 in range(0, nz, depth):
        box = lead + (slice(z0, min(z0 + depth, nz)),)
        slab = vol.read(box)
        if pending is not None:
            pending.result()
        pending = store[box].write(slab)
        if time.monotonic() - last_report > 10:
            last_report = time.monotonic()
            log.info("ingest %s: %d/%d slices", src, min(z0 + depth, nz), nz)
    if pending is not None:
        pending.result()
    log.info("ingested %s -> %s: shape %s %s in %.1f s", src, dst, vol.shape, vol.dtype, time.monotonic() - t0)
    return {
        "output": os.fspath(dst),
        "shape": list(vol.shape),
        "dtype": str(vol.dtype),
        "voxel_size_xyz": list(voxel),
        "chunks": [int(c) for c in store.chunk_layout.read_chunk.shape],
        "shard": list(shard) if shard else None,
        "source": os.fspath(src),
        "source_format": vol.kind,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`vemscale ingest SRC DST --voxel-size X,Y,Z [--chunks Z,Y,X] [--overwrite] [--zarr-format 2|3]`."""
    parser.add_argument("src", help="TIFF stack, file.h5:/dataset, MRC file, folder of PNG/TIFF slices, or any readable volume URL")
    parser.add_argument("dst", help="output OME-Zarr directory or URL (e.g. data/raw.ome.zarr, s3://bucket/raw.zarr)")
    parser.add_argument("--voxel-size", default=None, metavar="X,Y,Z",
                        help="voxel size in nanometres, x,y,z (e.g. 4.6,4.6,50); default: from the source's metadata")
    parser.add_argument("--chunks", default=",".join(map(str, DEFAULT_CHUNKS)), metavar="Z,Y,X",
                        help="output chunk shape z,y,x (default %(default)s; clipped to the volume)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output of another shape/dtype")
    parser.add_argument("--zarr-format", type=int, choices=(2, 3), default=2,
                        help="2: OME-Zarr 0.4 (zarr v2, default), 3: OME-Zarr 0.5 (zarr v3)")
    parser.add_argument("--sharded", action="store_true",
                        help="zarr v3 with the sharding codec: one object per shard of whole chunks, one slab deep")
    parser.add_argument("--shard-voxels", type=int, default=DEFAULT_SHARD_VOXELS,
                        help="target voxels per shard (default %(default)s)")


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    result = ingest(args.src, args.dst, voxel_size_xyz=args.voxel_size, chunks=args.chunks,
                    overwrite=args.overwrite, zarr_format=args.zarr_format, sharded=args.sharded,
                    shard_voxels=args.shard_voxels)
    vs = ",".join(f"{v:g}" for v in result["voxel_size_xyz"])
    print(f"wrote {result['output']}: shape {tuple(result['shape'])} {result['dtype']}, voxel size {vs} nm (x,y,z), "
          f"chunks {tuple(result['chunks'])}" + (f", shards {tuple(result['shard'])}" if result["shard"] else ""))
    return result
