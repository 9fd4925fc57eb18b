"""Benchmark: fine-tuning throughput of the Ray Train loop (1 worker) vs a plain PyTorch loop.

Both run the same model, batch, crops, augmentations and optimizer step (`SegmentationStep`) on the same
real data, with the same thread count, timed from their first iteration; the Ray figure is the worker's
wall-clock images/s including its metric reports. Usage:

    python -m vemscale.bench.train [--iterations 40] [--model tiny] [--batch 8] [--crop 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(os.environ.get("VEMSCALE_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def _config(args, run_dir: str):
    from vemscale.config import build_config
    from vemscale.train.finetune import FinetuneConfig

    src = {
        "image": str(DATA / "vnc_drosophila_sstem/train/image.tif"),
        "labels": str(DATA / "vnc_drosophila_sstem/train/labels_mitochondria.tif"),
        "slices": "0:16",
    }
    return build_config(FinetuneConfig, {
        "run_dir": run_dir,
        "data": {"train": [src], "val": [], "classes": ["background", "mitochondria"]},
        "model": {"name": args.model},
        "train": {
            "iterations": args.iterations, "batch_size": args.batch, "crop": args.crop, "workers": 1,
            "log_every": 10, "val_every": 10**9, "checkpoint_every": 10**9, "cpus_per_worker": args.threads,
            "use_gpu": False,
        },
    })


def plain_loop(args, cfg, derived) -> float:
    """images/s of the same step in a plain loop in this process."""
    from vemscale.infer.tiling import Normalizer
    from vemscale.models import create_model
    from vemscale.train.augment import AugmentConfig
    from vemscale.train.data import CropSampler, load_labelled
    from vemscale.train.loop import SegmentationStep, make_optimizer
    from vemscale.train.schedule import poly_lr

    torch.set_num_threads(args.threads)
    src = cfg.data.train[0]
    stacks = [load_labelled(src.image, src.labels, src.slices, 2)]
    torch.manual_seed(0)
    model = create_model(args.model, in_chans=1, num_classes=2)
    tc = cfg.train.model_dump()
    opt = make_optimizer(model.parameters(), tc)
    sampler = CropSampler(stacks, args.crop, [0], seed=0)
    step = SegmentationStep(model, opt, Normalizer(**derived["normalization"]), AugmentConfig(), "ce_dice", torch.device("cpu"), 1)
    t0 = time.perf_counter()
    for it in range(args.iterations):
        imgs, labs = sampler.sample(args.batch)
        step(imgs, labs, poly_lr(tc["lr"], it, args.iterations, tc["poly_power"]))
    return args.iterations * args.batch / (time.perf_counter() - t0)


def ray_loop(cfg) -> float:
    from vemscale.train.finetune import finetune

    result = finetune(cfg)
    return float(result["metrics"]["loop_images_per_s"])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = p.parse_args(argv)
    from vemscale.raycluster import ensure_ray
    from vemscale.train.finetune import prepare

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(args, tmp)
        derived = prepare(cfg)
        ensure_ray(num_cpus=args.threads)
        base1 = plain_loop(args, cfg, derived)
        ray_ips = ray_loop(cfg)
        base2 = plain_loop(args, cfg, derived)
    base = float(np.mean([base1, base2]))
    out = {
        "model": args.model, "batch": args.batch, "crop": args.crop, "iterations": args.iterations,
        "threads": args.threads, "plain_images_per_s": [round(base1, 3), round(base2, 3)],
        "ray_train_images_per_s": round(ray_ips, 3), "ratio": round(ray_ips / base, 3),
    }
    print(f"plain PyTorch loop: {base:.2f} images/s (runs: {base1:.2f}, {base2:.2f})")
    print(f"Ray Train, 1 worker: {ray_ips:.2f} images/s")
    print(f"ratio Ray Train / plain: {ray_ips / base:.3f}  (target >= 0.9)")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
