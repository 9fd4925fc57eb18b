"""Neuroglancer multi-resolution meshes (sharded) for a precomputed segmentation layer, meshed blockwise by the
block runner.

Layout (what Neuroglancer and cloud-volume read)::

    <layer>/info                 + "mesh": "mesh"
    <layer>/mesh/info            {"@type": "neuroglancer_multilod_draco", ..., "sharding": {...}}
    <layer>/mesh/<shard>.shard   per object (uint64 key = label): its Draco fragments, then its manifest
    <layer>/mesh/~fragments-<box>  per block, while the step runs: the block's encoded pieces (deleted at the end)

Step 1 (blocks, through the ledger): each block meshes one box of a scale (a whole number of its chunks) plus one
voxel on the high sides, simplifies and Draco-encodes each label's piece in the block's octree node
(`vemscale.export.multilod`) and writes them as one file; its ledger payload is (label, offset, size, node x, y,
z) per piece. Step 2 (shards): the driver groups those rows by shard (56 bytes per piece) and one Ray task per
shard reads its objects' pieces back (byte ranges), writes each object's manifest after them and the shard file
whole; a rerun writes only missing shards. An object crossing blocks is one fragment per block: the pieces share
their seam vertices (borders locked in simplification), so it is drawn closed, and no task holds more of an
object than one block's piece (a shard task: its shard's bytes). One mesh per label value: per class for class
labels, per object for instance labels.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import numpy as np
import tensorstore as ts

from vemscale.blocks.grid import BlockGrid, Box
from vemscale.blocks.ledger import Ledger, ledger_url
from vemscale.errors import UserError
from vemscale.export.multilod import MULTILOD, encode_fragment, encode_manifest, morton, multilod_info, node_grid
from vemscale.export.precomputed import layer_kvstore, open_scale, read_info, update_info, view_spec, \
    read_chunk_shape
from vemscale.export.shardfile import encode_shard, mesh_sharding, shard_entries, shard_name, shard_of
from vemscale.export.steps import box_list, open_spec, run_step

__all__ = ["MESH_DIR", "write_meshes", "auto_mesh_scale", "mesh_ids"]

log = logging.getLogger(__name__)

MESH_DIR = "mesh"
SCRATCH = "~fragments-"  # sorts after every shard name (hex digits) and after "info"
VERTEX_BITS = 16


def block_key(box: Box) -> str:
    (z0, z1), (y0, y1), (x0, x1) = box_list(box)
    return f"{SCRATCH}{x0}-{x1}_{y0}-{y1}_{z0}-{z1}"


def mesh_block_task(box: Box, seg_spec: dict[str, Any], mesh_kv: str, voxel_size_xyz: list[float],
                    block_zyx: list[int], reduction_factor: int, max_error_nm: float | None, run: str) -> bytes:
    """Mesh one box (+1 voxel on high sides) into one file of its labels' Draco pieces; payload: uint64 rows
    (label, offset, size, node x, y, z), empty when the box has no label."""
    from vemscale.post.mesh import block_pieces

    seg = open_spec(seg_spec, run=run)
    shape = seg.shape
    read = tuple(slice(s.start, min(s.stop + 1, n)) for s, n in zip(box, shape))
    labels_zyx = seg[read].read().result()
    chunk_shape, grid_origin = node_grid(block_zyx[::-1], voxel_size_xyz)
    block_index = [s.start // b + 1 for s, b in zip(box, block_zyx)][::-1]  # x,y,z node of the block's own cells
    rows, data, offset = [], [], 0
    for label, node_offset, mesh in block_pieces(
            labels_zyx.T, voxel_size_xyz, [s.start for s in read][::-1], pad_low=[s.start == 0 for s in read][::-1],
            pad_high=[s.stop == n for s, n in zip(read, shape)][::-1], reduction_factor=reduction_factor,
            max_error_nm=max_error_nm):
        node = [i + d for i, d in zip(block_index, node_offset)]
        piece = encode_fragment(mesh.vertices, mesh.faces, node, chunk_shape, grid_origin, VERTEX_BITS)
        if piece is None:
            continue
        rows.append((label, offset, len(piece), *node))
        data.append(piece)
        offset += len(piece)
    if not rows:
        return b""
    kv = ts.KvStore.open(mesh_kv).result()
    kv.write(block_key(box), b"".join(data)).result()
    return np.asarray(rows, "<u8").tobytes()


def write_mesh_shard(shard: int, rows: np.ndarray, blocks: list[str], mesh_kv: str, sharding: dict[str, Any],
                     chunk_shape: list[float], grid_origin: list[float], lod_scale: float) -> int:
    """Write one shard file from its rows (label, block, offset, size, node x, y, z): each object's pieces in
    Z-curve order of their nodes, then its manifest; returns the number of objects."""
    kv = ts.KvStore.open(mesh_kv).result()
    rows = rows[np.lexsort((morton(rows[:, 4:7]), rows[:, 0]))]  # by label, then the Z-curve of its nodes
    batch = ts.Batch()  # the shard's pieces (its bytes, which the shard file holds anyway), read at once
    reads = [kv.read(blocks[int(b)], byte_range=slice(int(o), int(o + n)), batch=batch) for b, o, n in rows[:, 1:4]]
    batch.submit()
    entries = []
    labels, starts = np.unique(rows[:, 0], return_index=True)
    for label, start, stop in zip(labels, starts, list(starts[1:]) + [len(rows)]):
        part = rows[start:stop]
        data = b"".join(bytes(reads[i].result().value) for i in range(start, stop))
        manifest = encode_manifest(np.asarray(chunk_shape), np.asarray(grid_origin), part[:, 4:7], part[:, 3], lod_scale)
        entries.append((int(label), data, manifest))
    kv.write(shard_name(shard, sharding), encode_shard(entries, sharding)).result()
    return len(entries)


def _pieces(ledger: Ledger, grid: BlockGrid) -> tuple[np.ndarray, list[str]]:
    """Every done block's pieces as rows (label, block, offset, size, node x, y, z) and the blocks' file names
    (56 bytes per piece in the driver: 1e7 pieces, 560 MB)."""
    found, blocks = [], []
    for index, payload in ledger.payloads(grid.num_blocks):
        if payload:
            part = np.frombuffer(payload, "<u8").reshape(-1, 6)
            found.append(np.column_stack([part[:, 0], np.full(len(part), len(blocks), np.uint64), part[:, 1:]]))
            blocks.append(block_key(grid.box(index)))
    return (np.concatenate(found) if found else np.zeros((0, 7), np.uint64)), blocks


def _written_shards(kv: ts.KvStore) -> np.ndarray:
    """Numbers of the shard files present (names are hex digits + ".shard")."""
    names = [bytes(k).decode() for k in kv.list(ts.KvStore.KeyRange(exclusive_max="g")).result()]
    return np.asarray([int(n[:-6], 16) for n in names if n.endswith(".shard")], np.uint64)


def _lost_pieces(kv: ts.KvStore, rows: np.ndarray, shards: np.ndarray, blocks: list[str]) -> int:
    """How many block files that shards still to be written need are missing (0 after a kill: they are deleted
    only once every shard is written)."""
    needed = np.unique(rows[~np.isin(shards, _written_shards(kv)), 1])
    if not len(needed):
        return 0
    have = {bytes(k).decode() for k in kv.list(ts.KvStore.KeyRange(inclusive_min=SCRATCH,
                                                                    exclusive_max=SCRATCH[:-1] + ".")).result()}
    return sum(blocks[int(b)] not in have for b in needed)


def write_shards(mesh_kv: str, rows: np.ndarray, shards: np.ndarray, blocks: list[str], sharding: dict[str, Any],
                 node: tuple[list[float], list[float]], lod_scale: float,
                 max_in_flight: int | None = None) -> dict[str, int]:
    """One Ray task per shard not written yet (a rerun after a kill writes only the missing ones)."""
    import ray

    written_before = set(_written_shards(ts.KvStore.open(mesh_kv).result()).tolist())
    order = np.argsort(shards, kind="stable")  # each shard's rows together (its task orders them by object)
    rows, shards = rows[order], shards[order]
    numbers, starts = np.unique(shards, return_index=True)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    limit = max_in_flight or 2 * cpus
    remote = ray.remote(num_cpus=1, max_retries=3)(write_mesh_shard)
    objects, written, in_flight = 0, 0, []
    for number, start, stop in zip(numbers, starts, list(starts[1:]) + [len(rows)]):
        if int(number) in written_before:
            continue
        if len(in_flight) >= limit:
            ready, in_flight = ray.wait(in_flight, num_returns=1)
            objects += ray.get(ready[0])
        part = rows[start:stop].copy()
        used, part[:, 1] = np.unique(part[:, 1], return_inverse=True)  # the shard's own block names only
        in_flight.append(remote.remote(int(number), part, [blocks[int(b)] for b in used], mesh_kv, sharding,
                                       node[0], node[1], lod_scale))
        written += 1
    objects += sum(ray.get(in_flight))
    return {"shards": int(len(numbers)), "shards_written": written, "objects_written": objects}


def auto_mesh_scale(info: dict[str, Any]) -> int:
    """The coarsest scale reached by xy-only downsampling whose xy voxel is still at most half the z voxel, else 0.

    On anisotropic EM the surface's z steps are the slice thickness at every such scale, so meshing there
    keeps the detail z allows with many times fewer voxels: 4.6x4.6x50 nm meshes at 18.4x18.4x50 (scale 2,
    16x fewer voxels and triangles to simplify than scale 0); 4x4x40 nm at 16x16x40. Isotropic data: scale 0.
    """
    scales = info["scales"]
    z0 = scales[0]["resolution"][2]
    best = 0
    for i, s in enumerate(scales[1:], start=1):
        res = s["resolution"]
        if res[2] != z0 or 2 * max(res[:2]) > res[2]:
            break
        best = i
    return best


def write_meshes(url: str, scale_index: int | str = "auto", reduction_factor: int = 10, max_error_nm: float | None = None,
                 target_voxels: int = 2**22, max_in_flight: int | None = None,
                 source_generation: str | None = None, blocks_per_batch: int | None = None,
                 objects_per_shard: int = 2048) -> dict[str, Any]:
    """Mesh every label of the segmentation layer at `url` (from scale `scale_index`, "auto": see
    `auto_mesh_scale`) into sharded multi-resolution meshes in `<url>/mesh` (about `objects_per_shard` per file).

    `max_error_nm` bounds simplification (default: the scale's xy voxel size). Returns labels, fragments, time.
    """
    from vemscale.raycluster import ensure_ray

    info = read_info(url)
    if info is None or info.get("type") != "segmentation":
        raise UserError(f"{url!r} is not a precomputed segmentation layer; meshes need one")
    scale_index = auto_mesh_scale(info) if scale_index == "auto" else int(scale_index)
    if not 0 <= scale_index < len(info["scales"]):
        raise UserError(f"{url!r} has no scale {scale_index} (it has {len(info['scales'])})")
    voxel = [float(r) for r in info["scales"][scale_index]["resolution"]]
    if max_error_nm is None:
        max_error_nm = min(voxel[:2])
    seg = open_scale(url, scale_index)
    grid = BlockGrid.aligned(seg.shape, read_chunk_shape(seg), target_voxels)  # read-only: any chunk multiple
    mesh_kv = layer_kvstore(url) + MESH_DIR + "/"
    kv = ts.KvStore.open(mesh_kv).result()
    ensure_ray()
    t0 = time.perf_counter()
    spec = view_spec(seg)
    # version 3: sharded multi-resolution meshes, a fragment per block (2: legacy meshes simplified by
    # meshoptimizer; 1: by zmesh); the format's parameters too, so a resume never mixes two layouts
    desc = {"step": "meshes", "version": 3, "parent": source_generation or "external", "scale": scale_index,
            "source": spec, "reduction_factor": reduction_factor, "max_error_nm": max_error_nm,
            "format": {"vertex_bits": VERTEX_BITS, "objects_per_shard": objects_per_shard, "draco_level": 1,
                       "hash": "murmurhash3_x86_128"}}
    kwargs = {"seg_spec": spec, "mesh_kv": mesh_kv, "voxel_size_xyz": voxel, "block_zyx": list(grid.block_shape),
              "reduction_factor": reduction_factor, "max_error_nm": max_error_nm, "run": uuid.uuid4().hex}
    ledger = Ledger.open(ledger_url(url, "meshes"), {**desc, "grid": grid.to_dict()})
    if ledger.fresh:  # a new mesh run must not keep meshes of labels now gone; a resumed one keeps its own
        kv.delete_range(ts.KvStore.KeyRange()).result()
    for attempt in range(2):
        ledger, summary = run_step(url, "meshes", desc, grid, mesh_block_task, kwargs, bytes_per_voxel=64.0,
                                   max_in_flight=max_in_flight, blocks_per_batch=blocks_per_batch)
        rows, blocks = _pieces(ledger, grid)
        labels, which = np.unique(rows[:, 0], return_inverse=True)
        sharding = mesh_sharding(len(labels), objects_per_shard)
        shards = shard_of(labels, sharding)[which.reshape(-1)]  # hashed once per object
        lost = _lost_pieces(kv, rows, shards, blocks)
        if not lost:
            break
        if attempt:
            raise RuntimeError(f"{lost} mesh piece files of {mesh_kv} vanished while meshing; rerun the export")
        # a shard is missing and so are the block files it is made from (removed by hand, or a partial copy)
        log.warning("meshes: %d block files of unwritten shards are gone; meshing every block again", lost)
        Ledger.invalidate(ledger_url(url, "meshes"))
        kv.delete_range(ts.KvStore.KeyRange()).result()
    chunk_shape, grid_origin = node_grid(list(grid.block_shape)[::-1], voxel)
    t_shards = time.perf_counter()
    written = write_shards(mesh_kv, rows, shards, blocks, sharding, (chunk_shape.tolist(), grid_origin.tolist()),
                           min(voxel), max_in_flight)
    kv.write("info", json.dumps(multilod_info(sharding, VERTEX_BITS)).encode()).result()
    update_info(url, mesh=MESH_DIR)
    kv.delete_range(ts.KvStore.KeyRange(inclusive_min=SCRATCH, exclusive_max=SCRATCH[:-1] + ".")).result()
    seconds = time.perf_counter() - t0
    log.info("meshes: %d labels, %d pieces from %d blocks in %d shards, %.1f s", len(labels), len(rows),
             grid.num_blocks, written["shards"], seconds)
    return {"labels": int(len(labels)), "fragments": int(len(rows)), "blocks": grid.num_blocks,
            "shards": written["shards"], "shards_written": written["shards_written"],
            "shard_seconds": round(time.perf_counter() - t_shards, 3), "computed": summary["computed"],
            "skipped": summary["skipped"], "scale": scale_index, "seconds": round(seconds, 3)}


def mesh_ids(url: str, limit: int | None = None) -> list[int]:
    """Labels that have a mesh in `<url>/mesh` (sharded multi-resolution meshes, as written here; up to about
    `limit`), for the viewer's default visible segments; [] for other mesh formats."""
    kv = ts.KvStore.open(layer_kvstore(url) + MESH_DIR + "/").result()
    value = kv.read("info").result()
    info = json.loads(bytes(value.value)) if value.state == "value" else {}
    if info.get("@type") != MULTILOD or "sharding" not in info:
        return []
    ids: list[int] = []
    for key in sorted(bytes(k).decode() for k in kv.list(ts.KvStore.KeyRange(exclusive_max="g")).result()):
        read = lambda a, b, key=key: bytes(kv.read(key, byte_range=slice(a, b)).result().value)  # noqa: E731
        ids.extend(shard_entries(read, info["sharding"]))
        if limit is not None and len(ids) > limit:
            break
    return sorted(ids)
