"""One row per trial: arm, seed, sampled values, status, best and final metric, iterations, seconds, attempts.

Tune gives each trial's config, status and error; the trial's own fine-tuning run (run_dir/trials/<trial>)
gives the metric history (metrics.csv, every evaluation, also across resumes) and its attempts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vemscale.config import build_config
from vemscale.train.finetune import FinetuneConfig
from vemscale.train.metrics_log import read_metrics, write_metrics
from vemscale.tune.config import SweepConfig, compose, trial_name
from vemscale.tune.trainable import read_attempts

# with a target (select=..., target=...), a trial's selection.json adds the target IoU of three checkpoints
TARGET_KEYS = ("target_iou_last", "target_iou_selected", "target_iou_oracle")


def target_columns(run_dir: Path) -> dict[str, Any]:
    """The last, the selected and the best (oracle) checkpoint's target IoU; None without target labels."""
    from vemscale.train.select import read_record

    rec = read_record(run_dir)
    return {"target_iou_last": rec.get("last_target_iou"), "target_iou_selected": rec.get("chosen_target_iou"),
            "target_iou_oracle": rec.get("oracle_target_iou"), "selected_iteration": rec.get("chosen_iteration")}

# Tune's statuses -> ours: DONE (ran every iteration), STOPPED (the scheduler stopped it early), ERROR (it
# raised; the error column says why), UNFINISHED (never started or interrupted; `--resume` continues it)
STATUS_ORDER = ["DONE", "STOPPED", "ERROR", "UNFINISHED"]


def history(rows: list[dict], metric: str) -> list[tuple[int, float]]:
    """(iteration, metric) at every metrics.csv row that carries the metric."""
    return [(int(float(r["iteration"])), float(r[metric])) for r in rows if r.get(metric) not in (None, "")]


def _seconds(run_dir: Path, attempts: list[dict]) -> float:
    """Wall time of all attempts; an attempt killed without an end record counts until metrics.csv last changed."""
    total, start = 0.0, None
    for e in attempts:
        if e.get("event") == "start":
            if start is not None:
                total += max(0.0, _last_write(run_dir, start) - start)
            start = e["time"]
        elif e.get("event") == "end" and start is not None:
            total += e["time"] - start
            start = None
    if start is not None:
        total += max(0.0, _last_write(run_dir, start) - start)
    return total


def _last_write(run_dir: Path, since: float) -> float:
    try:
        return max(since, os.path.getmtime(run_dir / "metrics.csv"))
    except OSError:
        return since


def _error_line(error: Any) -> str:
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    # Tune wraps the trainable's exception: its last line is the cause
    return (lines[-1] if lines else type(error).__name__)[:300]


def collect(grid, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for every trial of a finished (or interrupted) `Tuner.fit()`."""
    sweep = SweepConfig.model_validate(state["sweep"])
    metric, better = sweep.metric, (max if sweep.mode == "max" else min)
    trials = grid._experiment_analysis.trials  # the Trial objects behind the results, same order
    rows = []
    for trial, result in zip(trials, grid):
        cfg = trial.config
        arm, seed, params = cfg["arm"], cfg["seed"], cfg.get("params") or {}
        name = trial_name(arm, seed, trial.trial_id)
        run_dir = Path(state["run_dir"]) / "trials" / name
        target = build_config(FinetuneConfig, compose(state, arm, seed, params, run_dir)).train.iterations
        logged = read_metrics(run_dir / "metrics.csv")
        hist = history(logged, metric)
        iterations = int(float(logged[-1]["iteration"])) if logged else 0
        attempts = read_attempts(run_dir)
        if trial.status == "ERROR":
            status = "ERROR"
        elif trial.status == "TERMINATED":
            status = "DONE" if iterations >= target else "STOPPED"
        else:
            status = "UNFINISHED"
        rows.append({
            "trial": name,
            "arm": arm,
            "seed": seed,
            **{k: params.get(k) for k in sweep.search_space},
            "status": status,
            f"best_{metric}": better(v for _, v in hist) if hist else None,
            f"final_{metric}": hist[-1][1] if hist else None,
            "iterations": iterations,
            "target_iterations": target,
            "seconds": round(_seconds(run_dir, attempts), 1),
            "attempts": sum(1 for e in attempts if e.get("event") == "start"),
            "error": _error_line(result.error) if status == "ERROR" else "",
            **target_columns(run_dir),
            "run_dir": str(run_dir),
            "_history": hist,
        })
    arms = list(sweep.arms)
    rows.sort(key=lambda r: (arms.index(r["arm"]), r["seed"], r["trial"]))
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """A table of rows (columns from the first row, `_private` keys left out; None as an empty cell)."""
    cols = [c for c in (rows[0] if rows else {}) if not c.startswith("_")]
    write_metrics(path, [{c: "" if r.get(c) is None else r[c] for c in cols} for r in rows], cols)


def read_trials(sweep_dir: Path) -> list[dict[str, Any]]:
    """A written sweep's finished (DONE) trials from its trials.csv, each with `run_dir` resolved: the recorded
    path, or the trial's directory beside trials.csv when the sweep was copied elsewhere."""
    import csv

    from vemscale.errors import UserError

    path = Path(sweep_dir) / "trials.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"arm", "seed", "status", "run_dir"} - set(reader.fieldnames or ())
        if missing:
            raise UserError(f"{path} lacks the column(s) {', '.join(sorted(missing))}: not a vemscale sweep's trials.csv")
        rows = [r for r in reader if r["status"] == "DONE"]
    for r in rows:
        d = Path(r["run_dir"])
        r["run_dir"] = d if d.is_dir() else Path(sweep_dir) / "trials" / d.name
    return rows
