"""Seed ensembles of a cross-domain sweep's arms: how much of the domain-shift loss the mean of several seeds recovers.

Each arm's seeds (their last checkpoints) are grouped `--size` at a time in seed order; every group becomes one
checkpoint with `vemscale ensemble` (vemscale.models.ensemble) and is scored exactly as the sweep scored its trials:
the target sample of the trial's config (IoU against the target labels, which only score, and the morphology
statistic), and for source-only arms the source's held-out slices too. Source-only arms (from the same sweeps or
`--baseline` sweeps) give each pair's source-only IoU, and the other pair's source-only val IoU its target-trained
reference (cdeep3m_to_vnc's val is CDeep3M trained and tested on CDeep3M), so the recovered fraction
(IoU - source-only) / (reference - source-only) is printed for single seeds (means) and for ensembles of each.

    python -m vemscale.bench.crossdomain_ensemble --sweeps runs/crossdomain_mito_ens --size 3 --out runs/ens_1k

(the sweep command and the figures: BENCHMARKS.md, "Seed ensembles of the 1,000-iteration setting").

Reports, never asserts; results in <out>/results.json and a Markdown table on stdout. Rerunning reuses the
ensemble checkpoints and scores already under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import time
from pathlib import Path
from typing import Any


def read_trials(sweep: Path) -> list[dict[str, Any]]:
    """DONE trials of a sweep (its trials.csv) with the trial's final checkpoint."""
    from vemscale.tune.results import read_trials as done_trials

    return [{"arm": r["arm"], "seed": int(r["seed"]), "checkpoint": r["run_dir"] / "checkpoint", "sweep": str(sweep),
             "target_iou": float(r["target_iou_last"]) if r.get("target_iou_last") else None,
             "val_iou": float(r["final_val_iou"])} for r in done_trials(sweep)]


def target_of(member: Path) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """The target sample (image, labels) a trial scored its checkpoints on, its selection settings and train config."""
    from vemscale.checkpoint import read_meta
    from vemscale.train import select as sel

    meta = read_meta(member)
    cfg = meta.train_config
    selection = json.loads((member.parent / sel.RECORD_FILE).read_text())
    if cfg["target"].get("match_histogram"):
        raise SystemExit(f"{member}: an arm with target.match_histogram is not scored here (its table is not kept)")
    image, labels = sel.load_target(cfg["target"])
    s = {"method": selection["method"], "prior": selection["prior"], "threshold": cfg["selection"]["threshold"],
         "min_size": cfg["selection"]["min_size"], "objects": cfg["selection"].get("objects", "stack"),
         "class": sel.class_index(meta.classes, cfg["selection"].get("class_name"))}
    return image, labels, s, cfg


def score(ckpt: Path, member: Path, with_val: bool) -> dict[str, float]:
    """Target IoU and morphology statistic of `ckpt` on member's target sample, as a trial scores a checkpoint; with
    `with_val`, the IoU on member's held-out source slices too."""
    import torch

    from vemscale.checkpoint import load_checkpoint
    from vemscale.infer.predictor import grid_and_normalizer
    from vemscale.train.data import load_labelled
    from vemscale.train.loop import score_target, validate

    torch.set_num_threads(2)
    model, meta = load_checkpoint(ckpt)
    image, labels, s, cfg = target_of(member)
    grid, norm = grid_and_normalizer(meta)
    batch = cfg["tiles"]["batch_size"]  # as the trial predicted it
    out = score_target(model, image, labels, s, grid, norm, "cpu", batch, meta.tta)
    if with_val:
        stacks = [load_labelled(v["image"], v["labels"], v.get("slices"), len(meta.classes)) for v in cfg["data"]["val"]]
        out.update(validate(model, stacks, grid, norm, len(meta.classes), "cpu", batch, meta.tta))
    return out


def ensemble_of(out: Path, arm: str, group: list[dict], with_val: bool) -> dict[str, Any]:
    from vemscale.models.ensemble import build_ensemble

    name = "seeds" + "-".join(str(t["seed"]) for t in group) + "_" + Path(group[0]["sweep"]).name
    d = out / arm / name
    done = d / "score.json"
    if done.is_file():
        rec = json.loads(done.read_text())
        if not with_val or "val_iou" in rec:
            return rec
    if not (d / "checkpoint").is_dir():
        build_ensemble([str(t["checkpoint"]) for t in group], d / "checkpoint")
    t0 = time.perf_counter()
    rec = {"arm": arm, "seeds": [t["seed"] for t in group], "sweep": group[0]["sweep"],
           "members_target_iou": [t["target_iou"] for t in group], "members_val_iou": [t["val_iou"] for t in group],
           **score(d / "checkpoint", group[0]["checkpoint"], with_val)}
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    done.write_text(json.dumps(rec, indent=1))
    print(f"{arm} {name}: target IoU {rec['target_iou']:.4f} (members {st.mean(rec['members_target_iou']):.4f})"
          + (f", val {rec['val_iou']:.4f}" if "val_iou" in rec else "") + f" [{rec['seconds']} s]", flush=True)
    return rec


def recovered(v: float, so: float, ref: float) -> str:
    return f"{(v - so) / (ref - so):.0%}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweeps", nargs="+", type=Path, required=True, help="sweep run_dirs whose arms are ensembled")
    p.add_argument("--baseline", nargs="*", type=Path, default=[], help="sweeps holding the source_only arms")
    p.add_argument("--size", type=int, default=3, help="seeds per ensemble (consecutive in seed order)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    trials = [t for s in args.sweeps for t in read_trials(s)]
    base = [t for s in args.baseline for t in read_trials(s)]
    arms: dict[str, list[dict]] = {}
    for t in sorted(trials + [b for b in base if b["arm"].endswith(".source_only")],
                    key=lambda t: (t["arm"], t["sweep"], t["seed"])):
        arms.setdefault(t["arm"], []).append(t)
    results: dict[str, list[dict]] = {}
    for arm, ts in arms.items():
        groups = [ts[i:i + args.size] for i in range(0, len(ts) - args.size + 1, args.size)]
        results[arm] = [ensemble_of(args.out, arm, g, arm.endswith(".source_only")) for g in groups]
    lines = ["| arm | seeds | single seeds: target IoU (mean) | recovered | ensemble: target IoU | recovered "
             "(vs single-seed line) | recovered (vs ensemble line) |", "|---|---|---|---|---|---|---|"]
    for arm, recs in results.items():
        pair = arm.split(".")[0]
        other = {"vnc_to_cdeep3m": "cdeep3m_to_vnc", "cdeep3m_to_vnc": "vnc_to_cdeep3m"}.get(pair)
        so_arm, ref_arm = results.get(f"{pair}.source_only"), results.get(f"{other}.source_only")
        for r in recs:
            single = st.mean(r["members_target_iou"])
            cells = [arm, ",".join(map(str, r["seeds"])), f"{single:.3f}", "", f"{r['target_iou']:.3f}", "", ""]
            if so_arm and ref_arm:
                so1 = st.mean(x for q in so_arm for x in q["members_target_iou"])
                ref1 = st.mean(x for q in ref_arm for x in q["members_val_iou"])
                soE = st.mean(q["target_iou"] for q in so_arm)
                refE = st.mean(q["val_iou"] for q in ref_arm)
                cells[3] = recovered(single, so1, ref1)
                cells[5] = recovered(r["target_iou"], so1, ref1)
                cells[6] = recovered(r["target_iou"], soE, refE)
            lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
