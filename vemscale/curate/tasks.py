"""The curation passes, each a function of one task id run by the block runner (Ray tasks, a ledger per pass).

    sample    task -> its slices' drawn patches: 8-bit, resampled, statistics, filters, dHash, optional
              classifier; passing patches -> `patches/<source>/<plane>_<slice>/<y>_<x>.png`; every drawn
              patch -> a row of `.vemscale-scratch/sample/<task>.parquet`; a few dropped ones -> report examples
    within    source -> greedy near-duplicate groups among its passing patches -> the duplicates, per task
    across    (one task) the same over every source's survivors
    finalize  task -> manifest rows (kept, reason, duplicate_of) -> `manifest/part-<task>.parquet`; duplicates'
              PNGs deleted; payload: counts per reason
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
from typing import Any

import numpy as np
import tensorstore as ts

from vemscale.curate import patches as P
from vemscale.curate.dedupe import exemplars
from vemscale.curate.plan import locate

log = logging.getLogger(__name__)

SCRATCH_DIR = ".vemscale-scratch"
EXAMPLES_PER_REASON = 2  # dropped patches a sampled task keeps for the report's mosaics
EXAMPLE_TASKS = 32  # about this many tasks per source keep examples
COLUMNS = ("task", "source", "plane", "slice", "file", "y", "x", "h", "w", "pixel_nm", "std", "pooled_std",
           "entropy", "laplacian_var", "saturated", "dhash", "classifier_p", "reason", "path")


@functools.lru_cache(maxsize=64)
def _kv(url: str) -> ts.KvStore:
    return ts.KvStore.open(url if url.endswith("/") else url + "/").result()


def png_bytes(x: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def read_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"))


def _parquet_bytes(columns: Any) -> bytes:
    """A pyarrow table (or a dict of columns) as Parquet bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(columns if isinstance(columns, pa.Table) else pa.table(columns), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_parquet(kv: ts.KvStore, key: str, columns: list[str] | None = None) -> Any:
    """A Parquet object of a kvstore as a pyarrow table (None when missing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    res = kv.read(key).result()
    if res.state != "value":
        return None
    return pq.read_table(pa.BufferReader(bytes(res.value)), columns=columns)


# --- sample ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _volume(url: str, scale: Any, voxel: tuple[float, ...] | None, run: str) -> Any:
    from vemscale.io.volume import open_volume

    return open_volume(url, scale=scale, voxel_size_xyz=voxel)


@functools.lru_cache(maxsize=8)
def _file_list(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


@functools.lru_cache(maxsize=2)
def _classifier(path: str) -> Any:
    from vemscale.curate.classifier import load_classifier

    return load_classifier(path)


def _read_rows(src: dict[str, Any], pl: dict[str, Any], k: int, run: str) -> Any:
    """A reader of (row0, row1, col0, col1) of slice k of a volume plane, as a 2D array."""
    vol = _volume(src["url"], src["scale"], tuple(src["voxel_size"]) if src["voxel_size"] else None, run)

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        box = P.plane_box(pl["plane"], k, y0, y1, x0, x1)
        if src["ndim"] == 2:
            box = box[1:]
        lead = (slice(0, 1),) if src["ndim"] == 4 else ()
        return np.asarray(vol.read(lead + box)).reshape(y1 - y0, x1 - x0)

    return read


def _image_of(src: dict[str, Any], index: int) -> tuple[str, np.ndarray]:
    from vemscale.train.data import dtype_scale
    from vemscale.train.unlabeled import read_image_file

    rel = bytes(_file_list(src["list"])[index]).decode()
    img = read_image_file(os.path.join(src["url"], rel))
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        img = img[..., 0]  # CEM500K patchify2d.py keeps the first channel of RGB images
    elif img.ndim != 2:
        raise ValueError(f"{rel}: shape {img.shape} is not a 2D grey or RGB image (give a stack as a volume source)")
    return rel, P.to_uint8(img, dtype_scale(img.dtype))


def sample_batch(batch: dict[str, Any], plans: list[dict[str, Any]], patch: int, filters: dict[str, float],
                 classifier: str | None, classifier_threshold: float, seed: int, out_url: str, run: str) -> dict[str, Any]:
    ids = np.asarray(batch["id"], np.int64)
    return {"id": ids, "payload": [sample_task(int(t), plans, patch, P.Filters(**filters), classifier,
                                               classifier_threshold, seed, out_url, run) for t in ids]}


def _schema() -> Any:
    """The sample parts' columns, typed (a task that draws nothing still writes a readable, typed part)."""
    import pyarrow as pa

    types = {"task": pa.int64(), "source": pa.string(), "plane": pa.string(), "slice": pa.int64(),
             "file": pa.string(), "y": pa.int64(), "x": pa.int64(), "h": pa.int64(), "w": pa.int64(),
             "pixel_nm": pa.float64(), "std": pa.float64(), "pooled_std": pa.float64(), "entropy": pa.float64(),
             "laplacian_var": pa.float64(), "saturated": pa.float64(), "dhash": pa.int64(),
             "classifier_p": pa.float64(), "reason": pa.string(), "path": pa.string()}
    return pa.schema([(c, types[c]) for c in COLUMNS])


def sample_task(task: int, plans: list[dict[str, Any]], patch: int, filters: P.Filters, classifier: str | None,
                classifier_threshold: float, seed: int, out_url: str, run: str) -> bytes:
    """Cut, measure, filter and store the drawn patches of one task, one row of patches at a time (memory: one
    row of patches, whatever the section's size)."""
    import pyarrow as pa

    src, j, pl, k0, k1 = locate(plans, task)
    kv = _kv(out_url)
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    win = pl["window"]
    futures: list[Any] = []
    counts: dict[str, int] = {}
    examples: dict[str, int] = {}
    example_task = (task - src["task0"]) % max(1, src["tasks"] // EXAMPLE_TASKS) == 0

    def add(k: int, rel: str, y: int, x: int, h: int, w: int, st: P.PatchStats | None, hsh: int, why: str) -> int:
        for c, v in (("task", task), ("source", src["name"]), ("plane", pl["plane"]), ("slice", k), ("file", rel),
                     ("y", y), ("x", x), ("h", h), ("w", w),
                     ("pixel_nm", float(pl["pixel_nm"][0]) if pl["pixel_nm"] else np.nan),
                     ("std", st.std if st else np.nan), ("pooled_std", st.pooled_std if st else np.nan),
                     ("entropy", st.entropy if st else np.nan), ("laplacian_var", st.laplacian_var if st else np.nan),
                     ("saturated", st.saturated if st else np.nan), ("dhash", hsh), ("classifier_p", np.nan),
                     ("reason", why), ("path", "")):
            rows[c].append(v)
        return len(rows["task"]) - 1

    def store(row: list[tuple[int, np.ndarray]]) -> None:
        """The classifier (if any) over one row's passing patches, then their PNGs and the report examples."""
        if classifier is not None:
            todo = [(i, img) for i, img in row if rows["reason"][i] == ""]
            if todo:
                probs = _classifier(classifier)(np.stack([img for _, img in todo]))
                for (i, _), pr in zip(todo, probs):
                    rows["classifier_p"][i] = float(pr)
                    if pr <= classifier_threshold:  # CEM500K classify_patches.py keeps patches scored > 0.5
                        rows["reason"][i] = "classifier"
        for i, img in row:
            why = rows["reason"][i]
            if why == "":
                where = (f"{pl['plane']}_{rows['slice'][i]:06d}" if src["kind"] == "volume"
                         else f"img_{rows['slice'][i]:08d}")
                rows["path"][i] = f"{src['name']}/{where}/{rows['y'][i]}_{rows['x'][i]}.png"
                futures.append(kv.write(f"patches/{rows['path'][i]}", png_bytes(img)))
            elif example_task and examples.get(why, 0) < EXAMPLES_PER_REASON:
                examples[why] = examples.get(why, 0) + 1
                futures.append(kv.write(f"report/examples/{why}/{task:09d}_{i}.png", png_bytes(img)))
        while len(futures) > 64:  # bound what is in flight
            futures.pop(0).result()

    for k in range(k0, k1):
        if src["kind"] == "volume":
            r0, r1 = pl["rows"]
            c0, c1 = pl["cols"]
            ys, xs = P.patch_starts(r1 - r0, win[0]) + r0, P.patch_starts(c1 - c0, win[1]) + c0
            read, rel = _read_rows(src, pl, k, run), ""
        else:
            try:
                rel, img = _image_of(src, k)
            except Exception as err:  # noqa: BLE001 - one unreadable image among many is counted, not fatal
                add(k, bytes(_file_list(src["list"])[k]).decode(), 0, 0, 0, 0, None, 0, "unreadable")
                log.warning("curate: %s", err)
                continue
            ys, xs = P.patch_starts(img.shape[0], win[0]), P.patch_starts(img.shape[1], win[1])
            read = (lambda im: lambda y0, y1, x0, x1: im[y0:y1, x0:x1])(img)
        take = P.drawn(seed, src["index"], j, k, len(ys) * len(xs), pl["p"]).reshape(len(ys), len(xs))
        for a, y in enumerate(ys):
            if not take[a].any():
                continue
            cols = xs[take[a]]
            band = read(int(y), int(y) + win[0], int(cols[0]), int(cols[-1]) + win[1])  # one read per row of patches
            row: list[tuple[int, np.ndarray]] = []
            for x in cols:
                raw = band[:, int(x - cols[0]) : int(x - cols[0]) + win[1]]
                if src["kind"] == "volume":
                    raw = P.to_uint8(raw, src["dtype_scale"])
                h, w = raw.shape
                small = h < win[0] or w < win[1]
                x8 = P.resample(raw, (min(patch, h * patch // win[0]), min(patch, w * patch // win[1])))
                st = P.patch_stats(x8)
                i = add(k, rel, int(y), int(x), h, w, st, int(np.uint64(P.dhash(x8)).view(np.int64)),
                        "small" if small else P.reason(st, filters))
                row.append((i, x8))
            store(row)
    for why in rows["reason"]:
        counts[why or "passed"] = counts.get(why or "passed", 0) + 1
    table = pa.table({c: rows[c] for c in COLUMNS}, schema=_schema())
    futures.append(kv.write(f"{SCRATCH_DIR}/sample/{task:09d}.parquet", _parquet_bytes(table)))
    for f in futures:
        f.result()
    return json.dumps(counts).encode()


# --- near-duplicates ------------------------------------------------------------------------------------------


def _passing(kv: ts.KvStore, tasks: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(task, path, hash) of every patch of `tasks` that passed the filters."""
    t, p, h = [], [], []
    for task in tasks:
        table = read_parquet(kv, f"{SCRATCH_DIR}/sample/{task:09d}.parquet", ["reason", "path", "dhash"])
        if table is None:
            raise RuntimeError(f"sample part of task {task} is missing though its ledger says done (files removed by "
                               "hand?); rerun with overwrite=true")
        keep = np.asarray(table.column("reason").to_pylist()) == ""
        paths = np.asarray(table.column("path").to_pylist(), dtype=object)[keep]
        t.append(np.full(len(paths), task, np.int64))
        p.append(paths)
        h.append(table.column("dhash").to_numpy()[keep])
    if not t:
        return np.zeros(0, np.int64), np.zeros(0, object), np.zeros(0, np.int64)
    return np.concatenate(t), np.concatenate(p), np.concatenate(h)


def _write_duplicates(kv: ts.KvStore, step: str, task: np.ndarray, path: np.ndarray, owner: np.ndarray) -> int:
    """Duplicates (path, exemplar path) per task -> `.vemscale-scratch/<step>/<task>.parquet`; returns how many."""
    dup = owner != np.arange(len(owner))
    futures = []
    for t in np.unique(task):
        sel = dup & (task == t)
        futures.append(kv.write(f"{SCRATCH_DIR}/{step}/{int(t):09d}.parquet",
                                _parquet_bytes({"path": list(path[sel]), "duplicate_of": list(path[owner[sel]])})))
    for f in futures:
        f.result()
    return int(dup.sum())


def within_batch(batch: dict[str, Any], plans: list[dict[str, Any]], max_distance: int, seed: int,
                 out_url: str, dedupe: bool) -> dict[str, Any]:
    """Per source: its duplicates (none when dedupe is off), and its survivors for the pass across sources."""
    kv = _kv(out_url)
    ids = np.asarray(batch["id"], np.int64)
    payloads = []
    for s in ids:
        src = plans[int(s)]
        task, path, h = _passing(kv, range(src["task0"], src["task0"] + src["tasks"]))
        owner = exemplars(h, max_distance, seed + int(s)) if dedupe else np.arange(len(h))
        n = _write_duplicates(kv, "within", task, path, owner)
        keep = owner == np.arange(len(owner))
        kv.write(f"{SCRATCH_DIR}/survivors/{int(s):05d}.parquet",
                 _parquet_bytes({"task": task[keep], "path": list(path[keep]), "dhash": h[keep]})).result()
        payloads.append(json.dumps({"duplicates": n}).encode())
    return {"id": ids, "payload": payloads}


def across_batch(batch: dict[str, Any], sources: int, max_distance: int, seed: int, out_url: str) -> dict[str, Any]:
    """One task: near-duplicates among the survivors of every source."""
    kv = _kv(out_url)
    t, p, h = [], [], []
    for s in range(sources):
        table = read_parquet(kv, f"{SCRATCH_DIR}/survivors/{s:05d}.parquet")
        if table is None:
            raise RuntimeError(f"survivors of source {s} are missing (files removed by hand?); rerun with overwrite=true")
        t.append(table.column("task").to_numpy())
        p.append(np.asarray(table.column("path").to_pylist(), dtype=object))
        h.append(table.column("dhash").to_numpy())
    task, path, hashes = np.concatenate(t), np.concatenate(p), np.concatenate(h)
    owner = exemplars(hashes, max_distance, seed + 7919)
    n = _write_duplicates(kv, "across", task, path, owner)
    dropped = owner != np.arange(len(owner))  # so within-duplicates of a dropped exemplar name the patch kept
    kv.write(f"{SCRATCH_DIR}/across_map.parquet",
             _parquet_bytes({"path": list(path[dropped]), "duplicate_of": list(path[owner[dropped]])})).result()
    return {"id": np.asarray(batch["id"], np.int64), "payload": [json.dumps({"duplicates": n}).encode()]}


# --- finalize -------------------------------------------------------------------------------------------------


def finalize_batch(batch: dict[str, Any], plans: list[dict[str, Any]], out_url: str, run: str) -> dict[str, Any]:
    ids = np.asarray(batch["id"], np.int64)
    return {"id": ids, "payload": [finalize_task(int(t), plans, out_url, run) for t in ids]}


@functools.lru_cache(maxsize=2)
def _across_map(out_url: str, run: str) -> dict[str, str]:
    """Exemplars dropped across sources -> the patch kept for them (empty without an across pass)."""
    table = read_parquet(_kv(out_url), f"{SCRATCH_DIR}/across_map.parquet")
    if table is None:
        return {}
    return dict(zip(table.column("path").to_pylist(), table.column("duplicate_of").to_pylist()))


def finalize_task(task: int, plans: list[dict[str, Any]], out_url: str, run: str = "") -> bytes:
    import pyarrow as pa

    src = locate(plans, task)[0]
    kv = _kv(out_url)
    table = read_parquet(kv, f"{SCRATCH_DIR}/sample/{task:09d}.parquet")
    if table is None:
        raise RuntimeError(f"sample part of task {task} is missing though its ledger says done (files removed by "
                           "hand?); rerun with overwrite=true")
    final = _across_map(out_url, run)
    reason = np.asarray(table.column("reason").to_pylist(), dtype=object)
    path = np.asarray(table.column("path").to_pylist(), dtype=object)
    dup_of = np.full(len(path), "", dtype=object)
    for step in ("within", "across"):
        dups = read_parquet(kv, f"{SCRATCH_DIR}/{step}/{task:09d}.parquet")
        if dups is not None and dups.num_rows:
            where = {p: final.get(d, d) for p, d in zip(dups.column("path").to_pylist(),
                                                         dups.column("duplicate_of").to_pylist())}
            for i, pth in enumerate(path):
                if pth in where and reason[i] == "":
                    reason[i], dup_of[i] = "duplicate", where[pth]
    dropped = [i for i in range(len(path)) if reason[i] == "duplicate"]
    example = (task - src["task0"]) % max(1, src["tasks"] // EXAMPLE_TASKS) == 0
    for n, i in enumerate(dropped):
        key = f"patches/{path[i]}"
        if example and n < EXAMPLES_PER_REASON:  # the pair, side by side, for the report
            a, b = kv.read(key).result(), kv.read(f"patches/{dup_of[i]}").result()
            if a.state == "value" and b.state == "value":
                x, y = read_png(bytes(a.value)), read_png(bytes(b.value))
                if x.shape == y.shape:
                    pair = np.concatenate([x, np.zeros((x.shape[0], 4), np.uint8), y], axis=1)
                    kv.write(f"report/examples/duplicate/{task:09d}_{n}.png", png_bytes(pair)).result()
        kv.delete_range(ts.KvStore.KeyRange(key, key + "\0")).result()
    kept = reason == ""
    path = np.where(kept, path, "")
    out = table.drop_columns(["reason", "path"])
    out = out.append_column("kept", pa.array(kept.astype(bool)))
    out = out.append_column("reason", pa.array(list(reason), pa.string()))
    out = out.append_column("path", pa.array(["patches/" + p if p else "" for p in path], pa.string()))
    out = out.append_column("duplicate_of", pa.array(["patches/" + d if d else "" for d in dup_of], pa.string()))
    kv.write(f"manifest/part-{task:09d}.parquet", _parquet_bytes(out)).result()
    counts: dict[str, int] = {}
    for r in reason:
        counts[r or "kept"] = counts.get(r or "kept", 0) + 1
    return json.dumps({"source": src["name"], "counts": counts}).encode()
