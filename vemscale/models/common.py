"""Pieces shared by the segmentation model families: the submodule/parameter-group contract and the
UNet-style decoder blocks (upsample, concat skip, two conv-BN-ReLU)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .groups import GROUPS as GROUP_NAMES  # the five parameter groups every model names (possibly empty)


class SegmentationModel(nn.Module):
    """Base class: a 2D encoder-decoder mapping (B, in_chans, H, W) to logits (B, num_classes, H, W).

    Subclasses give the state_dict key patterns of their parameter groups in ``PARAM_GROUPS``
    (:mod:`vemscale.models.groups`); transfer and freeze select tensors through them.
    """

    #: group name -> regex over state_dict keys (cnn, embed, vit_blocks, decoder, head).
    PARAM_GROUPS: ClassVar[dict[str, str]] = {}

    #: H and W of the input must be multiples of this (the encoder's total stride).
    input_multiple: int = 16
    #: Channels of the feature map returned by :meth:`encode`.
    encode_channels: int = 0
    in_chans: int = 1
    num_classes: int = 2
    #: Set by ``create_model``: the JSON-serialisable arguments that rebuild this architecture.
    spec: dict[str, Any]

    def parameter_groups(self) -> dict[str, list[str]]:
        """Each group (cnn, embed, vit_blocks, decoder, head; disjoint, covering every parameter) and each named
        set (encoder, retina, vit, transformer) -> the names of its parameters."""
        from .groups import parameter_groups

        return parameter_groups(self)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder's deepest map (``encode_channels`` channels) and the decoder's skips, deepest first."""
        raise NotImplementedError(f"{type(self).__name__} has no encoder-decoder split")

    def decode(self, deep: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Logits from :meth:`features`' output; ``forward(x) == decode(*features(x))``."""
        return self.head(self.decoder(deep, skips))

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless x is (B, in_chans, H, W) with H and W multiples of ``input_multiple``."""
        if x.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channel(s), got {x.shape[1]}")
        h, w = x.shape[-2:]
        m = self.input_multiple
        if h % m or w % m:
            raise ValueError(
                f"input height and width must be multiples of {m}, got {h}x{w}; "
                f"pad or crop the tile (e.g. to {-(-h // m) * m}x{-(-w // m) * m})"
            )


class Conv2dBNReLU(nn.Sequential):
    """3x3 (by default) convolution without bias, BatchNorm, ReLU."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
        )


class DecoderBlock(nn.Module):
    """Bilinear x2 upsampling, concatenation with an optional skip feature, then two conv-BN-ReLU.

    ``align_corners=False`` (pixel-centre aligned) so the upsampled grid nests exactly in the skip's grid.
    """

    def __init__(self, in_chs: int, skip_chs: int, out_chs: int) -> None:
        super().__init__()
        self.skip_chs = skip_chs
        self.conv1 = Conv2dBNReLU(in_chs + skip_chs, out_chs)
        self.conv2 = Conv2dBNReLU(out_chs, out_chs)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    """A cascade of :class:`DecoderBlock`; block i consumes ``skips[i]`` (deepest first) when it exists.

    Each block doubles the resolution, so ``len(out_chs)`` upsamplings take the input feature map from
    stride ``2**len(out_chs)`` to full resolution; blocks beyond ``len(skip_chs)`` run without a skip.
    With ``head_chs`` a conv-BN-ReLU first maps the input to that width (TransUNet's ``conv_more``).
    """

    def __init__(
        self,
        in_chs: int,
        skip_chs: tuple[int, ...],
        out_chs: tuple[int, ...],
        head_chs: int | None = None,
    ) -> None:
        super().__init__()
        out_chs = tuple(out_chs)
        if len(skip_chs) > len(out_chs):
            raise ValueError(f"{len(skip_chs)} skips but only {len(out_chs)} decoder blocks")
        self.conv_more: nn.Module = nn.Identity()
        if head_chs is not None:
            self.conv_more = Conv2dBNReLU(in_chs, head_chs)
            in_chs = head_chs
        skips = tuple(skip_chs) + (0,) * (len(out_chs) - len(skip_chs))
        ins = (in_chs, *out_chs[:-1])
        self.blocks = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in zip(ins, skips, out_chs))
        self.out_chs = out_chs[-1]

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv_more(x)
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
        return x
