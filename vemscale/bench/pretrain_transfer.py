"""Does RETINA pre-training help with 2 labelled slices? Pre-train `tiny` on the unlabeled splits of all three
datasets in ../shared/data, fine-tune on 2 labelled slices of VNC mitochondria from the checkpoint and from
random init (same iterations, seeds, crops, normalisation), and compare held-out IoU on slices 16-19.

    python -m vemscale.bench.pretrain_transfer --out runs/compare_pretrain                      # full length (~2.5 h on 2 cores)
    python -m vemscale.bench.pretrain_transfer --out runs/compare_retina --recipe retina --seeds 0,1,2,3,4,5 \
        --crop 224 --arms random,retina,all                                                     # RETINA's recipe, 6 seeds
    python -m vemscale.bench.pretrain_transfer --out /tmp/cmp --pretrain-iterations 4 \\
        --finetune-iterations 4 --seeds 0 --crop 64 --pretrain-crop 64                           # smoke run

Arms: `random` (no init), `retina` (transfer=retina freeze=vit_blocks: RETINA's sets, every tensor but the
decoder and head loaded, the ViT blocks and their norm frozen), `frozen` (transfer=vit freeze=vit: the previous
recipe, which dropped the pre-trained CNN and froze the embeddings too), `all` (transfer=all, nothing frozen). Every run lives under --out; rerunning skips finished runs and resumes
unfinished ones. Results: <out>/results.json and a Markdown table on stdout. Reports, never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


DATA = Path(os.environ.get("VEMSCALE_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
UNLABELED = ["vnc_drosophila_sstem", "cdeep3m_sbem_mito", "isbi2012_membranes"]
ARMS = {"random": (None, "none"), "retina": ("retina", "vit_blocks"), "frozen": ("vit", "vit"), "all": ("all", "none")}


def run_pretrain(args) -> Path:
    from vemscale.config import build_config, layer
    from vemscale.train.pretrain import PretrainConfig, pretrain

    run_dir = args.out / "pretrain"
    final = run_dir / "checkpoint"
    if final.is_dir() and json.loads((final / "vemscale.json").read_text())["iteration"] >= args.pretrain_iterations:
        return final
    lr = {} if args.pretrain_lr is None else {"lr": args.pretrain_lr}  # else the recipe's (or the default 0.01)
    cfg = build_config(PretrainConfig, layer(PretrainConfig, {}, {
        "run_dir": str(run_dir), "recipe": args.recipe,
        "data": [str(DATA / d / "test_unlabeled" / "image.tif") for d in UNLABELED],
        "model": {"name": "tiny"},
        "train": {"iterations": args.pretrain_iterations, "batch_size": args.pretrain_batch, "crop": args.pretrain_crop,
                  **lr, "log_every": 25, "checkpoint_every": 250, "preview_every": 250, "seed": 0},
        "workers": args.workers,
    }))
    return Path(pretrain(cfg)["checkpoint"])


def run_finetune(args, arm: str, seed: int, init: Path, norm: dict) -> dict:
    from vemscale.config import build_config, layer
    from vemscale.train.finetune import FinetuneConfig, finetune

    run_dir = args.out / f"{arm}_seed{seed}"
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    transfer, freeze = ARMS[arm]
    vnc = lambda s: {"image": str(DATA / "vnc_drosophila_sstem/train/image.tif"),  # noqa: E731
                     "labels": str(DATA / "vnc_drosophila_sstem/train/labels_mitochondria.tif"), "slices": s}
    # the recipe's values, then this arm's: its transfer/freeze, crops, batch, length and seed win
    cfg = build_config(FinetuneConfig, layer(FinetuneConfig, {}, {
        "run_dir": str(run_dir), "recipe": args.recipe,
        "data": {"train": [vnc(args.train_slices)], "val": [vnc("16:20")], "classes": ["background", "mitochondria"],
                 "mean": norm["mean"], "std": norm["std"]},  # the same normalisation in every arm
        "model": {"name": "tiny"},
        "train": {"iterations": args.finetune_iterations, "batch_size": args.batch, "crop": args.crop, "seed": seed,
                  "val_every": args.finetune_iterations, "checkpoint_every": max(50, args.finetune_iterations // 4),
                  "log_every": 25, "workers": 1},
        **({"init": str(init), "transfer": transfer, "freeze": freeze} if transfer else {"transfer": "all", "freeze": "none"}),
    }))
    m = finetune(cfg)["metrics"]
    out = {"arm": arm, "seed": seed, "val_iou": m["val_iou"], "iteration": m["iteration"]}
    done.write_text(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/compare_pretrain"))
    p.add_argument("--pretrain-iterations", type=int, default=1500)
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--pretrain-crop", type=int, default=128)
    p.add_argument("--pretrain-lr", type=float, default=None, help="default: the recipe's (none: 0.01)")
    p.add_argument("--recipe", default="none", choices=["none", "retina"],
                   help="RETINA's values for pre-training and every arm (crops, batch, lengths: the flags here)")
    p.add_argument("--finetune-iterations", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--train-slices", default="0:2")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default="random,retina,all")
    p.add_argument("--workers", type=int, default=2, help="pre-training workers")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    from vemscale.checkpoint import read_meta
    from vemscale.raycluster import ensure_ray

    ensure_ray()
    init = run_pretrain(args)
    norm = read_meta(init).normalization
    rows = [run_finetune(args, arm, int(seed), init, norm) for seed in args.seeds.split(",") for arm in args.arms.split(",")]
    from vemscale.tune.stats import describe, mann_whitney

    summary = {}
    arms = args.arms.split(",")
    for arm in arms:
        ious = [r["val_iou"] for r in rows if r["arm"] == arm]
        summary[arm] = {"mean": describe(ious)["mean"], "std": describe(ious)["std"], "runs": ious}  # sample std
        if arm != "random" and "random" in arms:  # two-sided, exact for small samples
            summary[arm]["vs_random"] = mann_whitney(ious, [r["val_iou"] for r in rows if r["arm"] == "random"])
    result = {"config": {k: str(v) for k, v in vars(args).items()}, "runs": rows, "summary": summary}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\nheld-out IoU, VNC mitochondria slices 16-19, fine-tuned on slices {args.train_slices} "
          f"for {args.finetune_iterations} iterations (pre-training: {args.pretrain_iterations} iterations)")
    print("| arm | mean IoU | std | runs (by seed) | Mann-Whitney vs random |\n|---|---|---|---|---|")
    for arm, s in summary.items():
        std = "-" if s["std"] is None else f"{s['std']:.4f}"
        mw = s.get("vs_random")
        test = f"U = {mw['u']:g}, p = {mw['p']:.3g}" if mw and mw["p"] is not None else "-"
        print(f"| {arm} | {s['mean']:.4f} | {std} | {', '.join(f'{v:.4f}' for v in s['runs'])} | {test} |")
    return result


if __name__ == "__main__":
    main()
