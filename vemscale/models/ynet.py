"""Y-Net (Roels et al. 2019; the Attention Y-Net of Franco-Barranco et al. 2022): a segmentation model's encoder
shared with a second decoder that reconstructs the input image, so unlabeled target images train the encoder.

`YNet` wraps any encoder-decoder `SegmentationModel`; the reconstruction branch mirrors the segmentation
decoder's widths but has no skips (the reference's AutoEncoder_decoder; with skips, copying the input through
them would be trivial) and a linear head to the input's channels. Only the segmentation model is exported
as the checkpoint; the branch lives in the training state.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import SegmentationModel, UNetDecoder


class ReconstructionBranch(nn.Module):
    """Deepest encoder map -> the image (B, in_chans, H, W), through a skip-less copy of the model's decoder."""

    def __init__(self, net: SegmentationModel) -> None:
        super().__init__()
        dec = net.decoder
        if not isinstance(dec, UNetDecoder) or not net.encode_channels:
            raise ValueError(f"{type(net).__name__} has no encoder-decoder to share; multitask needs e.g. tiny, "
                             "base or unet_resnet50")
        head_chs = dec.conv_more[0].out_channels if not isinstance(dec.conv_more, nn.Identity) else None
        widths = tuple(b.conv2[0].out_channels for b in dec.blocks)
        self.decoder = UNetDecoder(in_chs=net.encode_channels, skip_chs=(), out_chs=widths, head_chs=head_chs)
        self.head = nn.Conv2d(self.decoder.out_chs, net.in_chans, kernel_size=3, padding=1)

    def forward(self, deep: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(deep, []))


class YNet(nn.Module):
    """`net` (the segmentation model) + `reconstruction` (its second decoder); forward gives both outputs."""

    def __init__(self, net: SegmentationModel) -> None:
        super().__init__()
        self.net = net
        self.reconstruction = ReconstructionBranch(net)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        deep, skips = self.net.features(x)
        return self.net.decode(deep, skips), self.reconstruction(deep)
