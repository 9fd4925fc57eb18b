"""Segmentation losses: cross-entropy plus soft Dice over the foreground classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice of the foreground classes (1..K-1), pooled over the batch."""
    k = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target, k).permute(0, 3, 1, 2).to(probs)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1 - dice[1:].mean() if k > 1 else 1 - dice.mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "ce_dice") -> torch.Tensor:
    """`ce`, `dice` or `ce_dice` (their sum) for logits (B,K,H,W) and class ids (B,H,W)."""
    if kind == "ce":
        return F.cross_entropy(logits.float(), target)
    if kind == "dice":
        return soft_dice_loss(logits, target)
    return F.cross_entropy(logits.float(), target) + soft_dice_loss(logits, target)
