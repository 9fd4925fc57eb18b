"""Segmentation models: TransUNet (RETINA) and UNet-ResNet (CEM500K baseline), behind a registry.

``create_model("tiny" | "base" | "transunet_tiny" | "transunet_base" | "unet_resnet50" | ..., in_chans,
num_classes, **overrides)``; every model follows the :class:`SegmentationModel` contract (``cnn``,
``decoder``, ``head`` submodules, ``parameter_groups()``, ``encode(x)``).
"""

from __future__ import annotations

from typing import Any

from .common import GROUP_NAMES, SegmentationModel
from .registry import ALIASES, create_model, list_models, register_model, resolve_name
from .ensemble import Ensemble
from .pixel import PixelLinear
from .transunet import TRANSUNET_SIZES, TransUNet
from .unet_resnet import UNET_RESNET_SIZES, UNetResNet


@register_model
def transunet_tiny(**kwargs: Any) -> TransUNet:
    """TransUNet small enough to train on a CPU (~2M parameters)."""
    return TransUNet(**{**TRANSUNET_SIZES["transunet_tiny"], **kwargs})


@register_model
def transunet_base(**kwargs: Any) -> TransUNet:
    """TransUNet R50-ViT-B/16, the configuration of the TransUNet and RETINA papers."""
    return TransUNet(**{**TRANSUNET_SIZES["transunet_base"], **kwargs})


@register_model
def unet_resnet50(**kwargs: Any) -> UNetResNet:
    """UNet with a ResNet50 encoder, the CEM500K paper's baseline."""
    return UNetResNet(**{**UNET_RESNET_SIZES["unet_resnet50"], **kwargs})


@register_model
def unet_resnet18(**kwargs: Any) -> UNetResNet:
    """UNet with a ResNet18 encoder: a small UNet-ResNet for tests."""
    return UNetResNet(**{**UNET_RESNET_SIZES["unet_resnet18"], **kwargs})


@register_model
def pixel_linear(**kwargs: Any) -> PixelLinear:
    """A 1x1 convolution: next to no compute, for measuring the block engine itself (bench.scale)."""
    return PixelLinear(**kwargs)


@register_model
def ensemble(**kwargs: Any) -> Ensemble:
    """The mean probability of several models (`members`: their specs), written by `vemscale ensemble`."""
    return Ensemble(**kwargs)


__all__ = [
    "Ensemble",
    "PixelLinear",
    "ALIASES",
    "GROUP_NAMES",
    "SegmentationModel",
    "TransUNet",
    "UNetResNet",
    "create_model",
    "list_models",
    "register_model",
    "resolve_name",
]
