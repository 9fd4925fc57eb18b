"""`vemscale infer [configs/infer.yaml] key=value ...` and `jobs/infer.py`: thin wrappers over `run_infer`.

Overrides are the InferConfig keys, e.g. `input=vol.zarr output=pred checkpoint=ckpt block_shape=16,512,512
halo=0,64,64 workers=2 mode=orthoplane write=labels roi=0:64,0:1024,0:1024 overwrite=true`.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence




def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="[CONFIG.yaml] key=value",
                        help="an optional YAML config, then overrides: input= output= checkpoint= block_shape=z,y,x "
                             "halo=z,y,x workers=N mode=xy|orthoplane write=labels|probabilities|both roi=z0:z1,y0:y1,x0:x1 "
                             "overwrite=true ...")


def load_infer_config(items: Sequence[str]) -> Any:
    """InferConfig from [config.yaml] key=value...; `roi=` is taken verbatim (YAML would read 10:20 as 620)."""
    from vemscale.config import load_cli_config
    from vemscale.infer.config import InferConfig

    cfg = load_cli_config(InferConfig, items, verbatim=("roi",))
    if cfg.roi is not None and cfg.roi.strip().lower() in ("", "none", "null", "~"):
        cfg.roi = None
    elif cfg.roi is not None:
        cfg.roi = cfg.roi.strip()
    return cfg


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_infer_config(args.items)  # a bad key fails here, before the pipeline imports torch and Ray
    from vemscale.infer.pipeline import run_infer

    return run_infer(cfg)
