"""A per-pixel linear classifier (a 1x1 convolution): the cheapest model the engine runs.

Not a segmentation model worth training; it exists so the block engine's own costs (dispatch, reads,
writes, ledger) can be measured with next to no compute (`python -m vemscale.bench.scale`), and it follows
the same `SegmentationModel` contract, so a checkpoint of it goes through `vemscale infer` unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import SegmentationModel


class PixelLinear(SegmentationModel):
    """logits = W x + b per pixel; no encoder, no decoder."""

    PARAM_GROUPS = {"head": r"^head\."}
    input_multiple = 1

    def __init__(self, in_chans: int = 1, num_classes: int = 2) -> None:
        super().__init__()
        self.in_chans, self.num_classes = in_chans, num_classes
        self.cnn, self.decoder = nn.Identity(), nn.Identity()
        self.head = nn.Conv2d(in_chans, num_classes, kernel_size=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)
