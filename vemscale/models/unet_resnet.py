"""UNet-ResNet: the CEM500K paper's baseline (a ResNet50 encoder under a UNet decoder), built from timm.

The encoder's five feature maps (1/2 .. 1/32) feed a UNet decoder (upsample, concat skip, two
conv-BN-ReLU) back to full resolution; a conv3x3 head gives the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from torch import nn

from .common import SegmentationModel, UNetDecoder


class UNetResNet(SegmentationModel):
    """timm ResNet (features_only) encoder + UNet decoder. Input H, W: any multiples of 32.

    Submodules: ``cnn`` (the encoder), ``decoder`` (:class:`UNetDecoder`), ``head`` (conv3x3 to
    ``num_classes`` logits). There is no transformer: its embed and vit_blocks groups are empty.
    """

    PARAM_GROUPS = {"cnn": r"^cnn\.", "decoder": r"^decoder\.", "head": r"^head\."}  # no embed, no vit_blocks
    input_multiple = 32

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 2,
        backbone: str = "resnet50",
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"UNet-ResNet decodes 1/32 -> 1/1 in 5 blocks, got {decoder_channels}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        # pretrained=False always: weights come from our own pre-training checkpoints, never the hub.
        self.cnn = timm.create_model(
            backbone,
            pretrained=False,
            features_only=True,
            in_chans=in_chans,
            drop_path_rate=drop_path_rate,
        )
        feat_chs = list(self.cnn.feature_info.channels())  # strides 2, 4, 8, 16, 32
        if list(self.cnn.feature_info.reduction()) != [2, 4, 8, 16, 32]:
            raise ValueError(f"backbone {backbone!r} must give features at strides 2..32")
        self.encode_channels = feat_chs[-1]
        self.decoder = UNetDecoder(
            in_chs=feat_chs[-1], skip_chs=tuple(feat_chs[-2::-1]), out_chs=tuple(decoder_channels)
        )
        self.head = nn.Conv2d(self.decoder.out_chs, num_classes, kernel_size=3, padding=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest encoder feature map (B, C, H/32, W/32)."""
        self.check_input(x)
        return self.cnn(x)[-1]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The 1/32 map and the skips (1/16 .. 1/2)."""
        self.check_input(x)
        feats = self.cnn(x)
        return feats[-1], feats[-2::-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> logits (B, num_classes, H, W)."""
        return self.decode(*self.features(x))


UNET_RESNET_SIZES: dict[str, dict] = {
    "unet_resnet50": dict(backbone="resnet50"),
    "unet_resnet18": dict(backbone="resnet18", decoder_channels=(128, 64, 32, 16, 16)),
}
