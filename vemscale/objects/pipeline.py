"""The instance stage's passes over the block grid, each a pure function of one box run by the block runner.

    label    class image of the core -> components keyed by their first voxel -> scratch `provisional`;
             payload: keys, voxel counts, classes
    faces    provisional labels of the core +/- 1 voxel -> pairs of keys joined across the faces; payload: pairs
    ids      (driver) union-find over the pairs, sizes, ranks -> a map key -> final id per block (scratch `maps/`)
    relabel  provisional core + 1 voxel on the high sides through the maps of the block and its high neighbours
             -> `segmentation` (uint64) and the objects' partial rows (scratch `partials/<bucket>/<block>`)
    table    per bucket of ids: merge the partial rows -> `objects/part-<bucket>.parquet`

With `split=watershed` the passes up to `table` first run into the scratch (`cc/`: whole objects and their
bounding boxes), then

    split    each object the block holds, whole (its bounding box), through the seeded watershed of
             vemscale.post.split -> pieces keyed by their first voxel; the block's components of the pieces
             -> scratch `pieces`; payload: keys, voxel counts, classes and the pairs (component, piece) that
             join a piece's parts in different blocks (no faces pass is needed)

and ids, relabel and table run again on the pieces.

Layout of an output::

    <output>/.zattrs                 {"vemscale": {"kind": "instances", "classes", "layers", "table", ...}}
    <output>/segmentation/           OME-Zarr z,y,x uint64 object ids (0 = background)
    <output>/objects/part-*.parquet  one row per object (vemscale.post.objects), sorted by id
    <output>/plots/objects.png       size and shape histograms per class
    <output>/summary.json            counts per class, timings
    <output>/.vemscale-ledger/       a ledger per pass: a killed run resumes where it stopped
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
import uuid
from typing import Any, Iterator

import numpy as np
import tensorstore as ts

from vemscale.blocks.grid import BlockGrid, Box
from vemscale.blocks.ledger import Ledger, ledger_url, volume_identity
from vemscale.blocks.runner import Stage, run_blocks
from vemscale.export.steps import open_spec, run_step
from vemscale.io.urls import join_url, kvstore_url, parse_url
from vemscale.objects.source import ClassSource
from vemscale.post import ids as idmaps
from vemscale.post.instances import face_pairs, keys_of, label_block
from vemscale.post.split import WatershedParams, split_object
from vemscale.post.objects import TABLE_COLUMNS, block_partials, finish_rows, partials_to_table

__all__ = ["SCRATCH_DIR", "BUCKET_IDS", "VIRTUAL_KEY", "run_passes"]

log = logging.getLogger(__name__)

SCRATCH_DIR = ".vemscale-scratch"
BUCKET_IDS = 1 << 18  # object ids per table part: what one reduce task holds (~100 B per partial row)
# an object too large to split joins its parts through the node VIRTUAL_KEY + id: above every voxel key, so
# the union-find's root (the smallest key) is still the object's first voxel
VIRTUAL_KEY = np.uint64(1 << 63)


def _kv(url: str) -> ts.KvStore:
    return ts.KvStore.open(url if url.endswith("/") else url + "/").result()


# --- passes: pure functions of a box --------------------------------------------------------------------------


def label_task(box: Box, source: ClassSource, prov_spec: dict[str, Any], connectivity: int, run: str) -> bytes:
    classes = source.read(box)
    labels, keys, counts, cls = label_block(classes, [s.start for s in box], source.shape, connectivity)
    open_spec(prov_spec, write=True, run=run)[box].write(labels).result()
    return idmaps.encode_components(keys, counts, cls)


def faces_task(box: Box, source: ClassSource, prov_spec: dict[str, Any], connectivity: int, run: str) -> bytes:
    ctx = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(box, source.shape))
    core = tuple(slice(s.start - c.start, s.stop - c.start) for s, c in zip(box, ctx))
    labels = open_spec(prov_spec, run=run)[ctx].read().result()
    pairs = face_pairs(labels, source.read(ctx), core, connectivity)
    return pairs.astype(np.uint64).tobytes()


def _neighbour_ids(grid: BlockGrid, index: int) -> list[int]:
    """The block and its high-side neighbours (+z, +y, +x and their combinations) that exist."""
    gz, gy, gx = grid.grid_shape
    z, y, x = grid.coords(index)
    out = []
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                if z + dz < gz and y + dy < gy and x + dx < gx:
                    out.append(((z + dz) * gy + (y + dy)) * gx + (x + dx))
    return out


def _read_maps(kv: ts.KvStore, blocks: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    futures = [kv.read(f"{b:015d}") for b in blocks]
    keys, ids, cls = [], [], []
    for f in futures:
        res = f.result()
        if res.state == "value":
            k, i, c = idmaps.decode_map(bytes(res.value))
            keys.append(k), ids.append(i), cls.append(c)
    if not keys:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.uint8)
    k, i, c = np.concatenate(keys), np.concatenate(ids).view(np.uint64), np.concatenate(cls)
    order = np.argsort(k, kind="stable")
    return k[order], i[order], c[order]


def relabel_task(box: Box, grid: dict[str, Any], prov_spec: dict[str, Any], seg_spec: dict[str, Any],
                 maps_url: str, partials_url: str, voxel_size_xyz: list[float], run: str) -> None:
    g = BlockGrid.from_dict(grid)
    shape = g.volume_shape
    coords = [(s.start - r0) // b for s, (r0, _), b in zip(box, g.roi, g.block_shape)]
    index = (coords[0] * g.grid_shape[1] + coords[1]) * g.grid_shape[2] + coords[2]
    ext = tuple(slice(s.start, min(n, s.stop + 1)) for s, n in zip(box, shape))
    keys, ids, cls = _read_maps(_kv(maps_url), _neighbour_ids(g, index))
    prov = open_spec(prov_spec, run=run)[ext].read().result()
    final = np.zeros(prov.shape, np.uint64)
    fg = prov != 0
    if fg.any():
        pos = np.searchsorted(keys, prov[fg])
        if len(keys) == 0 or pos.max() >= len(keys) or not np.array_equal(keys[pos], prov[fg]):
            raise RuntimeError(f"block {index}: provisional labels without an id map (rerun to recompute)")
        final[fg] = ids[pos]
    core_shape = tuple(s.stop - s.start for s in box)
    core = final[: core_shape[0], : core_shape[1], : core_shape[2]]
    open_spec(seg_spec, write=True, run=run)[box].write(core).result()
    classes = dict(zip(ids.tolist(), cls.astype(np.int64).tolist()))  # class index 1..C
    part = block_partials(final, core_shape, [s.start for s in box], shape, voxel_size_xyz, index, classes)
    if len(part["id"]) == 0:
        return None
    import pyarrow as pa

    table = partials_to_table(part)
    buckets = (np.asarray(part["id"], np.int64) - 1) // BUCKET_IDS
    kv = _kv(partials_url)
    futures = []
    for b in np.unique(buckets):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table.filter(pa.array(buckets == b)))
        futures.append(kv.write(f"{int(b):06d}/{index:015d}", sink.getvalue().to_pybytes()))
    for f in futures:
        f.result()
    return None


def _read_partials(kv: ts.KvStore, bucket: int) -> Any:
    import pyarrow as pa

    prefix = f"{bucket:06d}/"
    names = kv.list(ts.KvStore.KeyRange(inclusive_min=prefix, exclusive_max=f"{bucket:06d}0")).result()
    futures = [kv.read(bytes(n).decode()) for n in names]
    tables = [pa.ipc.open_file(pa.BufferReader(bytes(f.result().value))).read_all() for f in futures]
    return pa.concat_tables(tables) if tables else None


def merge_bucket(table: Any, voxel_size_xyz: list[float]) -> dict[str, np.ndarray]:
    """All partial rows of a bucket of ids -> merged raw sums per object (vectorised; one qhull per object)."""
    from scipy.spatial import ConvexHull

    df = table.drop_columns(["corners"]).to_pandas()
    df["row"] = np.arange(len(df))
    df = df.drop_duplicates(subset=["id", "block"])  # a block recomputed after a kill wrote its partials again
    df = df.sort_values(["id", "block"], kind="stable")
    g = df.groupby("id", sort=True)
    agg = g.agg(voxels=("voxels", "sum"), surface=("surface", "sum"), cls=("class", "max"),
                lo_z=("lo_z", "min"), lo_y=("lo_y", "min"), lo_x=("lo_x", "min"),
                hi_z=("hi_z", "max"), hi_y=("hi_y", "max"), hi_x=("hi_x", "max"),
                sum_z=("sum_z", "sum"), sum_y=("sum_y", "sum"), sum_x=("sum_x", "sum"))
    blocks = df[df["voxels"] > 0].groupby("id").size().reindex(agg.index, fill_value=0)
    corners = table.column("corners")
    scale = np.asarray(voxel_size_xyz[::-1], np.float64)
    hull = np.empty(len(agg))
    rows_of = g["row"].apply(list)
    for j, rows in enumerate(rows_of.to_numpy()):
        pts = np.concatenate([np.asarray(corners[r].values, np.int64).reshape(-1, 3) for r in rows])
        try:
            hull[j] = ConvexHull(pts * scale).volume
        except Exception:  # fewer than 4 points / flat: cannot happen for voxel cubes
            hull[j] = np.nan
    return {"id": agg.index.to_numpy(np.uint64), "class": agg["cls"].to_numpy(np.int64),
            "voxels": agg["voxels"].to_numpy(np.int64), "surface": agg["surface"].to_numpy(np.float64),
            "blocks": blocks.to_numpy(np.int64), "hull_nm3": hull,
            **{k: agg[k].to_numpy() for k in ("lo_z", "lo_y", "lo_x", "hi_z", "hi_y", "hi_x", "sum_z", "sum_y", "sum_x")}}


def table_batch(batch: dict[str, Any], partials_url: str, table_url: str, voxel_size_xyz: list[float],
                volume_shape: list[int], class_names: list[str]) -> dict[str, Any]:
    """Reduce buckets of ids: merged rows -> one Parquet part per bucket; payload: per-class counts and ranges."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kv_in, kv_out = _kv(partials_url), _kv(table_url)
    out = []
    for bucket in np.asarray(batch["id"], np.int64):
        table = _read_partials(kv_in, int(bucket))
        stats: dict[str, Any] = {}
        if table is not None and table.num_rows:
            rows = finish_rows(merge_bucket(table, voxel_size_xyz), voxel_size_xyz, volume_shape, class_names)
            arrow = pa.table({c: rows[c] for c in TABLE_COLUMNS})
            sink = pa.BufferOutputStream()
            pq.write_table(arrow, sink, compression="zstd")
            kv_out.write(f"part-{int(bucket):06d}.parquet", sink.getvalue().to_pybytes()).result()
            for name in class_names:
                sel = rows["class"] == name
                if sel.any():
                    vol = rows["volume_nm3"][sel]
                    stats[name] = {"objects": int(sel.sum()), "min_nm3": float(vol.min()), "max_nm3": float(vol.max())}
        out.append(json.dumps(stats).encode())
    return {"id": np.asarray(batch["id"], np.int64), "payload": out}


# --- the driver ---------------------------------------------------------------------------------------------


def _write_maps(ledger_a: Ledger, grid: BlockGrid, crossing: idmaps.Crossing, min_voxels: int,
                maps_url: str) -> dict[str, Any]:
    """Run the id assignment slab by slab and write each block's map; returns objects per class."""
    kv = _kv(maps_url)
    pending: list[Any] = []
    objects, per_class = 0, np.zeros(256, np.int64)
    blocks_per_slab = grid.grid_shape[1] * grid.grid_shape[2]

    def ordered() -> Iterator[tuple[int, bytes]]:
        last = -1
        for i, p in ledger_a.payloads(grid.num_blocks):
            if i > last:
                last = i
                yield i, p

    for block, data in idmaps.assign_ids(ordered(), blocks_per_slab, crossing, min_voxels):
        keys, ids, cls = idmaps.decode_map(data)
        ids = ids.view(np.uint64)
        if len(ids):
            top = int(ids.max())
            if top > objects:
                objects = top
            own = (ids > 0)
            # each object counted once: where this block holds its root (its smallest key)
            hit, root = crossing.lookup(keys)
            first = own & (root == keys)
            np.add.at(per_class, cls[first].astype(np.int64) - 1, 1)  # classes are 1..C
        pending.append(kv.write(f"{block:015d}", data))
        if len(pending) >= 256:
            for f in pending:
                f.result()
            pending = []
    for f in pending:
        f.result()
    return {"objects": objects, "per_class": per_class}


def _plots(table_url: str, buckets: int, ranges: dict[str, dict[str, Any]], plot_url: str) -> None:
    """Histograms of volume (log) and sphericity per class, read one table part at a time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    names = [n for n in ranges if ranges[n]["objects"]]
    if not names:
        return
    edges = {n: np.linspace(math.log10(max(ranges[n]["min_nm3"], 1e-9)), math.log10(max(ranges[n]["max_nm3"], 1e-9)) + 1e-9, 41)
             for n in names}
    sph_edges = np.linspace(0, 1.5, 31)
    vol_h = {n: np.zeros(40, np.int64) for n in names}
    sph_h = {n: np.zeros(30, np.int64) for n in names}
    kv = _kv(table_url)
    for b in range(buckets):
        res = kv.read(f"part-{b:06d}.parquet").result()
        if res.state != "value":
            continue
        t = pq.read_table(io.BytesIO(bytes(res.value)), columns=["class", "volume_nm3", "sphericity"]).to_pandas()
        for n in names:
            sel = t[t["class"] == n]
            vol_h[n] += np.histogram(np.log10(sel["volume_nm3"].clip(lower=1e-9)), edges[n])[0]
            sph_h[n] += np.histogram(sel["sphericity"].dropna().clip(upper=1.5), sph_edges)[0]
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.2 * len(names)), squeeze=False)
    for row, n in zip(axes, names):
        e = edges[n]
        row[0].bar(10 ** ((e[:-1] + e[1:]) / 2) / 1e9, vol_h[n], width=np.diff(10 ** e) / 1e9, align="center")
        row[0].set_xscale("log")
        row[0].set_xlabel("volume (um^3)")
        row[0].set_ylabel("objects")
        row[0].set_title(f"{n}: {ranges[n]['objects']} objects")
        row[1].bar((sph_edges[:-1] + sph_edges[1:]) / 2, sph_h[n], width=np.diff(sph_edges))
        row[1].set_xlabel("sphericity")
        row[1].set_title(f"{n}: shape")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    _kv(plot_url).write("objects.png", buf.getvalue()).result()


def _bbox_part(table_url: str, bucket: int, run: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, bounding boxes z0,y0,x0,z1,y1,x1) of one table part, cached per worker within a run."""
    key = (table_url, bucket, run)
    hit = _BBOX_CACHE.get(key)
    if hit is None:
        import pyarrow.parquet as pq

        cols = ["id", "bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1"]
        res = _kv(table_url).read(f"part-{bucket:06d}.parquet").result()
        if res.state != "value":
            raise RuntimeError(f"objects table part {bucket} is missing under {table_url} (rerun to recompute)")
        t = pq.read_table(io.BytesIO(bytes(res.value)), columns=cols)
        ids = t.column("id").to_numpy().astype(np.uint64)
        boxes = np.stack([t.column(c).to_numpy().astype(np.int64) for c in cols[1:]], axis=1)
        if len(_BBOX_CACHE) >= 4:
            _BBOX_CACHE.pop(next(iter(_BBOX_CACHE)))
        _BBOX_CACHE[key] = hit = (ids, boxes)
    return hit


_BBOX_CACHE: dict[tuple[str, int, str], tuple[np.ndarray, np.ndarray]] = {}


def _bboxes(table_url: str, ids: np.ndarray, run: str) -> np.ndarray:
    out = np.zeros((len(ids), 6), np.int64)
    buckets = (ids.astype(np.int64) - 1) // BUCKET_IDS
    for b in np.unique(buckets):
        part_ids, boxes = _bbox_part(table_url, int(b), run)
        sel = buckets == b
        pos = np.searchsorted(part_ids, ids[sel])
        if pos.max() >= len(part_ids) or not np.array_equal(part_ids[pos], ids[sel]):
            raise RuntimeError(f"objects {ids[sel]} have no row in table part {int(b)} (rerun to recompute)")
        out[sel] = boxes[pos]
    return out


def _object_pieces(o: int, crop: tuple[slice, ...], seg_ctx: np.ndarray, ctx: tuple[slice, ...],
                   cc_seg_spec: dict[str, Any], cache: ts.KvStore, voxel_zyx: list[float], params: WatershedParams,
                   run: str) -> np.ndarray:
    """Pieces of object `o` over `crop` (its bounding box + 1 voxel): from the block's read when it holds the
    whole crop; else from the scratch cache or computed from the object's own read and cached (every block
    that computes it writes the same bytes)."""
    import zlib

    shape = tuple(c.stop - c.start for c in crop)
    if all(c.start >= x.start and c.stop <= x.stop for c, x in zip(crop, ctx)):
        local = tuple(slice(c.start - x.start, c.stop - x.start) for c, x in zip(crop, ctx))
        return split_object(seg_ctx[local] == o, voxel_zyx, params)
    name = f"{o:020d}"
    res = cache.read(name).result()
    if res.state == "value":
        return np.frombuffer(zlib.decompress(bytes(res.value)), np.uint32).reshape(shape)
    seg = open_spec(cc_seg_spec, run=run)[crop].read().result()
    pieces = split_object(seg == o, voxel_zyx, params)
    cache.write(name, zlib.compress(np.ascontiguousarray(pieces).tobytes(), 1)).result()
    return pieces


def encode_split(keys: np.ndarray, counts: np.ndarray, cls: np.ndarray, pairs: np.ndarray, split: int) -> bytes:
    return idmaps.encode_components(keys, counts, cls) + np.asarray([len(pairs), split], np.int64).tobytes() \
        + np.ascontiguousarray(pairs, np.uint64).tobytes()


def decode_split(data: bytes) -> tuple[np.ndarray, int]:
    """(pairs (n, 2), objects split whose first voxel is in the block) of a split payload."""
    n = int(np.frombuffer(data[:8], np.int64)[0])
    at = 8 + 17 * n
    n_pairs, split = (int(v) for v in np.frombuffer(data[at: at + 16], np.int64))
    pairs = np.frombuffer(data[at + 16: at + 16 + 16 * n_pairs], np.uint64).reshape(-1, 2)
    return pairs, split


def split_task(box: Box, source: ClassSource, cc_seg_spec: dict[str, Any], cc_table_url: str,
               pieces_spec: dict[str, Any], cache_url: str, params: dict[str, Any], voxel_size_xyz: list[float],
               max_object_voxels: int, run: str) -> bytes:
    """The block's part of every object it holds, split into pieces (keys = the pieces' first voxels)."""
    import cc3d
    import fastremap

    shape = source.shape
    ctx = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(box, shape))
    inner = tuple(slice(s.start - c.start, s.stop - c.start) for s, c in zip(box, ctx))
    seg_ctx = open_spec(cc_seg_spec, run=run)[ctx].read().result()
    core = np.ascontiguousarray(seg_ctx[inner])
    ids = fastremap.unique(core)
    ids = ids[ids != 0].astype(np.uint64)
    out = np.zeros(core.shape, np.uint64)
    wp = WatershedParams(**params)
    voxel_zyx = [float(v) for v in voxel_size_xyz[::-1]]
    cache = _kv(cache_url)
    n_split = 0
    origin = np.asarray([s.start for s in box], np.int64)
    for o, bb in zip(ids.tolist(), _bboxes(cc_table_url, ids, run) if len(ids) else []):
        lo, hi = bb[:3], bb[3:]
        crop = tuple(slice(max(0, int(a) - 1), min(n, int(b) + 1)) for a, b, n in zip(lo, hi, shape))
        part = tuple(slice(max(c.start, s.start), min(c.stop, s.stop)) for c, s in zip(crop, box))
        in_core = tuple(slice(p.start - s.start, p.stop - s.start) for p, s in zip(part, box))
        sel = core[in_core] == o
        if math.prod(c.stop - c.start for c in crop) > max_object_voxels:
            out[in_core][sel] = VIRTUAL_KEY + np.uint64(o)  # counted by the driver (its pairs' nodes)
            continue
        pieces = _object_pieces(o, crop, seg_ctx, ctx, cc_seg_spec, cache, voxel_zyx, wp, run)
        flat = pieces.ravel()
        nz = np.flatnonzero(flat)
        _, first = np.unique(flat[nz], return_index=True)  # pieces 1..k in order
        pz, py, px = np.unravel_index(nz[first], pieces.shape)
        gz, gy, gx = pz + crop[0].start, py + crop[1].start, px + crop[2].start
        gkey = ((gz * shape[1] + gy) * shape[2] + gx) + 1
        # counted once: by the block that holds the object's first voxel (its first piece's)
        n_split += len(gkey) > 1 and all(s.start <= int(v[0]) < s.stop for s, v in zip(box, (gz, gy, gx)))
        lut = np.concatenate([[0], gkey]).astype(np.uint64)
        in_crop = tuple(slice(p.start - c.start, p.stop - c.start) for p, c in zip(part, crop))
        out[in_core][sel] = lut[pieces[in_crop][sel]]
    local = cc3d.connected_components(out, connectivity=wp.connectivity)  # parts of pieces within the block
    classes = source.read(box)
    labels, keys, counts, cls = keys_of(local, classes, origin, shape)
    if len(keys):
        g = keys.astype(np.int64) - 1
        z, rem = np.divmod(g, shape[1] * shape[2])
        y, x = np.divmod(rem, shape[2])
        piece = out[z - origin[0], y - origin[1], x - origin[2]]
        join = piece != keys
        pairs = np.stack([keys[join], piece[join]], axis=1)
    else:
        pairs = np.zeros((0, 2), np.uint64)
    open_spec(pieces_spec, write=True, run=run)[box].write(labels).result()
    return encode_split(keys, counts, cls, pairs, n_split)


def _finish(out_kv: str, tag: str, source: ClassSource, grid: BlockGrid, comps: Ledger, pairs: Iterator[np.ndarray],
            after: list[str], prov_spec: dict[str, Any], seg_spec: dict[str, Any], table_url: str,
            plot_url: str | None, voxel_size_xyz: list[float], min_voxels: int, run: str, common: dict[str, Any],
            timings: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
    """ids (driver), relabel and table over the components in `comps` joined by `pairs`; `tag` names the
    ledgers ('' for the output, 'cc_' for the objects a split starts from)."""
    scratch = join_url(out_kv, SCRATCH_DIR)
    relabel_describe = {"step": f"{tag}relabel", "after": after, "min_voxels": min_voxels, "seg": seg_spec,
                        "voxel_size": voxel_size_xyz, **extra}
    relabel_ledger = Ledger.open(ledger_url(out_kv, f"{tag}relabel"), {**relabel_describe, "grid": grid.to_dict()})
    # maps and partial rows belong to one relabel generation: an older run's never mix in
    maps_url = join_url(scratch, "maps", relabel_ledger.generation)
    partials_url = join_url(scratch, "partials", relabel_ledger.generation)
    ids_key = f"{tag}ids.json"
    ids_kv = _kv(ledger_url(out_kv))
    saved = ids_kv.read(ids_key).result()
    saved_ids = json.loads(bytes(saved.value)) if saved.state == "value" else None
    t0 = time.perf_counter()
    if saved_ids is None or saved_ids.get("relabel") != relabel_ledger.generation:
        crossing = idmaps.resolve_pairs(pairs)
        for _, p in comps.payloads(grid.num_blocks):
            keys, counts, _ = idmaps.decode_components(p)
            crossing.add_counts(keys, counts)
        assigned = _write_maps(comps, grid, crossing, min_voxels, maps_url)
        saved_ids = {"relabel": relabel_ledger.generation, "objects": int(assigned["objects"]),
                     "per_class": {name: int(assigned["per_class"][j]) for j, name in enumerate(source.classes)},
                     "crossing_components": int(len(crossing.keys))}
        ids_kv.write(ids_key, json.dumps(saved_ids).encode()).result()
    timings[f"{tag}ids_s"] = time.perf_counter() - t0
    objects = int(saved_ids["objects"])

    t0 = time.perf_counter()
    _, sum_c = run_step(out_kv, f"{tag}relabel", relabel_describe, grid, relabel_task,
                        {"grid": grid.to_dict(), "prov_spec": prov_spec, "seg_spec": seg_spec, "maps_url": maps_url,
                         "partials_url": partials_url, "voxel_size_xyz": voxel_size_xyz, "run": run},
                        bytes_per_voxel=24.0, **common)
    timings[f"{tag}relabel_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    buckets = max(1, -(-objects // BUCKET_IDS))
    table_ledger = Ledger.open(ledger_url(out_kv, f"{tag}table"), {"step": f"{tag}table",
                                                                    "after": relabel_ledger.generation,
                                                                    "buckets": buckets, "bucket_ids": BUCKET_IDS})
    stage = Stage(f"{tag}table", table_batch, {"partials_url": partials_url, "table_url": table_url,
                                               "voxel_size_xyz": voxel_size_xyz,
                                               "volume_shape": list(grid.volume_shape),
                                               "class_names": source.classes},
                  num_cpus=1, concurrency=common["max_in_flight"])
    if table_ledger.count_done(buckets) == 0:  # a new table: no part of an older one may stay
        _kv(table_url).delete_range(ts.KvStore.KeyRange()).result()
    sum_d = run_blocks(f"instances {tag}table", buckets, table_ledger, [stage], batch_ids=1,
                       progress=common["progress"])
    ranges: dict[str, dict[str, Any]] = {}
    for _, p in table_ledger.payloads(buckets):
        for name, st in json.loads(p or b"{}").items():
            r = ranges.setdefault(name, {"objects": 0, "min_nm3": math.inf, "max_nm3": 0.0})
            r["objects"] += st["objects"]
            r["min_nm3"] = min(r["min_nm3"], st["min_nm3"])
            r["max_nm3"] = max(r["max_nm3"], st["max_nm3"])
    timings[f"{tag}table_s"] = time.perf_counter() - t0
    if plot_url is not None:
        t0 = time.perf_counter()
        _plots(table_url, buckets, ranges, plot_url)
        timings["plots_s"] = time.perf_counter() - t0
    for url in (maps_url, partials_url):  # the table is complete: this generation's maps and partials are spent
        _kv(url).delete_range(ts.KvStore.KeyRange()).result()
    return {"objects": objects, "per_class": saved_ids["per_class"], "table_parts": buckets,
            "crossing_components": saved_ids.get("crossing_components"), "generation": table_ledger.generation,
            "blocks": {f"{tag}relabel": sum_c, f"{tag}table": sum_d}}


def run_passes(source: ClassSource, output: str, grid: BlockGrid, prov_spec: dict[str, Any], seg_spec: dict[str, Any],
               voxel_size_xyz: list[float], connectivity: int, min_voxels: int, max_in_flight: int | None,
               blocks_per_batch: int | None, progress: bool, split: dict[str, Any] | None = None) -> dict[str, Any]:
    """All passes; every one resumes through its ledger. Returns counts and timings.

    `split` (watershed): {"params": WatershedParams fields, "max_object_voxels", "cc_seg_spec", "pieces_spec"}."""
    run = uuid.uuid4().hex
    out_kv = kvstore_url(parse_url(output))
    scratch = join_url(out_kv, SCRATCH_DIR)
    table_url, plot_url = join_url(out_kv, "objects"), join_url(out_kv, "plots")
    timings: dict[str, float] = {}
    common = {"max_in_flight": max_in_flight, "blocks_per_batch": blocks_per_batch, "progress": progress}
    base = {"version": 1, "source": volume_identity(source.volume), "kind": source.kind, "channels": source.channels,
            "threshold": source.threshold, "connectivity": connectivity}

    t0 = time.perf_counter()
    ledger_a, sum_a = run_step(out_kv, "label", {**base, "step": "label", "prov": prov_spec}, grid, label_task,
                               {"source": source, "prov_spec": prov_spec, "connectivity": connectivity, "run": run},
                               bytes_per_voxel=10.0, **common)
    timings["label_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ledger_b, sum_b = run_step(out_kv, "faces", {"step": "faces", "after": ledger_a.generation}, grid, faces_task,
                               {"source": source, "prov_spec": prov_spec, "connectivity": connectivity, "run": run},
                               bytes_per_voxel=10.0, **common)
    timings["faces_s"] = time.perf_counter() - t0
    blocks = {"label": sum_a, "faces": sum_b}

    def face_pairs_of(ledger: Ledger) -> Iterator[np.ndarray]:
        return (np.frombuffer(p, np.uint64).reshape(-1, 2) for _, p in ledger.payloads(grid.num_blocks) if p)

    after = [ledger_a.generation, ledger_b.generation]
    split_summary: dict[str, Any] | None = None
    if split is None:
        done = _finish(out_kv, "", source, grid, ledger_a, face_pairs_of(ledger_b), after, prov_spec, seg_spec,
                       table_url, plot_url, voxel_size_xyz, min_voxels, run, common, timings, {})
    else:
        cc_table_url = join_url(scratch, "cc", "objects")
        cc = _finish(out_kv, "cc_", source, grid, ledger_a, face_pairs_of(ledger_b), after, prov_spec,
                     split["cc_seg_spec"], cc_table_url, None, voxel_size_xyz, 0, run, common, timings, {})
        blocks.update(cc.pop("blocks"))
        describe = {"step": "split", "after": cc["generation"], "params": split["params"],
                    "max_object_voxels": split["max_object_voxels"], "pieces": split["pieces_spec"]}
        split_ledger = Ledger.open(ledger_url(out_kv, "split"), {**describe, "grid": grid.to_dict()})
        cache_url = join_url(scratch, "split_cache", split_ledger.generation)
        t0 = time.perf_counter()
        split_ledger, sum_s = run_step(out_kv, "split", describe, grid, split_task,
                                       {"source": source, "cc_seg_spec": split["cc_seg_spec"],
                                        "cc_table_url": cc_table_url, "pieces_spec": split["pieces_spec"],
                                        "cache_url": cache_url, "params": split["params"],
                                        "voxel_size_xyz": voxel_size_xyz,
                                        "max_object_voxels": split["max_object_voxels"], "run": run},
                                       bytes_per_voxel=40.0, **common)
        timings["split_s"] = time.perf_counter() - t0
        blocks["split"] = sum_s
        n_split, large = 0, np.zeros(0, np.uint64)
        for _, p in split_ledger.payloads(grid.num_blocks):
            pairs_b, s = decode_split(p)
            n_split += s
            large = np.union1d(large, pairs_b[pairs_b[:, 1] >= VIRTUAL_KEY, 1])  # the unsplit objects' nodes
        n_large = len(large)
        split_summary = {"objects_before": cc["objects"], "objects_split": n_split, "objects_too_large": n_large}
        if n_large:
            log.warning("split: %d objects have a bounding box over max_object_voxels=%d and were not split",
                        n_large, split["max_object_voxels"])
        pairs = (decode_split(p)[0] for _, p in split_ledger.payloads(grid.num_blocks))
        done = _finish(out_kv, "", source, grid, split_ledger, pairs, [split_ledger.generation],
                       split["pieces_spec"], seg_spec, table_url, plot_url, voxel_size_xyz, min_voxels, run, common,
                       timings, {"split": split["params"]})
        _kv(join_url(scratch, "split_cache")).delete_range(ts.KvStore.KeyRange()).result()  # every generation's
    blocks.update(done.pop("blocks"))
    done.pop("generation")
    return {**done, "split": split_summary,
            "blocks": {name: {k: s[k] for k in ("blocks", "computed", "skipped")} for name, s in blocks.items()},
            "timings": {k: round(v, 3) for k, v in timings.items()}, "scratch": scratch}
