"""Benchmark: RETINA augmentation throughput vs the model's training throughput, and Ray Train pre-training
with 1 vs 2 workers (same global batch), on real unlabeled EM. Usage:

    python -m vemscale.bench.pretrain [--iterations 20] [--batch 8] [--crop 128] [--model tiny] [--threads 2]

The augmentation figure is `retina_pair` (geometric + degradations + normalisation, in torch) on a CPU
batch; the training figure is a whole `RetinaStep` (the same augmentation, then forward, MSE, backward, SGD)
in the same process, so their ratio says how much of a step augmentation costs. The Ray figures are each
worker loop's wall-clock images/s (reports and checkpoint included), timed from its first iteration.
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
SOURCES = [str(DATA / d / "test_unlabeled" / "image.tif") for d in ("vnc_drosophila_sstem", "cdeep3m_sbem_mito", "isbi2012_membranes")]


def _batch(args, seed: int = 0) -> np.ndarray:
    from vemscale.train.unlabeled import PatchStream, SourceConfig

    stream = PatchStream([SourceConfig(path=p) for p in SOURCES], 1, args.crop, seed, 0, 1)
    return stream.batch(0, args.batch)


def _rate(fn, images: int, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return images * repeats / (time.perf_counter() - t0)


def augmentation_vs_training(args) -> dict:
    """images/s of augmentation alone and of a full RETINA training step, same batch, same threads."""
    from vemscale.models import create_model
    from vemscale.train.loop import make_optimizer
    from vemscale.train.pretrain_loop import RetinaStep
    from vemscale.train.augment import Normalize, RetinaAugmentConfig, retina_pair

    torch.set_num_threads(args.threads)
    batch = _batch(args)
    x = torch.from_numpy(batch)
    cfg, norm, gen = RetinaAugmentConfig(), Normalize([0.57287], [0.12741], "cpu"), torch.Generator().manual_seed(0)
    aug = _rate(lambda: retina_pair(x, cfg, gen, norm), args.batch, max(3, args.iterations))
    torch.manual_seed(0)
    model = create_model(args.model, in_chans=1, num_classes=1)
    opt = make_optimizer(model.parameters(), {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4})
    step = RetinaStep(model, opt, cfg, norm, torch.device("cpu"), seed=0)
    train = _rate(lambda: step(batch, 0.01), args.batch, max(2, args.iterations // 4))
    return {"augment_images_per_s": round(aug, 2), "train_step_images_per_s": round(train, 2),
            "augment_share_of_step": round(train / aug, 3)}


def ray_pretrain(args, workers: int, run_dir: str) -> dict:
    from vemscale.config import build_config
    from vemscale.train.pretrain import PretrainConfig, pretrain

    cfg = build_config(PretrainConfig, {
        "run_dir": run_dir, "data": SOURCES, "model": {"name": args.model}, "workers": workers, "use_gpu": False,
        "cpus_per_worker": max(1, args.threads // workers),
        "train": {"iterations": args.iterations, "batch_size": args.batch, "crop": args.crop,
                  "log_every": args.iterations, "checkpoint_every": args.iterations, "preview_every": 0},
    })
    m = pretrain(cfg)["metrics"]
    return {"loop_images_per_s": round(m["loop_images_per_s"], 2), "step_images_per_s": round(m["images_per_s"], 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--model", default="tiny")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = p.parse_args(argv)
    from vemscale.raycluster import ensure_ray

    out: dict = {"model": args.model, "batch": args.batch, "crop": args.crop, "iterations": args.iterations,
                 "threads": args.threads}
    out.update(augmentation_vs_training(args))
    print(f"augmentation (RETINA pair, CPU): {out['augment_images_per_s']:.1f} images/s; "
          f"training step incl. augmentation: {out['train_step_images_per_s']:.1f} images/s "
          f"(augmentation = {100 * out['augment_share_of_step']:.1f}% of a step)", flush=True)
    ensure_ray(num_cpus=args.threads)
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            out[f"ray_{workers}_workers"] = r = ray_pretrain(args, workers, tmp)
        print(f"Ray Train pre-training, {workers} worker(s) x {max(1, args.threads // workers)} thread(s): "
              f"{r['loop_images_per_s']:.1f} images/s", flush=True)
    out["speedup_2_vs_1"] = round(out["ray_2_workers"]["loop_images_per_s"] / out["ray_1_workers"]["loop_images_per_s"], 3)
    print(f"2 vs 1 workers: x{out['speedup_2_vs_1']:.2f}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
