"""Learning-rate schedules by iteration: poly (RETINA), step (CEM500K's MoCoV2), one-cycle (CEM500K's
fine-tuning, PyTorch OneCycleLR's defaults), set on the optimizer before each step."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["poly_lr", "lr_at", "set_schedule"]


def poly_lr(base_lr: float, it: int, total: int, power: float, warmup: int = 0) -> float:
    """Poly decay (1 - it/total)^power after an optional linear warm-up."""
    if warmup and it < warmup:
        return base_lr * (it + 1) / warmup
    return base_lr * (1 - min(it, total - 1) / total) ** power


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def lr_at(tcfg: dict[str, Any], it: int, total: int) -> tuple[float, float | None]:
    """(learning rate, momentum or None to keep the optimizer's) for iteration `it` of `total`.

    step: lr x gamma per milestone passed (milestones as fractions of `total`); onecycle: PyTorch OneCycleLR
    with pct_start 0.3, cosine annealing, div_factor 25, final_div_factor 1e4 and momentum cycled 0.95 -> 0.85
    -> 0.95 (beta1 for AdamW)."""
    base = float(tcfg["lr"])
    kind = tcfg.get("schedule", "poly")
    if kind == "poly":
        horizon = int(round(total * float(tcfg.get("poly_horizon", 1.0))))
        return poly_lr(base, it, horizon, tcfg["poly_power"], tcfg.get("warmup", 0)), None
    if kind == "step":
        passed = sum(it >= round(float(m) * total) for m in tcfg.get("milestones", (0.6, 0.8)))
        return base * float(tcfg.get("gamma", 0.1)) ** passed, None
    initial, final = base / 25.0, base / 25.0 / 1e4
    up = float(0.3 * total) - 1
    down = float(total) - 1
    if it <= up:
        pct = it / up if up > 0 else 1.0
        return _cos(initial, base, pct), _cos(0.95, 0.85, pct)
    pct = (it - up) / (down - up)
    return _cos(base, final, pct), _cos(0.85, 0.95, pct)


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, momentum: float | None) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if momentum is not None:
            if "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
            else:
                group["momentum"] = momentum
