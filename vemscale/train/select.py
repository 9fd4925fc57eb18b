"""Choosing a fine-tuning checkpoint without target labels (`select=morphology`): the checkpoint whose objects,
predicted on the unlabeled target volume, have the source labels' shape statistics.

From Franco-Barranco et al. 2022 (reference code danifranco/EM_domain_adaptation, Attention_Y-Net `CustomSaver`):
the prior is the mean solidity of the objects of the source labels, measured slice by slice
(`vemscale.post.shape2d`); every validation interval the model predicts a contiguous run of target slices,
thresholds the class probability at 0.5, measures the same, and the checkpoint with the smallest
|target statistic - prior| is kept (`area_ratio`: the mean object area over the slice area instead). Where target labels exist,
they are scored for evaluation only (the oracle and the last checkpoint beside the chosen one); they never choose.

The worker computes the statistics (`target_metrics`); the driver keeps the chosen checkpoint in
`run_dir/selected` and the record of every interval in `run_dir/selection.json` (`selection_keeper`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from vemscale.config import Strict
from vemscale.errors import UserError
from vemscale.post.shape2d import MIN_SIZE, ShapeStats, shape_stats

SELECTED_DIR = "selected"
RECORD_FILE = "selection.json"
METHODS = ("last", "morphology", "area_ratio")


class TargetVolume(Strict):
    """The unlabeled target volume sampled at each validation interval; `labels` only score, never choose."""

    image: str
    slices: str | None = None  # "z0:z1"; all slices when omitted
    max_slices: int = Field(8, gt=0)  # the central run of this many slices of that range is predicted per interval
    match_histogram: bool = False  # predict it matched to the training images' histogram (as infer would)
    labels: str | None = None


class SelectionConfig(Strict):
    class_name: str | None = None  # the class whose objects are measured; default: the first non-background class
    threshold: float = Field(0.5, gt=0, lt=1)  # EM_domain_adaptation binarises predictions at 0.5
    min_size: int = Field(MIN_SIZE, ge=0)  # objects of <= min_size pixels are ignored
    # stack: the reference's objects (3D components of the stack, 26-connected, measured in each slice);
    # slice: each slice's own 8-connected components
    objects: Literal["stack", "slice"] = "stack"
    prior: float | None = None  # the source statistic; measured on data.train labels when omitted


def coerce_target(v: Any) -> Any:
    """`target=<volume>` on the command line is the image alone."""
    return {"image": v} if isinstance(v, str) else v


def statistic(stats: ShapeStats, method: str) -> float:
    return stats.mean_solidity if method == "morphology" else stats.mean_area_ratio


def class_index(classes: list[str], name: str | None) -> int:
    if name is None:
        return 1
    if name not in classes[1:]:
        raise UserError(f"selection.class_name {name!r} is not one of the foreground classes {classes[1:]}")
    return classes.index(name)


def source_prior(stacks, cls: int, method: str, min_size: int, objects: str = "stack") -> float:
    """The statistic of the source training labels (class `cls`), slice by slice over every labelled stack."""
    total = ShapeStats()
    for st in stacks:
        total = total + shape_stats(st.labels == cls, min_size, objects)
    if method == "morphology" and total.objects == 0:
        raise UserError(f"the training labels hold no objects of class {cls} larger than {min_size} pixels: "
                        "no morphology prior can be measured; set selection.prior or select=area_ratio")
    return statistic(total, method)


def sample_slices(n: int, max_slices: int) -> np.ndarray:
    """The central run of `max_slices` indexes of range(n) (all of them when there are fewer): contiguous, so
    objects can be followed from slice to slice as in the source labels."""
    if n <= max_slices:
        return np.arange(n)
    start = (n - max_slices) // 2
    return np.arange(start, start + max_slices)


def load_target(t: dict, in_chans: int | None = None):
    """The sampled target slices (C, Z, Y, X) and, when given, their labels (Z, Y, X); errors name the fix."""
    from vemscale.io.volume import open_volume
    from vemscale.train.data import parse_range

    img = open_volume(t["image"])
    if img.ndim not in (3, 4):
        raise UserError(f"target {t['image']!r} has shape {tuple(img.shape)}; expected (z,y,x) or (c,z,y,x)")
    chans = img.shape[0] if img.ndim == 4 else 1
    if in_chans is not None and chans != in_chans:
        raise UserError(f"target {t['image']!r} has {chans} channel(s) but the training images have {in_chans}; "
                        "give a target volume of the same modality and channels")
    zs = parse_range(t.get("slices"), img.shape[-3], "target.slices")
    idx = zs.start + sample_slices(zs.stop - zs.start, int(t.get("max_slices", 8)))
    run = slice(int(idx[0]), int(idx[-1]) + 1)  # a contiguous run: one read
    image = np.asarray(img.read((slice(None), run))) if img.ndim == 4 else np.asarray(img.read((run,)))[None]
    labels = None
    if t.get("labels"):
        lab = open_volume(t["labels"])
        if tuple(lab.shape[-3:]) != tuple(img.shape[-3:]):
            raise UserError(f"target labels {t['labels']!r} have shape {tuple(lab.shape)} but the target image has "
                            f"{tuple(img.shape)}; they must cover the same voxels")
        labels = np.asarray(lab.read((run,)))
    return image, labels


def target_metrics(probs_of_class: np.ndarray, labels_of_class: np.ndarray | None, method: str, prior: float,
                   threshold: float, min_size: int, objects: str = "stack") -> dict[str, float]:
    """What one validation interval records: the target statistics, the distance to the prior and, with labels,
    the target IoU of the thresholded prediction."""
    pred = probs_of_class >= threshold
    stats = shape_stats(pred, min_size, objects)
    out = {
        "target_solidity": stats.mean_solidity,
        "target_area_ratio": stats.mean_area_ratio,
        "target_foreground_ratio": stats.foreground_ratio,
        "target_objects": float(stats.objects),
        "select_distance": abs(statistic(stats, method) - prior),
    }
    if labels_of_class is not None:
        inter = np.logical_and(pred, labels_of_class).sum()
        union = np.logical_or(pred, labels_of_class).sum()
        out["target_iou"] = float(inter / union) if union else 1.0
    return out


def read_record(run_dir: Path) -> dict:
    path = run_dir / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, data: dict) -> None:
    from vemscale.io.atomic import write_text

    write_text(path, json.dumps(data, indent=1))


def summarise(intervals: list[dict]) -> dict:
    """The chosen interval (smallest distance, the earliest on ties), the last and, with target labels, the oracle."""
    if not intervals:
        return {}
    chosen = min(intervals, key=lambda r: (r["select_distance"], r["iteration"]))
    out = {"chosen_iteration": chosen["iteration"], "chosen_distance": chosen["select_distance"],
           "last_iteration": intervals[-1]["iteration"]}
    if all("target_iou" in r for r in intervals):
        oracle = max(intervals, key=lambda r: (r["target_iou"], -r["iteration"]))
        out.update(chosen_target_iou=chosen["target_iou"], last_target_iou=intervals[-1]["target_iou"],
                   oracle_iteration=oracle["iteration"], oracle_target_iou=oracle["target_iou"])
    return out


def selection_keeper(run_dir: Path, method: str, prior: float, copy: bool = True):
    """A Ray Train callback (driver side): each interval's statistics appended to selection.json, and the checkpoint
    reported with the smallest distance so far copied to run_dir/selected (replaced in one rename; not with
    `copy=False`, when the statistics are only recorded). A resumed run
    drops the intervals after the checkpoint it restarts from, as metrics.csv does."""
    from ray.train import UserCallback

    keys = ("iteration", "select_distance", "target_solidity", "target_area_ratio", "target_foreground_ratio",
            "target_objects", "target_iou")

    class SelectionKeeper(UserCallback):
        def __init__(self) -> None:
            self.first = True

        def after_report(self, run_context, metrics, checkpoint) -> None:
            m = metrics[0]
            record = read_record(run_dir) or {"method": method, "prior": prior, "intervals": []}
            if self.first:
                self.first = False
                record["intervals"] = [r for r in record["intervals"] if r["iteration"] <= m["resumed_from"]]
            if "select_distance" not in m:
                return
            record["intervals"] = [r for r in record["intervals"] if r["iteration"] != m["iteration"]]
            before = summarise(record["intervals"]).get("chosen_distance", float("inf"))
            record["intervals"].append({k: m[k] for k in keys if k in m})
            if copy and checkpoint is not None and m["select_distance"] < before:
                from vemscale.checkpoint import export_final

                export_final(checkpoint, run_dir / SELECTED_DIR)
            record.update(method=method, prior=prior, **summarise(record["intervals"]))
            _write_json(run_dir / RECORD_FILE, record)

    return SelectionKeeper()


def check_method(v: str) -> str:
    if v not in METHODS:
        raise ValueError(f"select must be one of {', '.join(METHODS)}")
    return v


__all__ = ["TargetVolume", "SelectionConfig", "coerce_target", "source_prior", "load_target", "target_metrics",
           "selection_keeper", "summarise", "read_record", "SELECTED_DIR", "RECORD_FILE"]
