"""A model ensemble: several fine-tuned checkpoints as one checkpoint whose prediction is their mean probability.

`vemscale ensemble DEST A B C` writes DEST; infer, evaluate and export then use it as any checkpoint. Averaging
the probabilities of models trained with different seeds (Lakshminarayanan et al. 2017, deep ensembles) is
label-free: on a new microscope it needs no target labels, unlike choosing one seed by its target score.
The members must agree on everything inference reads from a checkpoint (classes, channels, normalisation, tile,
margin, planes, voxel size, TTA), so the ensemble predicts each tile exactly as its members would; the first
member's input histogram serves `infer match_histogram=checkpoint`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vemscale.errors import UserError

log = logging.getLogger(__name__)

# what inference reads from a checkpoint's metadata besides the model: the members must agree on all of it
SHARED_META = ("classes", "normalization", "tile", "margin", "tta", "voxel_size_xyz", "planes")


class Ensemble(nn.Module):
    """Members' mean class probability; forward returns its log (softmax of it = the mean), as DihedralTTA does."""

    def __init__(self, members: list[dict[str, Any]], in_chans: int = 1, num_classes: int = 2) -> None:
        super().__init__()
        from vemscale.models.registry import create_model

        if len(members) < 2:
            raise UserError(f"an ensemble needs at least 2 member models, got {len(members)}")
        if any(m.get("name") == "ensemble" for m in members):
            raise UserError("an ensemble's members must be single models, not ensembles: list their members instead")
        for m in members:
            if int(m.get("in_chans", 1)) != in_chans or int(m.get("num_classes", 2)) != num_classes:
                raise UserError(f"ensemble member {m.get('name')} has in_chans={m.get('in_chans')}, num_classes="
                                f"{m.get('num_classes')}; the ensemble has {in_chans} and {num_classes}")
        self.members = nn.ModuleList(create_model(**m) for m in members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = None
        for member in self.members:
            p = member(x).float().softmax(1)
            mean = p if mean is None else mean + p
        return torch.log(mean / len(self.members))


def build_ensemble(members: list[str], dest: str | Path) -> dict[str, Any]:
    """Write checkpoint `dest` holding every member's weights; every member is read and checked before it is."""
    from vemscale.checkpoint import CheckpointMeta, checkpoint_location, load_checkpoint, save_checkpoint

    if len(members) < 2:
        raise UserError(f"vemscale ensemble needs at least 2 member checkpoints, got {len(members)}")
    dest = Path(dest)
    if dest.resolve() in {Path(m).resolve() for m in members if "://" not in str(m)}:
        raise UserError(f"the ensemble's destination {str(dest)!r} is one of its members; write it elsewhere")
    models, metas = [], []
    for m in members:
        model, meta = load_checkpoint(m)  # UserError when unreadable
        if meta.kind != "segmentation":
            raise UserError(f"checkpoint {m!r} is a {meta.kind} checkpoint; an ensemble averages fine-tuned "
                            "segmentation models (vemscale finetune)")
        if meta.model.get("name") == "ensemble":
            raise UserError(f"checkpoint {m!r} is itself an ensemble; list its members instead")
        models.append(model)
        metas.append(meta)
    first = metas[0]
    for m, meta in zip(members[1:], metas[1:]):
        diffs = [f"{k}: {getattr(first, k)!r} in {members[0]!r}, {getattr(meta, k)!r} here" for k in SHARED_META
                 if getattr(meta, k) != getattr(first, k)]
        for k in ("in_chans", "num_classes"):
            if meta.model.get(k) != first.model.get(k):
                diffs.append(f"model {k}: {first.model.get(k)!r} in {members[0]!r}, {meta.model.get(k)!r} here")
        if diffs:
            raise UserError(f"checkpoint {m!r} cannot join the ensemble, it is used differently at inference: "
                            + "; ".join(diffs) + ". Ensemble models fine-tuned with the same data settings")
    from vemscale.models.registry import create_model

    spec = {"members": [meta.model for meta in metas]}
    ensemble = create_model("ensemble", int(first.model.get("in_chans", 1)), int(first.model.get("num_classes", 2)),
                            **spec)
    for target, model in zip(ensemble.members, models):
        target.load_state_dict(model.state_dict())
    meta = CheckpointMeta(
        kind="segmentation", model=ensemble.spec, iteration=0,
        metrics={"members": [{"checkpoint": checkpoint_location(m), "iteration": meta.iteration,
                              **{k: meta.metrics[k] for k in ("val_iou", "best_val_iou") if k in meta.metrics}}
                             for m, meta in zip(members, metas)]},
        input_histogram=first.input_histogram,
        **{k: getattr(first, k) for k in SHARED_META})
    save_checkpoint(dest, ensemble, meta)
    return {"checkpoint": str(dest), "members": len(members), "model": [m.get("name") for m in spec["members"]]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dest", help="the ensemble checkpoint directory to write")
    parser.add_argument("members", nargs="+", help="two or more fine-tuned checkpoints (e.g. the seeds of one arm)")


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    out = build_ensemble(args.members, args.dest)
    log.info("wrote %s: the mean of %d models (%s)", out["checkpoint"], out["members"], ", ".join(out["model"]))
    return out
