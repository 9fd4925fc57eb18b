"""The instance stage's passes over the block grid, each a pure function of one box run by the block runner.

    label    class image of the core -> components keyed by their first voxel -> scratch `provisional`;
             payload: keys, voxel counts, classes
    faces    provisional labels of the core +/- 1 voxel -> pairs of keys joined across the faces; payload: pairs
    ids      (driver) union-find over the pairs, sizes, ranks -> a map key -> final id per block (scratch `maps/`)
    relabel  provisional core + 1 voxel on the high sides through the maps of the block and its high neighbours
             -> `segmentation` (uint64) and the objects' partial rows (scratch `partials/<bucket>/<block>`)
    table    per bucket of ids: merge the partial rows -> `objects/part-<bucket>.parquet`

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
from vemscale.post.instances import face_pairs, label_block
from vemscale.post.objects import TABLE_COLUMNS, block_partials, finish_rows, partials_to_table

__all__ = ["SCRATCH_DIR", "BUCKET_IDS", "run_passes"]

log = logging.getLogger(__name__)

SCRATCH_DIR = ".vemscale-scratch"
BUCKET_IDS = 1 << 18  # object ids per table part: what one reduce task holds (~100 B per partial row)


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


def run_passes(source: ClassSource, output: str, grid: BlockGrid, prov_spec: dict[str, Any], seg_spec: dict[str, Any],
               voxel_size_xyz: list[float], connectivity: int, min_voxels: int, max_in_flight: int | None,
               blocks_per_batch: int | None, progress: bool) -> dict[str, Any]:
    """All passes; every one resumes through its ledger. Returns counts and timings."""
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

    relabel_describe = {"step": "relabel", "after": [ledger_a.generation, ledger_b.generation], "min_voxels": min_voxels,
                        "seg": seg_spec, "voxel_size": voxel_size_xyz}
    relabel_ledger = Ledger.open(ledger_url(out_kv, "relabel"), {**relabel_describe, "grid": grid.to_dict()})
    # maps and partial rows belong to one relabel generation: an older run's never mix in
    maps_url = join_url(scratch, "maps", relabel_ledger.generation)
    partials_url = join_url(scratch, "partials", relabel_ledger.generation)
    ids_key = "ids.json"
    ids_kv = _kv(ledger_url(out_kv))
    saved = ids_kv.read(ids_key).result()
    saved_ids = json.loads(bytes(saved.value)) if saved.state == "value" else None
    t0 = time.perf_counter()
    if saved_ids is None or saved_ids.get("relabel") != relabel_ledger.generation:
        crossing = idmaps.resolve_pairs(np.frombuffer(p, np.uint64).reshape(-1, 2)
                                        for _, p in ledger_b.payloads(grid.num_blocks) if p)
        for _, p in ledger_a.payloads(grid.num_blocks):
            keys, counts, _ = idmaps.decode_components(p)
            crossing.add_counts(keys, counts)
        assigned = _write_maps(ledger_a, grid, crossing, min_voxels, maps_url)
        saved_ids = {"relabel": relabel_ledger.generation, "objects": int(assigned["objects"]),
                     "per_class": {name: int(assigned["per_class"][j]) for j, name in enumerate(source.classes)},
                     "crossing_components": int(len(crossing.keys))}
        ids_kv.write(ids_key, json.dumps(saved_ids).encode()).result()
    timings["ids_s"] = time.perf_counter() - t0
    objects = int(saved_ids["objects"])

    t0 = time.perf_counter()
    _, sum_c = run_step(out_kv, "relabel", relabel_describe, grid, relabel_task,
                        {"grid": grid.to_dict(), "prov_spec": prov_spec, "seg_spec": seg_spec, "maps_url": maps_url,
                         "partials_url": partials_url, "voxel_size_xyz": voxel_size_xyz, "run": run},
                        bytes_per_voxel=24.0, **common)
    timings["relabel_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    buckets = max(1, -(-objects // BUCKET_IDS))
    table_ledger = Ledger.open(ledger_url(out_kv, "table"), {"step": "table", "after": relabel_ledger.generation,
                                                              "buckets": buckets, "bucket_ids": BUCKET_IDS})
    stage = Stage("table", table_batch, {"partials_url": partials_url, "table_url": table_url,
                                         "voxel_size_xyz": voxel_size_xyz, "volume_shape": list(grid.volume_shape),
                                         "class_names": source.classes}, num_cpus=1, concurrency=max_in_flight)
    if table_ledger.count_done(buckets) == 0:  # a new table: no part of an older one may stay
        _kv(table_url).delete_range(ts.KvStore.KeyRange()).result()
    sum_d = run_blocks("instances table", buckets, table_ledger, [stage], batch_ids=1, progress=progress)
    ranges: dict[str, dict[str, Any]] = {}
    for _, p in table_ledger.payloads(buckets):
        for name, st in json.loads(p or b"{}").items():
            r = ranges.setdefault(name, {"objects": 0, "min_nm3": math.inf, "max_nm3": 0.0})
            r["objects"] += st["objects"]
            r["min_nm3"] = min(r["min_nm3"], st["min_nm3"])
            r["max_nm3"] = max(r["max_nm3"], st["max_nm3"])
    timings["table_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _plots(table_url, buckets, ranges, plot_url)
    timings["plots_s"] = time.perf_counter() - t0
    for url in (maps_url, partials_url):  # the table is complete: this generation's maps and partials are spent
        _kv(url).delete_range(ts.KvStore.KeyRange()).result()
    return {"objects": objects, "per_class": saved_ids["per_class"], "table_parts": buckets,
            "crossing_components": saved_ids.get("crossing_components"),
            "blocks": {name: {k: s[k] for k in ("blocks", "computed", "skipped")}
                       for name, s in (("label", sum_a), ("faces", sum_b), ("relabel", sum_c), ("table", sum_d))},
            "timings": {k: round(v, 3) for k, v in timings.items()}, "scratch": scratch}
