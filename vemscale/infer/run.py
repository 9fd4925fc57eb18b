"""`vemscale infer [configs/infer.yaml] key=value ...` and `jobs/infer.py`: thin wrappers over `run_infer`.

Overrides are the InferConfig keys, e.g. `input=vol.zarr output=pred checkpoint=ckpt block_shape=16,512,512
halo=0,64,64 workers=2 mode=orthoplane write=labels roi=0:64,0:1024,0:1024 overwrite=true`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from vemscale.errors import UserError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="[CONFIG.yaml] key=value",
                        help="an optional YAML config, then overrides: input= output= checkpoint= block_shape=z,y,x "
                             "halo=z,y,x workers=N mode=xy|orthoplane write=labels|probabilities|both roi=z0:z1,y0:y1,x0:x1 "
                             "overwrite=true ...")


def load_infer_config(items: Sequence[str]) -> Any:
    """InferConfig from [config.yaml] key=value...; `roi=` is taken verbatim (YAML would read 10:20 as 620)."""
    from vemscale.config import load_config
    from vemscale.infer.pipeline import InferConfig

    items = list(items)
    path = items.pop(0) if items and "=" not in items[0] else None
    roi = [i.partition("=")[2] for i in items if i.startswith("roi=")]
    cfg = load_config(InferConfig, path, [i for i in items if not i.startswith("roi=")])
    if roi:
        text = roi[-1].strip()
        cfg.roi = None if text.lower() in ("", "none", "null", "~") else text
    return cfg


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    from vemscale.infer.pipeline import run_infer

    return run_infer(load_infer_config(args.items))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for `ray job submit -- python jobs/infer.py ...`: 0 on success, 2 on bad input, 1 on failure."""
    parser = argparse.ArgumentParser(prog="jobs/infer.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        result = run_cli(args)
    except UserError as err:
        print(f"infer: error: {err}", file=sys.stderr)
        return 2
    except Exception:
        log.exception("infer failed")
        return 1
    print(json.dumps(result, default=str))
    return 0
