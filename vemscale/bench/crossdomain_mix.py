"""Deep ensembles across settings of a cross-domain arm: k seeds of each setting (e.g. two pre-training lengths) as one
mean-probability model, and how much of the domain-shift loss it recovers over every draw of seeds.

A draw is "train k seeds of every setting, average them" (`vemscale ensemble` of all k x settings checkpoints): label-
free, nothing is chosen by the target. Each member's target probabilities (its trial's target sample, predicted with
the checkpoint's TTA exactly as the trial scored it) are computed once and cached (`--cache`, default <out>/probs), so
every draw is their mean (what the ensemble checkpoint predicts, TTA included: tests/test_ensemble.py), thresholded
and scored as a trial scores a checkpoint (target labels only score). Each member's own IoU from its cache is checked
against its trial's recorded target IoU. Per setting alone, every k-subset is scored too. The recovered share
(IoU - source-only) / (reference - source-only) is against the single-seed line, as `crossdomain_select`: the pair's
source-only target IoU and the other pair's source-only held-out IoU.

    python -m vemscale.bench.crossdomain_mix --sweeps 1k=runs/crossdomain_mito_ens 1k=runs/crossdomain_mito_ens345 \\
        1k=runs/crossdomain_mito_ens678 2k=runs/crossdomain_mito_2k_s012 --k 3 --out runs/mix_1k2k

(the sweep commands and the figures: BENCHMARKS.md, "Ensembles across pre-training lengths"). Reports, never asserts.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics as st
import time
from pathlib import Path
from typing import Any

import numpy as np

from vemscale.bench.crossdomain_ensemble import recovered, target_of
from vemscale.bench.crossdomain_select import draws, loss_line, trials_by_arm, write_results


def member_probs(cache: Path, trial: dict[str, Any]) -> Path:
    """The cached foreground probabilities (Z, Y, X, float32) of one trial's checkpoint on its target sample."""
    import torch

    from vemscale.checkpoint import load_checkpoint
    from vemscale.infer.predictor import grid_and_normalizer
    from vemscale.train.loop import predict_target

    path = cache / trial["arm"] / f"{Path(trial['sweep']).name}_seed{trial['seed']}.npy"
    if path.is_file():
        return path
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model, meta = load_checkpoint(trial["checkpoint"])
    image, _, s, cfg = target_of(trial["checkpoint"])
    grid, norm = grid_and_normalizer(meta)
    probs = predict_target(model, image, grid, norm, "cpu", cfg["tiles"]["batch_size"], meta.tta)[s["class"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, probs.astype(np.float32))
    tmp.replace(path)
    print(f"{trial['arm']} {Path(trial['sweep']).name} seed {trial['seed']}: predicted in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return path


def mean_metrics(paths: list[Path], labels: np.ndarray, s: dict[str, Any]) -> dict[str, float]:
    """Target IoU and morphology distance of the members' mean probability, as a trial scores a checkpoint."""
    from vemscale.train.select import target_metrics

    total = None
    for p in paths:
        a = np.load(p)
        total = a.astype(np.float64) if total is None else total + a
    return target_metrics((total / len(paths)).astype(np.float32), labels == s["class"], s["method"], s["prior"],
                          s["threshold"], s["min_size"], s["objects"])


def arm_results(cache: Path, arm: str, trials: list[dict[str, Any]], k: int,
                sample: int | None = None) -> dict[str, Any]:
    """Every draw of k seeds per setting as one ensemble (or a seeded random `sample` of them); per setting, every
    k-subset alone; the members' checks."""
    _, labels, s, _ = target_of(trials[0]["checkpoint"])
    probs = {id(t): member_probs(cache, t) for t in trials}
    checks = []
    for t in trials:
        own = mean_metrics([probs[id(t)]], labels, s)["target_iou"]
        checks.append({"setting": t["setting"], "seed": t["seed"], "sweep": Path(t["sweep"]).name,
                       "trial": t["target_iou"], "from_cache": own, "equal": abs(own - t["target_iou"]) < 1e-9})
    every = draws(trials, k)
    if sample and sample < len(every):
        every = random.Random(0).sample(every, sample)
    mixed = [mean_metrics([probs[id(t)] for t in d], labels, s)["target_iou"] for d in every]
    alone = {}
    for g in sorted({t["setting"] for t in trials}):
        ts = [t for t in trials if t["setting"] == g]
        alone[g] = [mean_metrics([probs[id(t)] for t in sub], labels, s)["target_iou"]
                    for sub in itertools.combinations(ts, k)]
    return {"k": k, "draws": len(mixed), "single": st.mean(t["target_iou"] for t in trials),
            "single_by_setting": {g: st.mean(t["target_iou"] for t in trials if t["setting"] == g) for g in alone},
            "mix": st.mean(mixed), "mix_min": min(mixed), "mix_max": max(mixed),
            "mix_above_line": None, "alone": {g: {"mean": st.mean(v), "min": min(v), "max": max(v), "n": len(v)}
                                              for g, v in alone.items()},
            "mixed_draws": mixed, "checks": checks}


def parse_lines(entries: list[str]) -> dict[str, tuple[float, float]]:
    """`PAIR=SOURCE_ONLY,REFERENCE` entries as {pair: (source-only IoU, reference IoU)}; a clear error otherwise."""
    out = {}
    for entry in entries:
        pair, _, values = entry.partition("=")
        try:
            so_iou, ref_iou = (float(v) for v in values.split(","))
        except ValueError:
            raise SystemExit(f"--line {entry!r}: expected PAIR=SOURCE_ONLY,REFERENCE, e.g. vnc_to_cdeep3m=0.12,0.49")
        if not 0 <= so_iou < ref_iou <= 1:
            raise SystemExit(f"--line {entry!r}: need 0 <= source-only < reference <= 1")
        out[pair] = (so_iou, ref_iou)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweeps", nargs="+", required=True,
                   help="LABEL=DIR sweep run_dirs; k seeds of each label per draw")
    p.add_argument("--k", type=int, default=3, help="seeds of each setting per ensemble")
    p.add_argument("--sample", type=int, default=None, help="score a seeded random sample of this many draws")
    p.add_argument("--arms", nargs="*", default=None,
                   help="only these arms (default: every arm that is not source_only)")
    p.add_argument("--out", type=Path, required=True, help="results.json and results.md (and the cache by default)")
    p.add_argument("--cache", type=Path, default=None, help="member probabilities, shared between runs (<out>/probs)")
    p.add_argument("--line", nargs="*", default=[], metavar="PAIR=SOURCE_ONLY,REFERENCE",
                   help="a pair's recorded source-only target IoU and target-trained reference, for sweeps without "
                        "source_only arms (e.g. vnc_to_cdeep3m=0.1208,0.4872); overrides the sweeps' own")
    args = p.parse_args(argv)
    if args.k < 1:
        raise SystemExit("--k must be at least 1")
    given = parse_lines(args.line)
    by_arm = trials_by_arm(args.sweeps)
    results: dict[str, Any] = {}
    lines = [f"| arm | seeds per setting | single seed (by setting) | ensemble of {args.k} per setting alone (mean over "
             f"subsets) | ensemble of {args.k} of every setting (mean over draws, min-max) | recovered: single / "
             "mixed ensemble | draws above half |", "|---|---|---|---|---|---|---|"]
    for arm, ts in by_arm.items():
        if arm.endswith(".source_only") or (args.arms and arm not in args.arms):
            continue
        counts = {g: sum(t["setting"] == g for t in ts) for g in {t["setting"] for t in ts}}
        if min(counts.values()) < args.k:
            print(f"{arm}: skipped (a setting with fewer than {args.k} seeds: {counts})")
            continue
        r = results[arm] = arm_results(args.cache or args.out / "probs", arm, ts, args.k, args.sample)
        pair = arm.split(".")[0]
        rec1 = recM = above = ""
        if (loss := given.get(pair) or loss_line(by_arm, pair)) is not None:
            so_iou, ref_iou = loss
            line = (so_iou + ref_iou) / 2
            r.update(source_only=so_iou, reference=ref_iou, half_line=line,
                     mix_recovered=(r["mix"] - so_iou) / (ref_iou - so_iou),
                     mix_above_line=sum(v >= line for v in r["mixed_draws"]) / len(r["mixed_draws"]))
            rec1, recM = recovered(r["single"], so_iou, ref_iou), recovered(r["mix"], so_iou, ref_iou)
            above = f"{r['mix_above_line']:.0%} (line {line:.3f})"
        by_set = ", ".join(f"{g} {v:.3f}" for g, v in r["single_by_setting"].items())
        alone = ", ".join(f"{g} {v['mean']:.3f} ({v['min']:.3f}-{v['max']:.3f})" for g, v in r["alone"].items())
        lines.append(f"| {arm} | {', '.join(f'{g}: {c}' for g, c in sorted(counts.items()))} | {by_set} | {alone} | "
                     f"**{r['mix']:.3f}** ({r['mix_min']:.3f}-{r['mix_max']:.3f}) | {rec1} / **{recM}** | {above} |")
        bad = [c for c in r["checks"] if not c["equal"]]
        print(f"{arm}: {len(r['checks']) - len(bad)} of {len(r['checks'])} members reproduce their trial's target IoU"
              + (f"; differ: {bad}" if bad else ""), flush=True)
    print("\n".join(lines))
    write_results(args.out, results, lines)
    return results


if __name__ == "__main__":
    main()
