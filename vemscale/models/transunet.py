"""TransUNet (Chen et al. 2021; the RETINA pre-training paper's segmentation network) from timm parts.

A ResNetV2 (StdConv + GroupNorm, as in timm's R50 hybrid ViT) gives skips at 1/2, 1/4, 1/8 and a 1/16
feature map; a 1x1 patch embedding turns that into tokens for a ViT encoder with learned absolute position
embeddings (resampled to the input's token grid); TransUNet's cascaded upsampler decodes to full resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import GroupNormAct, StdConv2dSame, resample_abs_pos_embed, trunc_normal_
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import Block
from torch import nn

from .common import SegmentationModel, UNetDecoder

PATCH_STRIDE = 16  # the CNN reduces by 16; the patch embedding is 1x1 on top of that


class TransformerEncoder(nn.Module):
    """Position embeddings (for a base token grid, resampled to any other), ViT blocks, final LayerNorm."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        grid_size: tuple[int, int],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # stochastic depth rising linearly over the blocks (plain floats: builds on the meta device too)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding (1, gh*gw, D) for a gh x gw token grid (bicubic resampling)."""
        return resample_abs_pos_embed(
            self.pos_embed, new_size=list(grid), old_size=list(self.grid_size), num_prefix_tokens=0
        )

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """tokens: (B, gh*gw, D) in row-major grid order -> (B, gh*gw, D)."""
        x = self.pos_drop(tokens + self.pos_embed_for(grid))
        return self.norm(self.blocks(x))


class TransUNet(SegmentationModel):
    """R50-ViT hybrid encoder with TransUNet's cascaded upsampler (three CNN skips, four x2 upsamplings).

    Submodules: ``cnn`` (ResNetV2 incl. stem), ``patch_embed`` (1x1 conv to the ViT width),
    ``transformer`` (:class:`TransformerEncoder`), ``decoder`` (:class:`UNetDecoder`), ``head`` (conv3x3
    to ``num_classes`` logits). Input H, W: any multiples of 16.
    """

    # vemscale.models.groups: state_dict key patterns of the five groups (disjoint, covering every tensor)
    PARAM_GROUPS = {
        "cnn": r"^cnn\.",
        "embed": r"^patch_embed\.|^transformer\.pos_embed$",
        "vit_blocks": r"^transformer\.(blocks|norm)\.",
        "decoder": r"^decoder\.",
        "head": r"^head\.",
    }
    input_multiple = PATCH_STRIDE

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 2,
        layers: Sequence[int] = (3, 4, 9),
        channels: Sequence[int] = (256, 512, 1024),
        stem_chs: int = 64,
        norm_groups: int = 32,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        img_size: int = 224,
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        head_width: int = 512,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(layers) != 3 or len(channels) != 3:
            raise ValueError(f"TransUNet needs 3 CNN stages (1/4, 1/8, 1/16), got layers={layers}")
        if len(decoder_channels) != 4:
            raise ValueError(f"TransUNet decodes 1/16 -> 1/1 in 4 blocks, got {decoder_channels}")
        if img_size % PATCH_STRIDE:
            raise ValueError(f"img_size must be a multiple of {PATCH_STRIDE}, got {img_size}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.encode_channels = embed_dim

        self.cnn = ResNetV2(
            layers=list(layers),
            channels=tuple(channels),
            num_classes=0,
            global_pool="",
            in_chans=in_chans,
            stem_chs=stem_chs,
            preact=False,
            stem_type="same",
            conv_layer=partial(StdConv2dSame, eps=1e-8),
            norm_layer=partial(GroupNormAct, num_groups=norm_groups),
        )
        # feature_info: stem (1/2), stages 0..2 (1/4, 1/8, 1/16)
        feat_chs = [f["num_chs"] for f in self.cnn.feature_info]
        self.patch_embed = nn.Conv2d(feat_chs[3], embed_dim, kernel_size=1)
        grid = img_size // PATCH_STRIDE
        self.transformer = TransformerEncoder(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            grid_size=(grid, grid),
            mlp_ratio=mlp_ratio,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        self.decoder = UNetDecoder(
            in_chs=embed_dim,
            skip_chs=(feat_chs[2], feat_chs[1], feat_chs[0]),
            out_chs=tuple(decoder_channels),
            head_chs=head_width,
        )
        self.head = nn.Conv2d(self.decoder.out_chs, num_classes, kernel_size=3, padding=1)

    def _cnn_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the ResNetV2; return the 1/16 map and the skips deepest first (1/8, 1/4, 1/2)."""
        skips: list[torch.Tensor] = []
        for name, layer in self.cnn.stem.named_children():
            x = layer(x)
            if name == "norm":  # after stem conv + norm/act, before the max pool: 1/2
                skips.append(x)
        for stage in self.cnn.stages:
            x = stage(x)
            skips.append(x)
        # skips = [1/2, 1/4, 1/8, 1/16]; the last is the transformer's input, not a skip
        return x, skips[-2::-1]

    def _tokens_to_map(self, feat: torch.Tensor) -> torch.Tensor:
        """Patch-embed the 1/16 CNN map, run the transformer, fold tokens back to (B, D, h, w)."""
        x = self.patch_embed(feat)
        b, d, h, w = x.shape
        tokens = self.transformer(x.flatten(2).transpose(1, 2), (h, w))
        return tokens.transpose(1, 2).reshape(b, d, h, w)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer's output as a feature map (B, embed_dim, H/16, W/16)."""
        self.check_input(x)
        feat, _ = self._cnn_features(x)
        return self._tokens_to_map(feat)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The transformer's map (B, embed_dim, H/16, W/16) and the CNN skips (1/8, 1/4, 1/2)."""
        self.check_input(x)
        feat, skips = self._cnn_features(x)
        return self._tokens_to_map(feat), skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> logits (B, num_classes, H, W)."""
        return self.decode(*self.features(x))


# Named sizes. Each is the keyword arguments of TransUNet on top of its defaults.
TRANSUNET_SIZES: dict[str, dict] = {
    # R50-ViT-B/16 as in the TransUNet paper (timm's vit_base_r50_s16 hybrid, 1/16 tokens).
    "transunet_base": {},
    # CPU-sized: for tests, tutorials and quick runs on a laptop.
    "transunet_tiny": dict(
        layers=(1, 1, 1),
        channels=(64, 128, 256),
        stem_chs=32,
        norm_groups=8,
        embed_dim=192,
        depth=4,
        num_heads=3,
        mlp_ratio=2.0,
        decoder_channels=(64, 32, 16, 16),
        head_width=128,
    ),
}
