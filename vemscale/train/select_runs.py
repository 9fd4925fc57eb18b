"""`vemscale select`: the morphology rule across several fine-tuning runs (e.g. the seeds of a sweep arm).

Each run with `select=morphology` (or `area_ratio`) already keeps, in `run_dir/selected`, its checkpoint whose
predicted target objects are closest to the source labels' shape statistic (`vemscale.train.select`). Seeds of the
same recipe differ on a new microscope by more than their checkpoints within a run do, so the same rule, applied
to the runs' chosen checkpoints together, picks one without target labels: the smallest |target statistic - prior|.
It compares like with like only: the runs must share the method, the prior (the same source labels), the
selection settings and the target sample, or it fails before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from vemscale.errors import UserError
from vemscale.train import select as sel

log = logging.getLogger(__name__)


def run_dirs_of(paths: list[str | Path], arm: str | None = None) -> list[Path]:
    """Fine-tuning run dirs from run dirs and/or sweep dirs (their finished trials; `arm` keeps one arm's); a run
    named twice (e.g. a sweep and one of its own trials) is an error, as it would weigh twice in the summary."""
    from vemscale.tune.results import read_trials

    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "trials.csv").is_file():
            rows = read_trials(p)
            arms = sorted({r["arm"] for r in rows})
            if arm is None and len(arms) > 1:
                raise UserError(f"{p} is a sweep of {len(arms)} arms ({', '.join(arms)}): name one with --arm")
            if arm is not None and arm not in arms:
                raise UserError(f"{p} has no finished trials of arm {arm!r}; its arms: {', '.join(arms) or 'none'}")
            out += [r["run_dir"] for r in rows if arm is None or r["arm"] == arm]
        elif arm is not None:
            raise UserError(f"--arm {arm} names a sweep's arm, but {p} is not a sweep directory (no trials.csv)")
        else:
            out.append(p)
    seen: dict[Path, Path] = {}
    for d in out:
        if d.resolve() in seen:
            raise UserError(f"run {d} is given twice (as {seen[d.resolve()]} too): name each run once")
        seen[d.resolve()] = d
    return out


def candidate(run_dir: Path) -> dict[str, Any]:
    """One run's chosen checkpoint: its distance, the settings it was measured under, and (evaluation only) its
    target IoU; a clear error when the run kept no selection."""
    from vemscale.checkpoint import read_meta

    rec = sel.read_record(run_dir)
    ckpt = run_dir / sel.SELECTED_DIR
    if not rec.get("intervals") or rec.get("method") not in ("morphology", "area_ratio") or not ckpt.is_dir():
        raise UserError(f"{run_dir}: no selection record ({sel.RECORD_FILE}) and {sel.SELECTED_DIR}/ checkpoint of "
                        "select=morphology or area_ratio; fine-tune with select=morphology target=<volume> first")
    if not math.isfinite(rec["chosen_distance"]):
        raise UserError(f"{run_dir}: its chosen distance is {rec['chosen_distance']} (no objects measured on the "
                        "target?); it cannot be compared, leave this run out")
    cfg = read_meta(ckpt).train_config
    target = {k: v for k, v in cfg["target"].items() if k != "labels"}  # labels only score, they never choose
    settings = {k: v for k, v in cfg["selection"].items() if k != "prior"}  # the prior is compared by value below
    return {"run_dir": str(run_dir), "checkpoint": str(ckpt), "method": rec["method"], "prior": rec["prior"],
            "iteration": rec["chosen_iteration"], "distance": rec["chosen_distance"],
            "target_iou": rec.get("chosen_target_iou"), "target": target, "selection": settings}


def choose(cands: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate with the smallest distance (the first given on ties), after checking they are comparable."""
    if not cands:
        raise UserError("no runs to select from")
    first = cands[0]
    for c in cands[1:]:
        for key in ("method", "target", "selection"):
            if c[key] != first[key]:
                diff = {k: c[key][k] for k in c[key] if c[key].get(k) != first[key].get(k)} if isinstance(c[key], dict) else c[key]
                was = {k: first[key].get(k) for k in diff} if isinstance(c[key], dict) else first[key]
                raise UserError(f"{c['run_dir']} was selected with {key} {diff} but {first['run_dir']} with {was}: "
                                "select among runs of one source, target sample and rule")
        if not math.isclose(c["prior"], first["prior"], rel_tol=1e-9, abs_tol=1e-12):
            raise UserError(f"{c['run_dir']} has prior {c['prior']:.6f} but {first['run_dir']} {first['prior']:.6f}: "
                            "runs of other source labels are not comparable")
    return min(enumerate(cands), key=lambda ic: (ic[1]["distance"], ic[0]))[1]


def select_runs(paths: list[str | Path], arm: str | None = None, copy_to: str | Path | None = None) -> dict[str, Any]:
    dest = Path(copy_to).resolve() if copy_to else None
    if dest is not None and dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"--copy {dest} exists and is not an empty directory; name a new one")
    runs = run_dirs_of(paths, arm)
    if dest is not None:
        for r in runs:
            r = r.resolve()
            if dest == r or r in dest.parents or dest in r.parents:
                raise UserError(f"--copy {dest} is inside (or holds) run {r}; name a directory outside the runs")
    cands = [candidate(r) for r in runs]
    best = choose(cands)
    out = {"checkpoint": best["checkpoint"], "run_dir": best["run_dir"], "iteration": best["iteration"],
           "distance": best["distance"], "method": best["method"], "prior": best["prior"],
           "runs": [{k: c[k] for k in ("run_dir", "iteration", "distance", "target_iou")} for c in cands]}
    if all(c["target_iou"] is not None for c in cands):  # target labels were given: evaluation only
        oracle = max(cands, key=lambda c: c["target_iou"])
        out.update(target_iou=best["target_iou"], oracle_target_iou=oracle["target_iou"],
                   mean_target_iou=sum(c["target_iou"] for c in cands) / len(cands))
    if dest is not None:
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(best["checkpoint"], tmp)
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
        out["checkpoint"] = str(dest)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="fine-tuning run dirs (select=morphology) and/or sweep dirs")
    parser.add_argument("--arm", help="with a sweep dir: the arm whose seeds are compared")
    parser.add_argument("--copy", dest="copy_to", help="copy the chosen checkpoint to this new directory")


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    out = select_runs(args.runs, args.arm, args.copy_to)
    for r in out["runs"]:
        log.info("%s: iteration %s, distance %.5f%s", r["run_dir"], r["iteration"], r["distance"],
                 f", target IoU {r['target_iou']:.4f} (evaluation only)" if r["target_iou"] is not None else "")
    log.info("chosen: %s (iteration %s, distance %.5f)", out["checkpoint"], out["iteration"], out["distance"])
    return out
