"""Legacy Neuroglancer meshes for a precomputed segmentation layer, meshed blockwise by the block runner.

Layout (what Neuroglancer and cloud-volume read)::

    <layer>/info                 + "mesh": "mesh"
    <layer>/mesh/info            {"@type": "neuroglancer_legacy_mesh"}
    <layer>/mesh/<id>:0          manifest {"fragments": ["<id>:0:<x0>-<x1>_<y0>-<y1>_<z0>-<z1>", ...]}
    <layer>/mesh/<id>:0:<box>    one fragment per block the label occurs in (vertices in nm)
    <layer>/mesh/<id>:0:merged   a label's fragments welded into one mesh (labels found in several blocks)

Each block meshes one box of a scale (a whole number of its chunks) plus one voxel on the high sides,
writes its fragments and leaves their names per label as its ledger payload; the driver gathers all payloads
(so a resumed run lists the fragments of the blocks it skipped too) and Ray tasks (`finish_labels`) write
each label's manifest, after merging a label with fragments in several blocks into one mesh: fragments
share their seam vertices, so the weld closes it. One mesh per label value: per class for class labels, per
object for instance labels.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

import tensorstore as ts

from vemscale.blocks.grid import BlockGrid, Box
from vemscale.blocks.ledger import Ledger, ledger_url
from vemscale.errors import UserError
from vemscale.export.precomputed import layer_kvstore, open_scale, read_info, update_info, view_spec, \
    read_chunk_shape
from vemscale.export.steps import box_list, open_spec, payloads, run_step

__all__ = ["MESH_DIR", "write_meshes", "auto_mesh_scale", "mesh_ids", "fragment_name"]

log = logging.getLogger(__name__)

MESH_DIR = "mesh"


def fragment_name(label: int, box_zyx: list[list[int]]) -> str:
    (z0, z1), (y0, y1), (x0, x1) = box_zyx
    return f"{label}:0:{x0}-{x1}_{y0}-{y1}_{z0}-{z1}"


def mesh_block_task(box: Box, seg_spec: dict[str, Any], mesh_kv: str, voxel_size_xyz: list[float],
                    reduction_factor: int, max_error_nm: float | None, run: str) -> bytes:
    """Mesh one box (+1 voxel on high sides) and write its fragments; payload: JSON {label: fragment name}."""
    from vemscale.post.mesh import mesh_block

    seg = open_spec(seg_spec, run=run)
    shape = seg.shape
    read = tuple(slice(s.start, min(s.stop + 1, n)) for s, n in zip(box, shape))
    labels_zyx = seg[read].read().result()
    meshes = mesh_block(labels_zyx.T, voxel_size_xyz, [s.start for s in read][::-1],
                        pad_low=[s.start == 0 for s in read][::-1], pad_high=[s.stop == n for s, n in zip(read, shape)][::-1],
                        reduction_factor=reduction_factor, max_error_nm=max_error_nm)
    kv = ts.KvStore.open(mesh_kv).result()
    names = {int(label): fragment_name(label, box_list(box)) for label in meshes}
    futures = [kv.write(names[int(label)], data) for label, data in meshes.items()]
    for f in futures:
        f.result()
    return json.dumps(names).encode()


def weld(mesh: Any, digits: int = 2) -> Any:
    """Join vertices that coincide (to 10^-digits nm) and drop faces that collapse: block fragments share their
    seam vertices exactly (marching cubes on the same lattice; the simplifier keeps open borders), so the welded
    object mesh is closed where the object is."""
    import numpy as np
    import zmesh

    keys = np.round(mesh.vertices.astype(np.float64), digits)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    faces = inverse.reshape(-1)[mesh.faces]
    good = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    return zmesh.Mesh(uniq.astype(np.float32), faces[good].astype(np.uint32), None)


def finish_label_batch(labels: list[int], names: list[list[str]], mesh_kv: str) -> int:
    """Each label's manifest, after merging the fragments of those found in several blocks into one mesh
    (read, concatenated, welded, written as `<id>:0:merged`); returns how many were merged."""
    import zmesh

    kv = ts.KvStore.open(mesh_kv).result()
    writes, merged = [], 0
    for label, frags in zip(labels, names):
        if len(frags) > 1:
            reads = [kv.read(n) for n in frags]
            parts = [zmesh.Mesh.from_precomputed(bytes(r.result().value)) for r in reads]
            mesh = weld(zmesh.Mesh.concatenate(*parts))
            writes.append(kv.write(f"{label}:0:merged", mesh.to_precomputed()))
            frags = [f"{label}:0:merged"]
            merged += 1
        writes.append(kv.write(f"{label}:0", json.dumps({"fragments": sorted(frags)}).encode()))
    for w in writes:
        w.result()
    return merged


def finish_labels(mesh_kv: str, fragments: dict[int, list[str]], max_in_flight: int | None = None,
                  max_labels_per_task: int = 1024) -> int:
    """Write every label's manifest and merge the fragments of labels found in several blocks (Ray tasks of
    equal shares, at least two per CPU: file creation is most of the work); returns the number merged.
    Neuroglancer then draws an object crossing many blocks as one closed mesh."""
    import ray

    if not fragments:
        return 0
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    limit = max_in_flight or 2 * cpus
    labels = sorted(fragments)
    tasks = max(2 * cpus, -(-len(labels) // max_labels_per_task))
    remote = ray.remote(num_cpus=1, max_retries=3)(finish_label_batch)
    merged, in_flight = 0, []
    for k in range(tasks):  # label k goes to task k % tasks: merged labels spread evenly
        batch = labels[k::tasks]
        if not batch:
            continue
        if len(in_flight) >= limit:
            ready, in_flight = ray.wait(in_flight, num_returns=1)
            merged += ray.get(ready[0])
        in_flight.append(remote.remote(batch, [fragments[b] for b in batch], mesh_kv))
    return merged + sum(ray.get(in_flight))


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
    `auto_mesh_scale`) into `<url>/mesh`.

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
    # version 2: meshoptimizer's simplification (1: zmesh's); a run of the other version starts over
    desc = {"step": "meshes", "version": 2, "parent": source_generation or "external", "scale": scale_index,
            "source": spec, "reduction_factor": reduction_factor, "max_error_nm": max_error_nm}
    kwargs = {"seg_spec": spec, "mesh_kv": mesh_kv, "voxel_size_xyz": voxel, "reduction_factor": reduction_factor,
              "max_error_nm": max_error_nm, "run": uuid.uuid4().hex}
    ledger = Ledger.open(ledger_url(url, "meshes"), {**desc, "grid": grid.to_dict()})
    if ledger.fresh:  # a new mesh run must not keep fragments of labels now gone; a resumed one keeps its own
        kv.delete_range(ts.KvStore.KeyRange()).result()
    ledger, summary = run_step(url, "meshes", desc, grid, mesh_block_task, kwargs, bytes_per_voxel=64.0,
                               max_in_flight=max_in_flight, blocks_per_batch=blocks_per_batch)
    fragments: dict[int, list[str]] = {}
    for p in payloads(ledger, grid.num_blocks):
        for label, name in json.loads(p).items():
            fragments.setdefault(int(label), []).append(name)
    n = grid.num_blocks
    t_merge = time.perf_counter()
    merged = finish_labels(mesh_kv, fragments, max_in_flight)
    kv.write("info", json.dumps({"@type": "neuroglancer_legacy_mesh"}).encode()).result()
    update_info(url, mesh=MESH_DIR)
    seconds = time.perf_counter() - t0
    log.info("meshes: %d labels, %d fragments from %d blocks in %.1f s", len(fragments),
             sum(map(len, fragments.values())), n, seconds)
    return {"labels": len(fragments), "fragments": int(sum(map(len, fragments.values()))), "blocks": n,
            "merged_labels": merged, "merge_seconds": round(time.perf_counter() - t_merge, 3),
            "computed": summary["computed"], "skipped": summary["skipped"], "scale": scale_index,
            "seconds": round(seconds, 3)}


def mesh_ids(url: str) -> list[int]:
    """Labels that have a mesh manifest in `<url>/mesh` (for the viewer's default visible segments)."""
    kv = ts.KvStore.open(layer_kvstore(url) + MESH_DIR + "/").result()
    keys = [bytes(k).decode() for k in kv.list().result()]
    return sorted(int(k[:-2]) for k in keys if k.endswith(":0") and k[:-2].isdigit())

