"""Test-time augmentation: average a model's class probabilities over the 8 flips and 90-degree rotations of a tile.

EM sections have no preferred orientation, so the dihedral mean is a cheaper ensemble than training several
models (it costs 8 forward passes per tile). Each view is inverted before averaging, and every tile is treated
on its own, so blockwise and whole-volume predictions stay identical.
"""

from __future__ import annotations

import torch

VIEWS = (1, 8)  # 1: the tile as it is; 8: the dihedral group of the square (4 rotations x optional flip)


def view(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th dihedral view of (N, C, H, W) tiles: rotate by k % 4 quarter turns, then flip x when k >= 4."""
    t = torch.rot90(x, k % 4, (2, 3))
    return torch.flip(t, (3,)) if k >= 4 else t


def unview(y: torch.Tensor, k: int) -> torch.Tensor:
    """Undo `view`: flip back, then rotate back."""
    t = torch.flip(y, (3,)) if k >= 4 else y
    return torch.rot90(t, -(k % 4), (2, 3))


class DihedralTTA(torch.nn.Module):
    """Wraps a segmentation model; forward returns log of the mean softmax over the views (softmax of it = the mean)."""

    def __init__(self, model: torch.nn.Module, views: int = 8) -> None:
        super().__init__()
        if views not in VIEWS:
            raise ValueError(f"tta must be one of {VIEWS}, got {views}")
        self.model, self.views = model, views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"dihedral test-time augmentation needs square tiles, got {tuple(x.shape[-2:])}")
        mean = None
        for k in range(self.views):
            p = unview(self.model(view(x, k)).float().softmax(1), k)
            mean = p if mean is None else mean + p
        return torch.log(mean / self.views)


def with_tta(model: torch.nn.Module, views: int) -> torch.nn.Module:
    """`model` itself for views=1 (the bytes of a run without TTA do not change), else its dihedral mean."""
    return model if views == 1 else DihedralTTA(model, views)
