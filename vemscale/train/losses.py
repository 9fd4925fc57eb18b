"""Segmentation losses: cross-entropy plus soft Dice over the foreground classes.

Pixels labelled `IGNORE` (255: pseudo-labels a teacher was unsure of) count in neither term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vemscale.train.data import IGNORE


def _probs_onehot(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and one-hot targets (B,K,H,W), both zero at IGNORE pixels."""
    k = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    valid = target != IGNORE
    onehot = F.one_hot(torch.where(valid, target, 0), k).permute(0, 3, 1, 2).to(probs)
    keep = valid.unsqueeze(1).to(probs)
    return probs * keep, onehot * keep


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the pixels not labelled IGNORE (0, with gradients, when there are none)."""
    if not bool((target != IGNORE).any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice of the foreground classes (1..K-1), pooled over the batch."""
    k = logits.shape[1]
    probs, onehot = _probs_onehot(logits, target)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    return 1 - dice[1:].mean() if k > 1 else 1 - dice.mean()


def retina_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """RETINA's 0.5 CE + 0.5 Dice (BaderLab/RETINA trainer.py:82-91, utils.py:12-66): two classes are its
    binary case (softmax over two logits = a sigmoid of their difference; BinaryDiceLoss of the foreground,
    plain sums), more classes its multi-class DiceLoss (squared sums in the denominator, averaged over every
    class, background included); each pooled over the batch, smooth 1e-5."""
    k = logits.shape[1]
    probs, onehot = _probs_onehot(logits, target)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    if k == 2:
        dice_loss = 1 - (2 * inter[1] + smooth) / (probs[:, 1].sum() + onehot[:, 1].sum() + smooth)
    else:
        dice = (2 * inter + smooth) / ((probs * probs).sum(dims) + onehot.sum(dims) + smooth)
        dice_loss = (1 - dice).mean()
    return 0.5 * cross_entropy(logits, target) + 0.5 * dice_loss


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "ce_dice") -> torch.Tensor:
    """`ce`, `dice`, `ce_dice` (their sum) or `retina` (0.5 CE + 0.5 Dice) for logits (B,K,H,W), ids (B,H,W)."""
    if kind == "retina":
        return retina_loss(logits, target)
    if kind == "ce":
        return cross_entropy(logits, target)
    if kind == "dice":
        return soft_dice_loss(logits, target)
    return cross_entropy(logits, target) + soft_dice_loss(logits, target)
