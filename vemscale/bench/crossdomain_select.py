"""Seed selection by the morphology rule on a cross-domain sweep: train k seeds, keep the one `vemscale select` picks.

For every arm with a selection record, every k-subset of its seeds (over all the sweeps given) is one draw of
"train k seeds, pick by the morphology rule without target labels" (`vemscale.train.select_runs.choose`); the
target IoU of the pick (target labels only score) is averaged over all subsets and set beside the mean single
seed (what training one seed gives) and the best of the k by the target labels (the oracle). The recovered share
(IoU - source-only) / (reference - source-only) uses the pair's source-only arm (mean target IoU over its seeds)
and the other pair's source-only val IoU as the target-trained reference, as `crossdomain_ensemble` does.

    python -m vemscale.bench.crossdomain_select --sweeps runs/crossdomain_mito_ens runs/crossdomain_mito_ens345 --k 3

Sweeps may carry a setting label (`LABEL=DIR`, e.g. two pre-training lengths): then a draw trains k seeds of every
setting and the rule picks among all of them (every k-subset of each setting, their product), which asks whether the
rule can also choose the setting without target labels.

(the sweep commands and the figures: BENCHMARKS.md, "Seed selection by the morphology rule"). Reports, never asserts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics as st
from pathlib import Path
from typing import Any

from vemscale.bench.crossdomain_ensemble import read_trials, recovered
from vemscale.train import select as sel
from vemscale.train.select_runs import candidate, choose

OTHER = {"vnc_to_cdeep3m": "cdeep3m_to_vnc", "cdeep3m_to_vnc": "vnc_to_cdeep3m"}


def draws(cands: list[dict[str, Any]], k: int) -> list[list[dict[str, Any]]]:
    """Every draw of k seeds from each setting (one setting: every k-subset)."""
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for c in cands:
        by_setting.setdefault(c.get("setting", ""), []).append(c)
    per = [list(itertools.combinations(group, k)) for _, group in sorted(by_setting.items())]
    return [[c for sub in combo for c in sub] for combo in itertools.product(*per)]


def subsets(cands: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """Over every draw (k seeds, or k of each setting): the mean target IoU of the rule's pick, of a single seed and
    of the oracle's pick, and how often the pick is the draw's oracle."""
    picks, oracles = [], []
    for sub in draws(cands, k):
        picks.append(choose(sub)["target_iou"])
        oracles.append(max(c["target_iou"] for c in sub))
    by_setting = {g: st.mean(c["target_iou"] for c in cands if c.get("setting", "") == g)
                  for g in sorted({c.get("setting", "") for c in cands})}
    return {"n_seeds": len(cands), "k": k, "subsets": len(picks), "single": st.mean(c["target_iou"] for c in cands),
            "single_by_setting": by_setting,
            "single_std": st.stdev(c["target_iou"] for c in cands) if len(cands) > 1 else 0.0,
            "pick": st.mean(picks), "pick_min": min(picks), "pick_max": max(picks), "oracle": st.mean(oracles),
            "pick_is_oracle": sum(p == o for p, o in zip(picks, oracles)) / len(picks),
            "spearman_distance_iou": spearman([c["distance"] for c in cands], [c["target_iou"] for c in cands])}


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (no ties expected in float distances); negative: a smaller distance goes with a higher IoU."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic) if len(x) > 2 else float("nan")


def trials_by_arm(entries: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The DONE trials of sweeps given as `DIR` or `LABEL=DIR` (the label is their setting), by arm, in (setting,
    sweep, seed) order."""
    labelled = [entry.split("=", 1) if "=" in entry else ("", entry) for entry in entries]
    trials = [{**t, "setting": label} for label, d in labelled for t in read_trials(Path(d))]
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for t in sorted(trials, key=lambda t: (t["arm"], t["setting"], t["sweep"], t["seed"])):
        by_arm.setdefault(t["arm"], []).append(t)
    return by_arm


def loss_line(by_arm: dict[str, list[dict[str, Any]]], pair: str) -> tuple[float, float] | None:
    """The pair's source-only target IoU (last checkpoint, mean over seeds) and its target-trained reference: the
    other pair's source-only val IoU (e.g. cdeep3m_to_vnc's val is CDeep3M trained and tested on CDeep3M)."""
    so, ref = by_arm.get(f"{pair}.source_only"), by_arm.get(f"{OTHER.get(pair)}.source_only")
    if not so or not ref:
        return None
    return st.mean(t["target_iou"] for t in so), st.mean(t["val_iou"] for t in ref)


def write_results(out: Path, results: dict[str, Any], lines: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweeps", nargs="+", required=True,
                   help="sweep run_dirs (their arms' seeds pooled), each optionally LABEL=DIR to draw k per setting")
    p.add_argument("--k", type=int, default=3, help="seeds trained per draw")
    p.add_argument("--out", type=Path, help="write results.json and results.md here")
    args = p.parse_args(argv)
    if args.k < 1:
        raise SystemExit("--k must be at least 1")
    by_arm = trials_by_arm(args.sweeps)
    arms: dict[str, list[dict]] = {}  # the arms whose every trial kept a selection record with target IoUs
    for arm, ts in by_arm.items():
        if all(sel.read_record(t["checkpoint"].parent).get("chosen_target_iou") is not None for t in ts):
            arms[arm] = [{**candidate(t["checkpoint"].parent), "seed": t["seed"], "setting": t["setting"]} for t in ts]
        else:
            print(f"{arm}: skipped (a trial without select=morphology and target labels)")
    results: dict[str, Any] = {}
    lines = [f"| arm | seeds | single seed: target IoU (mean ± std) | recovered | pick of {args.k} by morphology "
             f"(mean over subsets, min–max) | recovered | oracle of {args.k} | pick = oracle | Spearman(distance, IoU) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, cands in arms.items():
        settings = {c["setting"] for c in cands}
        if any(sum(c["setting"] == g for c in cands) < args.k for g in settings):
            continue
        r = results[arm] = subsets(cands, args.k)
        pair = arm.split(".")[0]
        # as crossdomain_ensemble: source-only's last-checkpoint target IoU, the other pair's source-only val IoU
        rec1 = recK = ""
        if (line := loss_line(by_arm, pair)) is not None:
            so_iou, ref_iou = line
            r.update(source_only=so_iou, reference=ref_iou)
            rec1, recK = recovered(r["single"], so_iou, ref_iou), recovered(r["pick"], so_iou, ref_iou)
        lines.append(f"| {arm} | {r['n_seeds']} | {r['single']:.3f} ± {r['single_std']:.3f} | {rec1} | {r['pick']:.3f} "
                     f"({r['pick_min']:.3f}–{r['pick_max']:.3f}) | {recK} | {r['oracle']:.3f} | {r['pick_is_oracle']:.0%} "
                     f"| {r['spearman_distance_iou']:+.2f} |")
    print("\n".join(lines))
    if args.out:
        write_results(args.out, results, lines)
    return results


if __name__ == "__main__":
    main()
