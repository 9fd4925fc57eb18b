"""`vemscale evaluate --instances` against a brute-force reference: per-object masks, an IoU matrix and an optimal
(Hungarian) one-to-one matching, whatever the block shape."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from conftest import ROOT
from vemscale.errors import UserError
from vemscale.eval.instances import THRESHOLDS, evaluate_instances


def _scenes():
    """Truth: blobs labelled by cc3d. Prediction: the same with every kind of error in it."""
    import cc3d
    from scipy import ndimage

    rng = np.random.default_rng(3)
    noise = ndimage.gaussian_filter(rng.random((16, 96, 96)), (1, 3, 3))
    truth = cc3d.connected_components(noise > np.quantile(noise, 0.8), connectivity=26).astype(np.uint32)
    pred = truth.copy()
    ids = np.arange(1, truth.max() + 1)
    rng.shuffle(ids)
    eroded, dropped, (split, m1, m2) = ids[:6], ids[6:9], ids[9:12]
    for i in eroded:  # shrink: IoU falls, some below 0.75 or 0.5
        pred[(truth == i) & ~ndimage.binary_erosion(truth == i, iterations=int(rng.integers(1, 3)))] = 0
    for i in dropped:  # missed objects
        pred[truth == i] = 0
    zz, yy, xx = np.nonzero(truth == split)  # one true object split in two
    half = (truth == split) & (np.arange(96)[None, None, :] > np.median(xx))
    pred[half] = truth.max() + 1
    pred[truth == m2] = m1  # two true objects merged into one
    pred[0:3, 0:6, 0:6] = truth.max() + 2  # a false object (on background or not: either way an error)
    pred = np.where(pred > 0, pred + 1000, 0).astype(np.uint32)  # other id values than the truth's
    return pred, truth


def brute_force(pred: np.ndarray, truth: np.ndarray) -> dict:
    from scipy.optimize import linear_sum_assignment

    p_ids = [int(i) for i in np.unique(pred) if i]
    t_ids = [int(i) for i in np.unique(truth) if i]
    iou = np.zeros((len(p_ids), len(t_ids)))
    inside_p = np.zeros_like(iou)
    inside_t = np.zeros_like(iou)
    for a, p in enumerate(p_ids):
        pm = pred == p
        for b, t in enumerate(t_ids):
            tm = truth == t
            inter = np.count_nonzero(pm & tm)
            iou[a, b] = inter / np.count_nonzero(pm | tm)
            inside_p[a, b] = inter / pm.sum()
            inside_t[a, b] = inter / tm.sum()
    out = {}
    for t in THRESHOLDS:
        rows, cols = linear_sum_assignment(-np.where(iou >= t, iou, 0))
        ok = iou[rows, cols] >= t
        tp = int(ok.sum())
        out[t] = {"tp": tp, "f1": 2 * tp / (len(p_ids) + len(t_ids)), "ap": tp / (len(p_ids) + len(t_ids) - tp),
                  "iou_sum": float(iou[rows, cols][ok].sum())}
    m = out[0.5]
    pq = m["iou_sum"] / (m["tp"] + 0.5 * (len(p_ids) - m["tp"]) + 0.5 * (len(t_ids) - m["tp"]))
    return {"f1@0.5": out[0.5]["f1"], "f1@0.75": out[0.75]["f1"], "tp@0.5": out[0.5]["tp"],
            "ap_50_95": float(np.mean([out[t]["ap"] for t in THRESHOLDS])), "pq": pq,
            "split_truth_objects": int(((inside_p >= 0.5).sum(axis=0) >= 2).sum()),
            "merged_pred_objects": int(((inside_t >= 0.5).sum(axis=1) >= 2).sum()),
            "objects_pred": len(p_ids), "objects_truth": len(t_ids)}


@pytest.mark.parametrize("block", [(16, 96, 96), (4, 40, 24)])
def test_instance_metrics_equal_a_brute_force_matching(tmp_path, ray_local, block):
    pred, truth = _scenes()
    tifffile.imwrite(tmp_path / "pred.tif", pred)
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    got = evaluate_instances(str(tmp_path / "pred.tif"), str(tmp_path / "truth.tif"), block_shape=block)
    ref = brute_force(pred, truth)
    assert ref["tp@0.5"] < ref["objects_truth"] and ref["split_truth_objects"] >= 1 and ref["merged_pred_objects"] >= 1
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < got["f1@0.75"] < got["f1@0.5"] < 1


def test_cli_and_bad_input(tmp_path):
    pred, truth = _scenes()
    tifffile.imwrite(tmp_path / "pred.tif", pred)
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    r = subprocess.run([sys.executable, "-m", "vemscale.cli", "evaluate", "--pred", str(tmp_path / "pred.tif"),
                        "--truth", str(tmp_path / "truth.tif"), "--instances", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "AP 0.50:0.95" in r.stdout and "PQ" in r.stdout
    assert json.loads(r.stdout.strip().splitlines()[-1])["f1@0.5"] == pytest.approx(brute_force(pred, truth)["f1@0.5"])
    tifffile.imwrite(tmp_path / "probs.tif", np.zeros((16, 96, 96), np.float32))
    with pytest.raises(UserError, match="integer"):
        evaluate_instances(str(tmp_path / "probs.tif"), str(tmp_path / "truth.tif"))
    tifffile.imwrite(tmp_path / "small.tif", truth[:8])
    with pytest.raises(UserError, match="shape"):
        evaluate_instances(str(tmp_path / "small.tif"), str(tmp_path / "truth.tif"))
