"""A sweep's results on disk: trials.csv, summary.csv, pvalues.csv, the figures, report.md and report.json.

Statistics use the trials that ran to the end (status DONE); failed, stopped and unfinished trials are
counted per arm and listed in the trials table with their status and error.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vemscale.io.atomic import write_text
from vemscale.tune.config import SweepConfig
from vemscale.tune.plots import box_plot, curves_plot, heatmap
from vemscale.tune.results import STATUS_ORDER, TARGET_KEYS, write_csv
from vemscale.tune.stats import arm_stats, pairwise


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v else f"{v:.{digits}f}"
    return str(v)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_report(run_dir: Path, rows: list[dict[str, Any]], state: dict[str, Any], wall_s: float | None = None) -> dict[str, Any]:
    sweep = SweepConfig.model_validate(state["sweep"])
    m = sweep.metric
    keys = [f"final_{m}", f"best_{m}"]
    arms = list(sweep.arms)
    done = [r for r in rows if r["status"] == "DONE"]
    if any(r.get("target_iou_selected") is not None for r in done):  # a cross-domain sweep: the target's IoU too
        keys += list(TARGET_KEYS)

    stats: dict[str, dict[str, Any]] = {a: {"n_trials": 0, **{s.lower(): 0 for s in STATUS_ORDER}} for a in arms}
    for r in rows:
        stats[r["arm"]]["n_trials"] += 1
        stats[r["arm"]][r["status"].lower()] += 1
    values = {k: {a: [r[k] for r in done if r["arm"] == a and r[k] is not None] for a in arms} for k in keys}
    for k in keys:
        for a, s in arm_stats(values[k]).items():
            stats[a][k] = s
    tests = {k: pairwise(values[k]) for k in keys}

    write_csv(run_dir / "trials.csv", rows)
    summary_rows = [{"arm": a, "n": stats[a][keys[0]]["n"], "trials": stats[a]["n_trials"],
                     **{s.lower(): stats[a][s.lower()] for s in STATUS_ORDER if s != "DONE"},
                     **{f"{k}_{q}": stats[a][k][q] for k in keys for q in ("mean", "std", "min", "max")}}
                    for a in arms]
    write_csv(run_dir / "summary.csv", summary_rows)
    write_csv(run_dir / "pvalues.csv", [{"metric": k, **t} for k in keys for t in tests[k]])

    label = {"val_iou": "held-out IoU (foreground mean)", "best_val_iou": "best held-out IoU", "loss": "training loss"}.get(m, m)
    plots = {}
    for k in keys:
        target = k in TARGET_KEYS
        plots[f"box_{k}"] = box_plot(values[k], run_dir / f"box_{k}.png",
                                     ylabel=k if target else f"{k.split('_')[0]} {label}",
                                     title=f"{k if target else k.split('_')[0] + ' ' + m} per arm (one dot per seed)")
    selection = None
    if TARGET_KEYS[0] in keys:
        selection = _selection_summary(done, arms, stats)
        plots["heatmap_target_iou"] = heatmap(
            {a: [stats[a][k]["mean"] for k in TARGET_KEYS] for a in arms}, ["last", "selected", "oracle"],
            run_dir / "heatmap_target_iou.png", title="target IoU (mean over seeds) per arm and checkpoint")
    curves = {a: [r["_history"] for r in rows if r["arm"] == a and r["status"] != "ERROR"] for a in arms}
    plots[f"curves_{m}"] = curves_plot(curves, run_dir / f"curves_{m}.png", ylabel=label,
                                       title=f"{m} vs iteration (mean, min-max over trials)")

    ranked = [r for r in rows if r[f"best_{m}"] is not None]
    best = (max if sweep.mode == "max" else min)(ranked, key=lambda r: r[f"best_{m}"]) if ranked else None
    failed = [r for r in rows if r["status"] in ("ERROR", "UNFINISHED")]
    report = {
        "run_dir": str(run_dir),
        "report": str(run_dir / "report.md"),
        "trials_csv": str(run_dir / "trials.csv"),
        "summary_csv": str(run_dir / "summary.csv"),
        "pvalues_csv": str(run_dir / "pvalues.csv"),
        "plots": plots,
        "metric": m,
        "mode": sweep.mode,
        "n_trials": len(rows),
        "status": {s: sum(r["status"] == s for r in rows) for s in STATUS_ORDER},
        "arms": stats,
        "mann_whitney": tests,
        "keys": keys,
        "selection": selection,
        "best_trial": {k: v for k, v in best.items() if not k.startswith("_")} if best else None,
        "wall_s": round(wall_s, 1) if wall_s is not None else None,
        "failed": len(failed),
    }
    write_text(run_dir / "report.json", json.dumps(report, indent=2, default=str))
    write_text(run_dir / "report.md", _markdown(report, rows, sweep, state))
    return report


def _selection_summary(done: list[dict[str, Any]], arms: list[str], stats: dict[str, Any]) -> dict[str, Any]:
    """Per arm: how often the selected checkpoint scores above the last one on the target, and equals the oracle."""
    out = {}
    for a in arms:
        rs = [r for r in done if r["arm"] == a and r.get("target_iou_selected") is not None]
        out[a] = {"n": len(rs),
                  "selected_beats_last": sum(r["target_iou_selected"] > r["target_iou_last"] for r in rs),
                  "selected_is_oracle": sum(r["target_iou_selected"] >= r["target_iou_oracle"] for r in rs)}
    return out


def _markdown(report: dict[str, Any], rows: list[dict[str, Any]], sweep: SweepConfig, state: dict[str, Any]) -> str:
    m = report["metric"]
    keys = report["keys"]
    arms = list(sweep.arms)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Sweep report: {Path(report['run_dir']).name}", ""]
    lines.append(f"Base config `{state.get('base_path') or '(none)'}`, {len(arms)} arm(s) x {len(sweep.seeds)} seed(s) "
                 f"{sweep.seeds}" + (f" x search space ({', '.join(sweep.search_space)})" if sweep.search_space else "")
                 + f", scheduler `{sweep.scheduler.type}`, metric `{m}` ({sweep.mode}). "
                 + f"{report['n_trials']} trials: " + ", ".join(f"{n} {s}" for s, n in report["status"].items() if n)
                 + (f"; wall time {report['wall_s'] / 60:.1f} min" if report.get("wall_s") else "") + f". Written {when}.")
    common = ", ".join(f"`{k}={v}`" for k, v in sweep.overrides.items())
    lines += ["", "Arms (overrides on top of the base" + (f" and the common overrides {common}" if common else "") + "):", ""]
    for a in arms:
        ov = ", ".join(f"`{k}={v}`" for k, v in sweep.arms[a].items()) or "(none)"
        lines.append(f"- **{a}**: {ov}")
    lines += ["", f"## {m} per arm", "",
              "Over the trials that ran to the end (DONE); std is the sample standard deviation.", ""]
    header = ["arm", "n"] + [f"{k} mean ± std" for k in keys] + [f"{keys[0]} min–max", "failed", "unfinished"]
    body = []
    for a in arms:
        s = report["arms"][a]
        cells = [a, s[keys[0]]["n"]]
        for k in keys:
            mean, std = s[k]["mean"], s[k]["std"]
            cells.append("–" if mean is None else f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}")
        lo, hi = s[keys[0]]["min"], s[keys[0]]["max"]
        cells += ["–" if lo is None else f"{lo:.4f}–{hi:.4f}", s["error"], s["unfinished"]]
        body.append(cells)
    lines += [_md_table(header, body), ""]
    if report.get("selection"):
        lines += ["## Checkpoint selection on the target", "",
                  "target_iou_last: the last checkpoint; _selected: the one `select` chose without target labels; "
                  "_oracle: the best on the target labels (for evaluation only).", ""]
        lines += [_md_table(["arm", "n", "selected > last", "selected = oracle"],
                            [[a, s["n"], s["selected_beats_last"], s["selected_is_oracle"]]
                             for a, s in report["selection"].items()]), ""]
    if len(arms) > 1:
        lines += ["## Mann-Whitney U (two-sided) between arms", ""]
        tbody = []
        for k in keys:
            for t in report["mann_whitney"][k]:
                u = t["u"] if t["u"] is None or not float(t["u"]).is_integer() else int(t["u"])
                tbody.append([k, f"{t['arm_a']} vs {t['arm_b']}", t["n_a"], t["n_b"], u, t["p"]])
        lines += [_md_table(["metric", "arms", "n a", "n b", "U", "p"], tbody), "",
                  "With n seeds per arm the smallest possible two-sided p is 2/C(2n, n) (0.1 for 3 vs 3).", ""]
    lines += ["## Figures", ""]
    for name, p in report["plots"].items():
        lines.append(f"![{name}]({Path(p['path']).name})")
        lines.append("")
    lines += ["## Trials", "", "Full table: [trials.csv](trials.csv); per arm: [summary.csv](summary.csv); "
              "tests: [pvalues.csv](pvalues.csv). Each trial's fine-tuning run (metrics.csv, metrics.png, "
              "checkpoint) is in `trials/<trial>/`.", ""]
    cols = ["trial", "arm", "seed", *sweep.search_space, "status", *keys, "iterations", "seconds", "attempts"]
    lines += [_md_table(cols, [[r.get(c) for c in cols] for r in rows]), ""]
    errors = [r for r in rows if r["status"] == "ERROR"]
    if errors or report["status"].get("UNFINISHED"):
        lines += ["## Failed or unfinished trials", ""]
        lines += [f"- `{r['trial']}` {r['status']}: {r['error'] or 'not finished'}" for r in rows
                  if r["status"] in ("ERROR", "UNFINISHED")]
        lines += ["", f"Continue them with `vemscale sweep --resume {report['run_dir']}`.", ""]
    if report.get("best_trial"):
        b = report["best_trial"]
        vals = ", ".join(f"{k}={b[k]}" for k in sweep.search_space)
        lines += [f"Best trial by best {m}: `{b['trial']}` ({b['arm']}, seed {b['seed']}{', ' + vals if vals else ''}): "
                  f"{b[f'best_{m}']:.4f}.", ""]
    return "\n".join(lines)
