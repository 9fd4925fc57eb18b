"""Instance metrics: predicted objects matched to true objects by IoU, computed blockwise.

Each block returns the overlaps (pred id, truth id, voxels) and the voxels of every id it holds; the driver adds
them up (memory: one entry per overlapping pair and per object, never per voxel). From the totals:

- matches at IoU threshold t: pairs with IoU >= t, one-to-one (above 0.5 a pair is unique by construction;
  ties at exactly 0.5 keep the first pair in (IoU, ids) order);
- precision = TP / predicted objects, recall = TP / true objects, F1 = 2 TP / (predicted + true), at 0.5 and 0.75;
- average precision over t = 0.50, 0.55, ..., 0.95 of TP / (TP + FP + FN) (the Data Science Bowl 2018 / StarDist
  "AP" for objects without confidence scores);
- panoptic quality PQ = (sum of matched IoUs) / (TP + FP/2 + FN/2) at t = 0.5 (= SQ x RQ);
- split true objects: holding the majority (>= 50 %) of the voxels of two or more predicted objects;
  merged predicted objects: holding the majority of two or more true objects.
Ids are any non-zero integers; 0 is background in both volumes.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from vemscale.blocks.grid import BlockGrid
from vemscale.errors import UserError
from vemscale.io.volume import Volume, open_volume

__all__ = ["evaluate_instances", "match_scores", "block_overlaps", "format_instances"]

THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def block_overlaps(pred: np.ndarray, truth: np.ndarray) -> bytes:
    """Overlaps and sizes of one block, encoded: [n_pairs, n_pred, n_truth] then the arrays."""
    import fastremap

    p = np.ascontiguousarray(pred).astype(np.uint64, copy=False).ravel()
    t = np.ascontiguousarray(truth).astype(np.uint64, copy=False).ravel()
    pu, pc = fastremap.unique(p, return_counts=True)
    tu, tc = fastremap.unique(t, return_counts=True)
    both = (p != 0) & (t != 0)
    pairs = np.zeros((0, 2), np.uint64)
    counts = np.zeros(0, np.int64)
    if both.any():
        pi = np.searchsorted(pu, p[both]).astype(np.int64)
        ti = np.searchsorted(tu, t[both]).astype(np.int64)
        code, n = np.unique(pi * len(tu) + ti, return_counts=True)
        pairs = np.stack([pu[code // len(tu)], tu[code % len(tu)]], axis=1)
        counts = n.astype(np.int64)
    keep_p, keep_t = pu != 0, tu != 0
    parts = [np.asarray([len(counts), int(keep_p.sum()), int(keep_t.sum())], np.int64), pairs.ravel().view(np.int64),
             counts, pu[keep_p].view(np.int64), pc[keep_p].astype(np.int64), tu[keep_t].view(np.int64),
             tc[keep_t].astype(np.int64)]
    return np.concatenate(parts).tobytes()


def _decode(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    a = np.frombuffer(data, np.int64)
    n, npred, ntrue = (int(v) for v in a[:3])
    o = 3
    pairs = a[o: o + 2 * n].view(np.uint64).reshape(-1, 2); o += 2 * n
    counts = a[o: o + n]; o += n
    pu = a[o: o + npred].view(np.uint64); o += npred
    pc = a[o: o + npred]; o += npred
    tu = a[o: o + ntrue].view(np.uint64); o += ntrue
    tc = a[o: o + ntrue]
    return pairs, counts, pu, pc, tu, tc


def match_scores(pairs: np.ndarray, overlap: np.ndarray, pred_ids: np.ndarray, pred_size: np.ndarray,
                 true_ids: np.ndarray, true_size: np.ndarray) -> dict[str, Any]:
    """All metrics (module doc) from summed overlaps and sizes (ids unique, sizes aligned)."""
    n_pred, n_true = len(pred_ids), len(true_ids)
    sp = pred_size[np.searchsorted(pred_ids, pairs[:, 0])] if len(pairs) else np.zeros(0, np.int64)
    st = true_size[np.searchsorted(true_ids, pairs[:, 1])] if len(pairs) else np.zeros(0, np.int64)
    iou = overlap / np.maximum(sp + st - overlap, 1)

    def matched(t: float) -> np.ndarray:
        cand = np.flatnonzero(iou >= t - 1e-12)
        cand = cand[np.lexsort((pairs[cand, 1], pairs[cand, 0], -iou[cand]))]
        _, first_p = np.unique(pairs[cand, 0], return_index=True)
        keep = np.zeros(len(cand), bool)
        keep[first_p] = True
        _, first_t = np.unique(pairs[cand, 1], return_index=True)
        keep_t = np.zeros(len(cand), bool)
        keep_t[first_t] = True
        return cand[keep & keep_t]

    def at(t: float) -> dict[str, Any]:
        m = matched(t)
        tp = len(m)
        fp, fn = n_pred - tp, n_true - tp
        return {"tp": tp, "fp": fp, "fn": fn, "precision": tp / n_pred if n_pred else float(n_true == 0),
                "recall": tp / n_true if n_true else float(n_pred == 0),
                "f1": 2 * tp / (n_pred + n_true) if n_pred + n_true else 1.0,
                "ap": tp / (tp + fp + fn) if tp + fp + fn else 1.0, "iou_sum": float(iou[m].sum())}

    per_t = {t: at(t) for t in THRESHOLDS}
    m50 = per_t[0.5]
    denom = m50["tp"] + 0.5 * m50["fp"] + 0.5 * m50["fn"]
    major_p = overlap >= 0.5 * sp  # the truth object holds most of this predicted object
    major_t = overlap >= 0.5 * st
    split = np.unique(pairs[major_p, 1], return_counts=True)[1] if major_p.any() else np.zeros(0)
    merged = np.unique(pairs[major_t, 0], return_counts=True)[1] if major_t.any() else np.zeros(0)
    return {
        "objects_pred": n_pred, "objects_truth": n_true,
        **{f"{k}@0.5": m50[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")},
        **{f"{k}@0.75": per_t[0.75][k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")},
        "ap_50_95": float(np.mean([per_t[t]["ap"] for t in THRESHOLDS])),
        "ap_per_threshold": {f"{t:.2f}": per_t[t]["ap"] for t in THRESHOLDS},
        "pq": m50["iou_sum"] / denom if denom else 1.0,
        "sq": m50["iou_sum"] / m50["tp"] if m50["tp"] else 0.0,
        "rq": m50["f1"],
        "split_truth_objects": int((split >= 2).sum()), "merged_pred_objects": int((merged >= 2).sum()),
    }


def _overlaps_batch(batch: dict[str, Any], pred: Volume, truth: Volume, grid: BlockGrid) -> dict[str, Any]:
    ids = np.asarray(batch["id"], np.int64)
    out = []
    for i in ids:
        box = grid.box(int(i))
        out.append(block_overlaps(pred.read(box), truth.read(box)))
    return {"id": ids, "payload": out}


def _check_ids(vol: Volume, what: str) -> None:
    if vol.ndim != 3 or vol.dtype.kind not in "biu":
        raise UserError(f"{what} {vol.url!r} is {vol.dtype} with shape {vol.shape}; --instances needs z,y,x integer "
                        "object ids (e.g. the segmentation of vemscale instances)")


def evaluate_instances(pred: str | Volume, truth: str | Volume, *, z_range: Any = None,
                       block_shape: Sequence[int] = (32, 512, 512), run_dir: Any = None) -> dict[str, Any]:
    """Instance metrics of `pred` against `truth` (both z,y,x object ids) over the region, blockwise."""
    import pandas as pd

    from vemscale.blocks.ledger import LEDGER_DIR, Ledger, volume_identity
    from vemscale.blocks.runner import Stage, run_blocks
    from vemscale.eval.evaluate import _executor, parse_z_range

    t0 = time.monotonic()
    pv, tv = open_volume(pred), open_volume(truth)
    _check_ids(pv, "prediction")
    _check_ids(tv, "truth")
    if tuple(pv.shape) != tuple(tv.shape):
        raise UserError(f"prediction {pv.url!r} has shape {pv.shape} but truth {tv.url!r} has shape {tv.shape}")
    zr = parse_z_range(z_range, tv.shape[0])
    region = ((zr or (0, tv.shape[0])), (0, tv.shape[1]), (0, tv.shape[2]))
    blocks = tuple(min(int(b), hi - lo) for b, (lo, hi) in zip(block_shape, region))
    grid = BlockGrid.create(tv.shape, None, blocks, region)
    n = grid.num_blocks
    ledger = None
    if run_dir is not None:
        from pathlib import Path

        url = "file://" + str(Path(run_dir).resolve() / LEDGER_DIR / "evaluate_instances") + "/"
        ledger = Ledger.open(url, {"version": 1, "pred": volume_identity(pv), "truth": volume_identity(tv),
                                   "grid": grid.to_dict()})
    parts: list[bytes] = []
    run = run_blocks("evaluate instances", n, ledger, [Stage("overlaps", _overlaps_batch,
                                                              {"pred": pv, "truth": tv, "grid": grid})],
                     batch_ids=max(1, min(16, -(-n // 8))), executor=_executor(n), progress=False,
                     keep_payload=ledger is None,
                     on_batch=None if ledger is not None else (lambda b: parts.extend(bytes(p) for p in b["payload"])))
    if ledger is not None:
        parts = [p for _, p in ledger.payloads(n)]
    frames_pairs, frames_p, frames_t = [], [], []
    for data in parts:
        pairs, counts, pu, pc, tu, tc = _decode(data)
        frames_pairs.append(pd.DataFrame({"p": pairs[:, 0], "t": pairs[:, 1], "n": counts}))
        frames_p.append(pd.DataFrame({"id": pu, "n": pc}))
        frames_t.append(pd.DataFrame({"id": tu, "n": tc}))
    ov = pd.concat(frames_pairs).groupby(["p", "t"], sort=True)["n"].sum().reset_index() if frames_pairs else None
    sp = pd.concat(frames_p).groupby("id", sort=True)["n"].sum() if frames_p else pd.Series(dtype=np.int64)
    st = pd.concat(frames_t).groupby("id", sort=True)["n"].sum() if frames_t else pd.Series(dtype=np.int64)
    pairs = ov[["p", "t"]].to_numpy(np.uint64) if ov is not None else np.zeros((0, 2), np.uint64)
    overlap = ov["n"].to_numpy(np.int64) if ov is not None else np.zeros(0, np.int64)
    scores = match_scores(pairs, overlap, sp.index.to_numpy(np.uint64), sp.to_numpy(np.int64),
                          st.index.to_numpy(np.uint64), st.to_numpy(np.int64))
    return {**scores, "pred": pv.url, "truth": tv.url, "z_range": list(zr) if zr else None,
            "shape": [hi - lo for lo, hi in region], "block_shape": list(blocks), "blocks": n,
            "computed": run["computed"], "skipped": run["skipped"], "seconds": round(time.monotonic() - t0, 3)}


def format_instances(r: dict[str, Any]) -> str:
    lines = [f"{'IoU':<6}{'precision':>10}{'recall':>8}{'F1':>8}{'TP':>8}{'FP':>8}{'FN':>8}"]
    for t in ("0.5", "0.75"):
        lines.append(f"{t:<6}{r[f'precision@{t}']:>10.4f}{r[f'recall@{t}']:>8.4f}{r[f'f1@{t}']:>8.4f}"
                     f"{r[f'tp@{t}']:>8}{r[f'fp@{t}']:>8}{r[f'fn@{t}']:>8}")
    lines.append(f"AP 0.50:0.95 {r['ap_50_95']:.4f}   PQ {r['pq']:.4f} (SQ {r['sq']:.4f} x RQ {r['rq']:.4f})   "
                 f"split truth objects {r['split_truth_objects']}   merged predicted objects {r['merged_pred_objects']}")
    lines.append(f"{r['pred']} ({r['objects_pred']} objects) vs {r['truth']} ({r['objects_truth']} objects), "
                 f"{r['blocks']} blocks")
    return "\n".join(lines)
