"""`vemscale <stage>`: a thin command line over the stage functions.

Each stage lives in its own module exposing `add_arguments(parser)` and `run_cli(args) -> dict`; the dict
(paths written, metrics) is printed as one JSON object on the last line of stdout when `--json` is given.
Modules are imported lazily so `vemscale --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

from vemscale.errors import UserError

# stage name -> (module, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "ingest": ("vemscale.io.ingest", "convert a TIFF/HDF5/MRC/slice folder into an OME-Zarr image"),
    "curate": ("vemscale.curate.run", "a pre-training corpus from many volumes/image folders: sample, filter, de-duplicate"),
    "pretrain": ("vemscale.train.pretrain", "self-supervised pre-training on unlabeled EM (RETINA or MoCoV2, Ray Train)"),
    "finetune": ("vemscale.train.finetune", "fine-tune a segmentation model on labelled volumes (Ray Train)"),
    "sweep": ("vemscale.tune.run", "fine-tuning over arms x hyperparameters x seeds on Ray Tune, with statistics and plots"),
    "select": ("vemscale.train.select_runs", "the morphology rule across runs (e.g. seeds): the checkpoint closest to the source's shapes"),
    "ensemble": ("vemscale.models.ensemble", "several fine-tuned checkpoints (e.g. seeds) as one: their mean probability"),
    "evaluate": ("vemscale.eval.evaluate", "score a prediction against ground truth (IoU, F1, precision, recall, MFD)"),
    "infer": ("vemscale.infer.run", "predict a whole volume blockwise on a Ray Data actor pool"),
    "instances": ("vemscale.objects.run", "objects from a prediction: ids across blocks, a per-object table, plots"),
    "convert": ("vemscale.models.convert", "published encoder weights (timm R50-ViT, TransUNet/RETINA, ResNet-50/MoCo) -> a checkpoint"),
    "export": ("vemscale.export.run", "write any volume as a Neuroglancer precomputed layer (+ pyramid, meshes)"),
    "view": ("vemscale.export.view", "serve layers to a Neuroglancer viewer and print its URL (or take a screenshot)"),
    "demo": ("vemscale.demo", "generate an EM-like volume, fine-tune briefly, infer and score it"),
}


def _stage_of(argv: list[str]) -> str | None:
    """The stage named on the command line (the first argument that is not an option), if any."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in STAGES else None
    return None


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `stage`'s module is imported (all of them when None), so `vemscale --help` stays fast and
    a stage whose module fails to import fails loudly when it is used, instead of vanishing from the list."""
    parser = argparse.ArgumentParser(prog="vemscale", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, (module, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
        p.set_defaults(_module=module)
        if stage is None or name == stage:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_stage_of(argv) or "")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.stage:
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        result: dict[str, Any] = module.run_cli(args) or {}
    except (UserError, FileNotFoundError) as err:
        print(f"vemscale {args.stage}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a disk that fills or a store that refuses mid-run: say what to do, not a traceback
        from vemscale.io.writable import storage_hint

        hint = storage_hint(err)
        if hint is None or args.verbose:  # -v keeps the whole traceback
            raise
        print(f"vemscale {args.stage}: error: {hint}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.flush()
        print(json.dumps(result, default=str))
    return 1 if result.get("failed") else 0  # e.g. a sweep whose report lists failed trials


if __name__ == "__main__":
    sys.exit(main())
