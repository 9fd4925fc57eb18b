"""Multitask fine-tuning (`multitask.target=<volume>`): segmentation of labelled source crops plus reconstruction
of source and unlabeled target crops through the same encoder (a Y-Net, `vemscale.models.ynet`).

The loss is beta * segmentation loss (source) + alpha * MSE(reconstruction, input) over the source and target
batches, images on the 0-1 scale as the reference feeds them. `schedule=ynet` runs the three training steps of
the Attention Y-Net reference (danifranco/EM_domain_adaptation, Attention_Y-Net/Att_YNet.py) as phases of one
run, their lengths in the proportion of the reference's epochs; `schedule=constant` keeps `alpha`, `beta`.
The run's own optimizer and learning-rate schedule span all phases (the reference restarts SGD/Adam per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from vemscale.config import Strict
from vemscale.train.augment import AugmentConfig
from vemscale.train.schedule import set_schedule
from vemscale.train.loop import SegmentationStep
from vemscale.train.losses import segmentation_loss


class MultitaskConfig(Strict):
    target: str  # the unlabeled target volume (its crops are reconstructed, never segmented)
    slices: str | None = None  # "z0:z1"; all slices when omitted
    max_slices: int = Field(64, gt=0)  # the central run of at most this many slices of that range is held
    schedule: Literal["ynet", "constant"] = "ynet"
    alpha: float = Field(0.98, ge=0)  # constant: reconstruction (MSE) weight; Att_YNet.py alphas[0]
    beta: float = Field(0.02, ge=0)  # constant: segmentation weight; Att_YNet.py betas[0]


@dataclass(frozen=True)
class Phase:
    name: str
    share: float  # of the run's iterations
    alpha: float  # reconstruction weight
    beta: float  # segmentation weight
    target: bool  # reconstruct target crops too (the reference's just_src = False)
    freeze_cnn: bool  # the CNN encoder is not updated (the reference freezes up to its bottleneck)


# Att_YNet.py: epochs [50, 40, 100], alphas [0.98, 1, 0], betas [0.02, 0, 1], just_src [F, F, T], freeze [F, F, T]
YNET_PHASES = (
    Phase("joint", 50 / 190, 0.98, 0.02, True, False),
    Phase("reconstruction", 40 / 190, 1.0, 0.0, True, False),
    Phase("segmentation", 100 / 190, 0.0, 1.0, False, True),
)


def phase_at(cfg: dict, it: int, total: int) -> Phase:
    """The phase iteration `it` (0-based) of `total` belongs to."""
    if cfg["schedule"] == "constant":
        return Phase("constant", 1.0, float(cfg["alpha"]), float(cfg["beta"]), True, False)
    edge = 0.0
    for p in YNET_PHASES:
        edge += p.share * total
        if it < round(edge):
            return p
    return YNET_PHASES[-1]


class MultitaskStep(SegmentationStep):
    """One optimisation step of a `YNet` on a source batch (crops, labels) and a target batch (crops)."""

    def __init__(self, model, optimizer, normalizer, augment: AugmentConfig, loss: str, device, seed: int):
        super().__init__(model, optimizer, normalizer, augment, loss, device, seed)
        ynet = model.module if hasattr(model, "module") else model
        self.groups = {
            "segmentation": [p for n, p in ynet.net.named_parameters() if n.startswith(("decoder.", "head."))],
            "reconstruction": list(ynet.reconstruction.parameters()),
            "cnn": [p for n, p in ynet.net.named_parameters() if n.startswith("cnn.")],
        }

    def __call__(self, imgs: np.ndarray, labs: np.ndarray, target: np.ndarray, lr: float, phase: Phase) -> dict:
        xs, ys = self._input(imgs, labs)
        xt, _ = self._input(target, None)
        set_schedule(self.optimizer, lr, None)
        self.model.train()
        # one forward over both batches: every parameter takes part in every step (DDP needs that)
        x = torch.cat([xs, xt]) if phase.target else xs
        seg, rec = self.model(x)
        seg_loss = segmentation_loss(seg[: len(xs)], ys, self.loss)
        rec_loss = F.mse_loss(rec, x * self.std + self.mean)  # the input on the 0-1 scale
        loss = phase.beta * seg_loss + phase.alpha * rec_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # what a phase does not train keeps no gradient, so the optimizer leaves it alone (weight decay too)
        idle = (["segmentation"] if phase.beta == 0 else []) + (["reconstruction"] if phase.alpha == 0 else [])
        idle += ["cnn"] if phase.freeze_cnn else []
        for name in idle:
            for p in self.groups[name]:
                p.grad = None
        self.optimizer.step()
        return {"loss": float(loss.detach()), "loss_seg": float(seg_loss.detach()), "loss_rec": float(rec_loss.detach())}
