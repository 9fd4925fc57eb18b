"""Neuroglancer multi-resolution meshes (sharded) for a precomputed segmentation layer, meshed blockwise by the
block runner.

Layout (what Neuroglancer and cloud-volume read)::

    <layer>/info                 + "mesh": "mesh"
    <layer>/mesh/info            {"@type": "neuroglancer_multilod_draco", ..., "sharding": {...}}
    <layer>/mesh/<shard>.shard   per object (uint64 key = label): its Draco fragment, then its manifest
    <layer>/mesh/~fragments-<box>  per block, while the step runs: the block's label meshes (deleted at the end)

Step 1 (blocks, through the ledger): each block meshes one box of a scale (a whole number of its chunks) plus
one voxel on the high sides and writes one file of its labels' meshes; its ledger payload is (label, offset,
size) per label. Step 2 (shards): the driver groups those rows by shard (32 bytes per fragment) and one Ray task
per shard reads its labels' pieces, welds a label found in several blocks into one mesh (pieces share their seam
vertices, so the weld closes it), encodes each object and writes the shard file whole; a rerun writes only
missing shards. A file per block and per shard, where the legacy format needed a manifest and a fragment per
object and block. One mesh per label value: per class for class labels, per object for instance labels.
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
from vemscale.export.multilod import MULTILOD, encode_object, multilod_info
from vemscale.export.precomputed import layer_kvstore, open_scale, read_info, update_info, view_spec, \
    read_chunk_shape
from vemscale.export.shardfile import encode_shard, mesh_sharding, shard_entries, shard_name, shard_of
from vemscale.export.steps import box_list, open_spec, run_step

__all__ = ["MESH_DIR", "write_meshes", "auto_mesh_scale", "mesh_ids", "weld"]

log = logging.getLogger(__name__)

MESH_DIR = "mesh"
SCRATCH = "~fragments-"  # sorts after every shard name (hex digits) and after "info"
VERTEX_BITS = 16


def block_key(box: Box) -> str:
    (z0, z1), (y0, y1), (x0, x1) = box_list(box)
    return f"{SCRATCH}{x0}-{x1}_{y0}-{y1}_{z0}-{z1}"


def mesh_block_task(box: Box, seg_spec: dict[str, Any], mesh_kv: str, voxel_size_xyz: list[float],
                    reduction_factor: int, max_error_nm: float | None, run: str) -> bytes:
    """Mesh one box (+1 voxel on high sides) into one file of its labels' meshes (legacy precomputed encoding,
    concatenated); payload: uint64 rows (label, offset, size), empty when the box has no label."""
    from vemscale.post.mesh import mesh_block

    seg = open_spec(seg_spec, run=run)
    shape = seg.shape
    read = tuple(slice(s.start, min(s.stop + 1, n)) for s, n in zip(box, shape))
    labels_zyx = seg[read].read().result()
    meshes = mesh_block(labels_zyx.T, voxel_size_xyz, [s.start for s in read][::-1],
                        pad_low=[s.start == 0 for s in read][::-1], pad_high=[s.stop == n for s, n in zip(read, shape)][::-1],
                        reduction_factor=reduction_factor, max_error_nm=max_error_nm)
    if not meshes:
        return b""
    rows, offset = [], 0
    for label in sorted(meshes):
        rows.append((label, offset, len(meshes[label])))
        offset += len(meshes[label])
    kv = ts.KvStore.open(mesh_kv).result()
    kv.write(block_key(box), b"".join(meshes[label] for label in sorted(meshes))).result()
    return np.asarray(rows, "<u8").tobytes()


def weld(mesh: Any, digits: int = 2) -> Any:
    """Join vertices that coincide (to 10^-digits nm) and drop faces that collapse: block fragments share their
    seam vertices exactly (marching cubes on the same lattice; the simplifier keeps open borders), so the welded
    object mesh is closed where the object is."""
    import zmesh

    keys = np.round(mesh.vertices.astype(np.float64), digits)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    faces = inverse.reshape(-1)[mesh.faces]
    good = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    return zmesh.Mesh(uniq.astype(np.float32), faces[good].astype(np.uint32), None)


def write_mesh_shard(shard: int, rows: np.ndarray, blocks: list[str], mesh_kv: str, sharding: dict[str, Any],
                     lod_scale: float) -> int:
    """Write one shard file from its rows (label, block, offset, size), sorted by label then block: each label's
    pieces read back, welded when there are several, encoded; returns how many labels were welded."""
    import zmesh

    kv = ts.KvStore.open(mesh_kv).result()
    batch = ts.Batch()
    reads = [kv.read(blocks[int(b)], byte_range=slice(int(o), int(o + n)), batch=batch) for _, b, o, n in rows]
    batch.submit()
    entries, welded = [], 0
    labels, starts = np.unique(rows[:, 0], return_index=True)
    for label, start, stop in zip(labels, starts, list(starts[1:]) + [len(rows)]):
        parts = [zmesh.Mesh.from_precomputed(bytes(reads[i].result().value)) for i in range(start, stop)]
        if len(parts) > 1:
            mesh = weld(zmesh.Mesh.concatenate(*parts))
            welded += 1
        else:
            mesh = parts[0]
        encoded = encode_object(mesh.vertices, mesh.faces, VERTEX_BITS, lod_scale)
        if encoded is not None:
            entries.append((int(label), *encoded))
    kv.write(shard_name(shard, sharding), encode_shard(entries, sharding)).result()
    return welded


def _pieces(ledger: Ledger, grid: BlockGrid) -> tuple[np.ndarray, list[str]]:
    """Every done block's pieces as rows (label, block, offset, size) and the blocks' file names (32 bytes per
    piece in the driver: 1e7 pieces, 320 MB)."""
    found, blocks = [], []
    for index, payload in ledger.payloads(grid.num_blocks):
        if payload:
            part = np.frombuffer(payload, "<u8").reshape(-1, 3)
            found.append(np.column_stack([part[:, 0], np.full(len(part), len(blocks), np.uint64), part[:, 1:]]))
            blocks.append(block_key(grid.box(index)))
    return (np.concatenate(found) if found else np.zeros((0, 4), np.uint64)), blocks


def _written_shards(kv: ts.KvStore) -> set[str]:
    return {bytes(k).decode() for k in kv.list(ts.KvStore.KeyRange(exclusive_max="g")).result()}


def _lost_pieces(kv: ts.KvStore, rows: np.ndarray, blocks: list[str], sharding: dict[str, Any]) -> int:
    """How many block files that shards still to be written need are missing (0 after a kill: they are deleted
    only once every shard is written)."""
    if not len(rows):
        return 0
    names = np.array([shard_name(int(n), sharding) for n in shard_of(rows[:, 0], sharding)])
    needed = np.unique(rows[~np.isin(names, list(_written_shards(kv))), 1])
    if not len(needed):
        return 0
    have = {bytes(k).decode() for k in kv.list(ts.KvStore.KeyRange(inclusive_min=SCRATCH,
                                                                    exclusive_max=SCRATCH[:-1] + ".")).result()}
    return sum(blocks[int(b)] not in have for b in needed)


def write_shards(mesh_kv: str, rows: np.ndarray, blocks: list[str], sharding: dict[str, Any], lod_scale: float,
                 max_in_flight: int | None = None) -> dict[str, int]:
    """One Ray task per shard not written yet (a rerun after a kill writes only the missing ones)."""
    import ray

    done = _written_shards(ts.KvStore.open(mesh_kv).result())
    shards = shard_of(rows[:, 0], sharding)
    order = np.lexsort((rows[:, 1], rows[:, 0], shards))
    rows, shards = rows[order], shards[order]
    numbers, starts = np.unique(shards, return_index=True)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    limit = max_in_flight or 2 * cpus
    remote = ray.remote(num_cpus=1, max_retries=3)(write_mesh_shard)
    welded, written, in_flight = 0, 0, []
    for number, start, stop in zip(numbers, starts, list(starts[1:]) + [len(rows)]):
        if shard_name(int(number), sharding) in done:
            continue
        if len(in_flight) >= limit:
            ready, in_flight = ray.wait(in_flight, num_returns=1)
            welded += ray.get(ready[0])
        part = rows[start:stop].copy()
        used, part[:, 1] = np.unique(part[:, 1], return_inverse=True)  # the shard's own block names only
        in_flight.append(remote.remote(int(number), part, [blocks[int(b)] for b in used], mesh_kv, sharding,
                                       lod_scale))
        written += 1
    welded += sum(ray.get(in_flight))
    return {"shards": int(len(numbers)), "shards_written": written, "welded": welded}


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
                 source_generation: str | None = None, blocks_per_batch: int | None = None) -> dict[str, Any]:
    """Mesh every label of the segmentation layer at `url` (from scale `scale_index`, "auto": see
    `auto_mesh_scale`) into sharded multi-resolution meshes in `<url>/mesh`.

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
    # version 3: sharded multi-resolution meshes (2: legacy meshes simplified by meshoptimizer; 1: by zmesh)
    desc = {"step": "meshes", "version": 3, "parent": source_generation or "external", "scale": scale_index,
            "source": spec, "reduction_factor": reduction_factor, "max_error_nm": max_error_nm}
    kwargs = {"seg_spec": spec, "mesh_kv": mesh_kv, "voxel_size_xyz": voxel, "reduction_factor": reduction_factor,
              "max_error_nm": max_error_nm, "run": uuid.uuid4().hex}
    ledger = Ledger.open(ledger_url(url, "meshes"), {**desc, "grid": grid.to_dict()})
    if ledger.fresh:  # a new mesh run must not keep meshes of labels now gone; a resumed one keeps its own
        kv.delete_range(ts.KvStore.KeyRange()).result()
    for attempt in range(2):
        ledger, summary = run_step(url, "meshes", desc, grid, mesh_block_task, kwargs, bytes_per_voxel=64.0,
                                   max_in_flight=max_in_flight, blocks_per_batch=blocks_per_batch)
        rows, blocks = _pieces(ledger, grid)
        lost = _lost_pieces(kv, rows, blocks, mesh_sharding(len(np.unique(rows[:, 0]))))
        if not lost:
            break
        if attempt:
            raise RuntimeError(f"{lost} mesh piece files of {mesh_kv} vanished while meshing; rerun the export")
        # a shard is missing and so are the block files it is made from (removed by hand, or a partial copy)
        log.warning("meshes: %d block files of unwritten shards are gone; meshing every block again", lost)
        Ledger.invalidate(ledger_url(url, "meshes"))
        kv.delete_range(ts.KvStore.KeyRange()).result()
    labels = int(len(np.unique(rows[:, 0])))
    sharding = mesh_sharding(labels)
    t_merge = time.perf_counter()
    shards = write_shards(mesh_kv, rows, blocks, sharding, min(voxel), max_in_flight) if len(rows) else \
        {"shards": 0, "shards_written": 0, "welded": 0}
    kv.write("info", json.dumps(multilod_info(sharding, VERTEX_BITS)).encode()).result()
    update_info(url, mesh=MESH_DIR)
    kv.delete_range(ts.KvStore.KeyRange(inclusive_min=SCRATCH, exclusive_max=SCRATCH[:-1] + ".")).result()
    seconds = time.perf_counter() - t0
    log.info("meshes: %d labels, %d fragments from %d blocks in %d shards, %.1f s", labels, len(rows),
             grid.num_blocks, shards["shards"], seconds)
    return {"labels": labels, "fragments": int(len(rows)), "blocks": grid.num_blocks, "shards": shards["shards"],
            "shards_written": shards["shards_written"], "merged_labels": shards["welded"],
            "merge_seconds": round(time.perf_counter() - t_merge, 3), "computed": summary["computed"],
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
