"""Batched augmentations in torch, so they run on whatever device the worker trains on.

Geometric transforms apply to image and labels alike; intensity transforms touch the image only.
"""

from __future__ import annotations

import torch

from vemscale.config import Strict


class AugmentConfig(Strict):
    """Fine-tuning augmentations: flips, rot90 (square crops), brightness/contrast jitter."""

    flips: bool = True
    rot90: bool = True
    brightness: float = 0.1  # additive shift, in units of the normalised image's std, uniform in +-value
    contrast: float = 0.1  # multiplicative factor uniform in 1 +- value


def geometric(img: torch.Tensor, lab: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random flips and 90-degree rotations of img (B,C,H,W) and lab (B,H,W)."""
    b = img.shape[0]
    if cfg.flips:
        fy = torch.rand(b, generator=gen) < 0.5
        fx = torch.rand(b, generator=gen) < 0.5
        img = torch.where(fy.view(-1, 1, 1, 1).to(img.device), img.flip(-2), img)
        lab = torch.where(fy.view(-1, 1, 1).to(lab.device), lab.flip(-2), lab)
        img = torch.where(fx.view(-1, 1, 1, 1).to(img.device), img.flip(-1), img)
        lab = torch.where(fx.view(-1, 1, 1).to(lab.device), lab.flip(-1), lab)
    if cfg.rot90 and img.shape[-1] == img.shape[-2]:
        k = torch.randint(0, 4, (b,), generator=gen)
        img = torch.stack([torch.rot90(img[i], int(k[i]), dims=(-2, -1)) for i in range(b)])
        lab = torch.stack([torch.rot90(lab[i], int(k[i]), dims=(-2, -1)) for i in range(b)])
    return img, lab


def intensity(img: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Per-sample brightness shift and contrast scaling of a normalised image batch (B,C,H,W)."""
    b = img.shape[0]
    if cfg.contrast > 0:
        c = 1 + (torch.rand(b, generator=gen) * 2 - 1) * cfg.contrast
        mean = img.mean(dim=(1, 2, 3), keepdim=True)
        img = (img - mean) * c.view(-1, 1, 1, 1).to(img) + mean
    if cfg.brightness > 0:
        s = (torch.rand(b, generator=gen) * 2 - 1) * cfg.brightness
        img = img + s.view(-1, 1, 1, 1).to(img)
    return img
