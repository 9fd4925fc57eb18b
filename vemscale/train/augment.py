"""Fine-tuning augmentations in torch, batched, so they run on whatever device the worker trains on.

Geometric transforms apply to image and labels alike; intensity transforms touch the image only. Flips and
rot90 alone are exact pixel permutations; any rotation angle or random resized crop goes through the one
affine map of `vemscale.train.ssl_augment` (bilinear for the image, nearest for the labels), the code
pre-training uses too.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from vemscale.config import Strict

Range = tuple[float, float]


class AugmentConfig(Strict):
    """Fine-tuning augmentations: flips, rot90 (square crops), rotation, resized crop, brightness/contrast."""

    flips: bool = True
    rot90: bool = True
    rotate_degrees: float = Field(0.0, ge=0, le=180)  # a uniform angle in +-value (reflection at borders)
    p_rotate: float = Field(1.0, ge=0, le=1)
    p_resized_crop: float = Field(0.0, ge=0, le=1)  # RandomResizedCrop inside the sampled crop
    crop_scale: Range = (0.08, 1.0)
    crop_ratio: Range = (0.5, 1.5)
    # "mean": brightness in units of the normalised image's std, contrast around the image mean, always;
    # "albumentations": RandomBrightnessContrast on the [0, 1] image (alpha x + beta), with p_brightness_contrast
    brightness_contrast: Literal["mean", "albumentations"] = "mean"
    p_brightness_contrast: float = Field(1.0, ge=0, le=1)
    brightness: float = 0.1  # additive shift uniform in +-value
    contrast: float = 0.1  # multiplicative factor uniform in 1 +- value
    p_foreground_crop: float = Field(0.0, ge=0, le=1)  # crops around a labelled pixel (CropNonEmptyMaskIfExists)


def _affine(img: torch.Tensor, lab: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    from vemscale.train.ssl_augment import RetinaAugmentConfig, affine_params

    geo = RetinaAugmentConfig(flips=cfg.flips, rot90=cfg.rot90 and img.shape[-1] == img.shape[-2],
                              rotate_degrees=cfg.rotate_degrees, p_rotate=cfg.p_rotate,
                              p_resized_crop=cfg.p_resized_crop, crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio)
    b, c, h, w = img.shape
    theta = affine_params(b, geo, gen, img.device)
    grid = F.affine_grid(theta.to(img.dtype), [b, c, h, w], align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    lab = F.grid_sample(lab.unsqueeze(1).to(img.dtype), grid, mode="nearest", padding_mode="reflection",
                        align_corners=False)
    return img, lab.squeeze(1).round().long()


def geometric(img: torch.Tensor, lab: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random flips and 90-degree rotations (and, when set, rotations and resized crops) of img
    (B,C,H,W) and lab (B,H,W)."""
    if cfg.rotate_degrees > 0 or cfg.p_resized_crop > 0:
        return _affine(img, lab, cfg, gen)
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
    """Per-sample brightness shift and contrast scaling: of a normalised batch ("mean"), or of a [0, 1] batch
    clipped to [0, 1] ("albumentations")."""
    b = img.shape[0]
    if cfg.brightness_contrast == "albumentations":
        use = (torch.rand(b, generator=gen) < cfg.p_brightness_contrast).view(-1, 1, 1, 1).to(img.device)
        alpha = (1 + (torch.rand(b, generator=gen) * 2 - 1) * cfg.contrast).view(-1, 1, 1, 1).to(img)
        beta = ((torch.rand(b, generator=gen) * 2 - 1) * cfg.brightness).view(-1, 1, 1, 1).to(img)
        return torch.where(use, img * alpha + beta, img).clamp(0, 1)
    if cfg.contrast > 0:
        c = 1 + (torch.rand(b, generator=gen) * 2 - 1) * cfg.contrast
        mean = img.mean(dim=(1, 2, 3), keepdim=True)
        img = (img - mean) * c.view(-1, 1, 1, 1).to(img) + mean
    if cfg.brightness > 0:
        s = (torch.rand(b, generator=gen) * 2 - 1) * cfg.brightness
        img = img + s.view(-1, 1, 1, 1).to(img)
    return img
