"""Stage `demo`: the whole flow on a generated EM-like volume, with nothing to download or point at.

generate (OME-Zarr image + mitochondria labels) -> short fine-tune of `tiny` on Ray Train -> blockwise
inference on a Ray Data actor pool -> evaluation of the held-out slices. Everything lands in `run_dir`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pydantic import Field

from vemscale.config import StageConfig, load_config


class DemoConfig(StageConfig):
    run_dir: Path = Path("runs/demo")
    shape: tuple[int, int, int] = (16, 256, 256)  # z,y,x of the generated volume
    voxel_size_xyz: tuple[float, float, float] = (5.0, 5.0, 50.0)
    train_slices: str = "0:12"
    val_slices: str = "12:16"
    iterations: int = Field(120, gt=0)
    batch_size: int = 4
    crop: int = 128
    seed: int = 0
    workers: int = 1


def write_demo_volume(cfg: DemoConfig) -> tuple[str, str]:
    """Generate the synthetic volume and write image and labels as OME-Zarr; returns their paths."""
    from vemscale.io.volume import create_ome_zarr
    from vemscale.synth import synthetic_em

    image, labels = synthetic_em(cfg.shape, seed=cfg.seed)
    paths = []
    for name, arr in (("image.ome.zarr", image), ("labels.ome.zarr", labels)):
        url = str((cfg.run_dir / "data" / name).resolve())
        store = create_ome_zarr(url, arr.shape, arr.dtype, (8, 128, 128), cfg.voxel_size_xyz, overwrite=True)
        store.write(arr).result()
        paths.append(url)
    return paths[0], paths[1]


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from vemscale.config import build_config
    from vemscale.eval.evaluate import evaluate, format_table
    from vemscale.infer.pipeline import InferConfig, run_infer
    from vemscale.train.finetune import FinetuneConfig, finetune

    run_dir = cfg.run_dir.resolve()
    print(f"[demo] 1/4 generating a {cfg.shape} EM-like volume with mitochondria labels in {run_dir / 'data'}")
    image, labels = write_demo_volume(cfg)
    print(f"[demo] 2/4 fine-tuning tiny TransUNet for {cfg.iterations} iterations on slices {cfg.train_slices}")
    ft = build_config(FinetuneConfig, {
        "run_dir": str(run_dir / "finetune"),
        "data": {
            "train": [{"image": image, "labels": labels, "slices": cfg.train_slices}],
            "val": [{"image": image, "labels": labels, "slices": cfg.val_slices}],
            "classes": ["background", "mitochondria"],
        },
        "model": {"name": "tiny"},
        "train": {"iterations": cfg.iterations, "batch_size": cfg.batch_size, "crop": cfg.crop, "seed": cfg.seed,
                  "workers": cfg.workers, "val_every": cfg.iterations, "checkpoint_every": cfg.iterations,
                  "log_every": max(1, cfg.iterations // 6)},
        "tiles": {"tile": 128, "margin": 16},
    })
    trained = finetune(ft)
    print(f"[demo] 3/4 predicting the whole volume blockwise into {run_dir / 'prediction'}")
    inf = build_config(InferConfig, {
        "run_dir": str(run_dir / "infer"), "input": image, "output": str(run_dir / "prediction"),
        "checkpoint": trained["checkpoint"], "block_shape": [8, 128, 128], "output_chunks": [8, 128, 128],
        "workers": cfg.workers, "overwrite": True,
    })
    inferred = run_infer(inf)
    print(f"[demo] 4/4 scoring the held-out slices {cfg.val_slices}")
    lo, hi = (int(v) for v in cfg.val_slices.split(":"))
    scores = evaluate(inferred["outputs"]["labels"], labels, class_names=["background", "mitochondria"],
                      z_range=slice(lo, hi))
    print(format_table(scores))
    result = {
        "image": image, "labels": labels, "checkpoint": trained["checkpoint"],
        "prediction": inferred["outputs"], "finetune_val_iou": trained["metrics"].get("val_iou"),
        "iou": scores["mean_iou"], "f1": scores["mean_f1"], "infer_summary": inferred["summary"],
    }
    from vemscale.io.atomic import write_text

    write_text(run_dir / "demo_result.json", json.dumps(result, indent=2, default=str))
    print(f"[demo] done: held-out IoU {scores['mean_iou']:.3f}; results in {run_dir}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. iterations=300 run_dir=runs/demo2")


def run_cli(args: argparse.Namespace) -> dict:
    return run_demo(load_config(DemoConfig, None, args.overrides))
