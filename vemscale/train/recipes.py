"""Named recipes: every parameter a paper's reference code sets, as config defaults under the user's keys.

    vemscale pretrain configs/pretrain_retina.yaml recipe=retina
    vemscale finetune configs/finetune_vnc_mito.yaml recipe=retina init=runs/pretrain_retina/checkpoint

A recipe's values replace the config file's (logged); keys given on the command line win over them. Budget keys
(iterations, batch size, workers) stay the user's: the references ran 256-image batches for 200 epochs on 16
GPUs. Values were read from BaderLab/RETINA (docs/recipes_reference.md has every one with its line).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["RECIPES", "recipe_values"]

# RETINA reconstruction pre-training: BaderLab/RETINA pretrainer.py / pretrain.py (albumentations 1.x defaults)
RETINA_PRETRAIN: dict[str, Any] = {
    "objective": "retina",  # pretrainer.py:145 MSE between output and the clean, normalised target
    "normalization": {"mean": [0.57287007], "std": [0.12740536]},  # pretrainer.py:114 (CEM500K norms)
    "train": {
        "crop": 224,  # pretrainer.py:120 RandomResizedCrop(224, 224)
        "optimizer": "sgd",  # pretrainer.py:146 SGD
        "lr": 0.003,  # pretrain.py:110
        "momentum": 0.9,  # pretrainer.py:146
        "weight_decay": 1e-4,  # pretrainer.py:146
        "poly_power": 0.9,  # pretrainer.py:168-170 lr (1 - it / max_it) ** 0.9
        # pretrainer.py:149 max_it = 5000 epochs, while the checkpoint fine-tuned is pretrain_200.pt: the LR
        # decays over 25x the run actually used (0.003 -> ~0.0029)
        "poly_horizon": 25.0,
        "warmup": 0,  # pretrainer.py:168-170: no warm-up
    },
    "augment": {
        "flips": True,  # pretrainer.py:117-118 HorizontalFlip, VerticalFlip p 0.5
        "rot90": False,  # pretrainer.py:116-121: no RandomRotate90
        "rotate_degrees": 90.0,  # pretrainer.py:119 Rotate(limit=90)
        "p_rotate": 0.5,  # pretrainer.py:119 (albumentations default p 0.5)
        "p_resized_crop": 1.0,  # pretrainer.py:120 (default p 1.0)
        "crop_scale": (0.08, 1.0),  # pretrainer.py:120
        "crop_ratio": (0.5, 1.5),  # pretrainer.py:120
        "p_brightness_contrast": 0.5,  # pretrainer.py:123 RandomBrightnessContrast (default p 0.5)
        "brightness": 0.3,  # pretrainer.py:123 brightness_limit
        "contrast": 0.3,  # pretrainer.py:123 contrast_limit
        "brightness_contrast": "albumentations",  # brightness_by_max=True default: alpha x + beta
        "p_noise": 0.5,  # pretrainer.py:124 GaussNoise (default p 0.5)
        "noise_var": (400 / 255**2, 1200 / 255**2),  # pretrain.py:111 var_limit (400, 1200) on 0-255
        "p_blur": 0.5,  # pretrainer.py:125 GaussianBlur() (default p 0.5)
        "blur_kernel": (3, 7),  # GaussianBlur default blur_limit (3, 7), sigma_limit 0: OpenCV's kernels
        "p_dropout": 0.5,  # pretrainer.py:128 CoarseDropout (default p 0.5)
        "dropout_holes": (1, 32),  # pretrain.py:112 max_holes 32, min_holes 1
        "dropout_size": 16,  # pretrainer.py:128 max_height = max_width = 16 (min_* default to max_*)
        "dropout_fill": 0.0,  # CoarseDropout fill_value 0 on the 8-bit image
        "order": ("brightness_contrast", "noise", "blur", "dropout"),  # pretrainer.py:122-129 augs2 order
    },
}

# RETINA fine-tuning: BaderLab/RETINA train.py / trainer.py, benchmark YAMLs at 11f75e1
RETINA_FINETUNE: dict[str, Any] = {
    "transfer": "retina",  # train.py:144-150 all keys but decoder and segmentation_head
    "freeze": "vit_blocks",  # train.py:151-159 transformer.encoder.* frozen for the whole run
    "train": {
        "crop": 224,  # cremi.yaml:48-60 CropNonEmptyMaskIfExists / RandomResizedCrop 224
        "optimizer": "sgd",  # trainer.py:94 SGD (the YAML's optim/wd keys are never read)
        "lr": 0.003,  # cremi.yaml:28 lr 0.003 (every benchmark)
        "momentum": 0.9,  # trainer.py:94
        "weight_decay": 1e-4,  # trainer.py:94
        "poly_power": 0.9,  # trainer.py:131-133
        "warmup": 0,  # trainer.py:131-133: no warm-up
        "loss": "retina",  # trainer.py:89-91, 121-124: 0.5 CE + 0.5 Dice (smooth 1e-5)
    },
    "augment": {
        "flips": True,  # cremi.yaml:66-67 HorizontalFlip, VerticalFlip p 0.5
        "rot90": False,  # no RandomRotate90 in the benchmark YAMLs
        "rotate_degrees": 180.0,  # cremi.yaml:61-62 Rotate(limit=180)
        "p_rotate": 0.5,  # Rotate default p 0.5
        "p_resized_crop": 1.0,  # cremi.yaml:52-60 RandomResizedCrop (default p 1.0)
        "crop_scale": (0.08, 1.0),  # cremi.yaml:52-60
        "crop_ratio": (0.5, 1.5),  # cremi.yaml:52-60
        "p_brightness_contrast": 0.5,  # cremi.yaml:63-65 RandomBrightnessContrast (default p 0.5)
        "brightness": 0.3,  # cremi.yaml:63-65
        "contrast": 0.3,  # cremi.yaml:63-65
        "brightness_contrast": "albumentations",  # brightness_by_max default: alpha x + beta on [0, 1]
        # cremi.yaml:48-51 CropNonEmptyMaskIfExists p 0.8 (cremi, kasthuri_pp, urocell; the others have none)
        "p_foreground_crop": 0.8,
    },
}

CEM500K_NORM = {"mean": [0.57287007], "std": [0.12740536]}  # cem-dataset mocov2_config.yaml:35-37

# CEM500K MoCoV2 pre-training: volume-em/cem-dataset pretraining/mocov2 (train_mocov2.py, mocov2_config.yaml)
CEM500K_PRETRAIN: dict[str, Any] = {
    "objective": "moco",  # train_mocov2.py:140 InfoNCE over the queue
    "model": {"name": "unet_resnet50"},  # mocov2_config.yaml:6 resnet50 (1-channel), fine-tuned as smp UNet
    "normalization": CEM500K_NORM,
    "moco": {
        "dim": 128,  # mocov2_config.yaml:26
        "queue": 65536,  # mocov2_config.yaml:27 K
        "momentum": 0.999,  # mocov2_config.yaml:28 m
        "temperature": 0.2,  # mocov2_config.yaml:29 T
        "hidden": 2048,  # builder.py:33-36 MLP head Linear(2048, 2048)-ReLU-Linear(2048, 128)
    },
    "train": {
        "crop": 224,  # train_mocov2.py:181 RandomResizedCrop(224)
        "optimizer": "sgd",  # train_mocov2.py:142-144
        "lr": 0.015,  # mocov2_config.yaml:12
        "momentum": 0.9,  # mocov2_config.yaml:16
        "weight_decay": 1e-4,  # mocov2_config.yaml:17
        "schedule": "step",  # mocov2_config.yaml:13-15, 32: cos False, x0.1 at epochs 120 and 160
        "milestones": (0.6, 0.8),  # 120 / 200 and 160 / 200 epochs (mocov2_config.yaml:8 epochs 200)
        "gamma": 0.1,  # train_mocov2.py:356-366
        "warmup": 0,  # no warm-up
    },
    "augment": {
        "flips": True,  # train_mocov2.py:185-186 RandomHorizontalFlip, RandomVerticalFlip (p 0.5)
        "rot90": False,  # no 90-degree rotations
        "rotate_degrees": 180.0,  # train_mocov2.py:180 RandomRotation(180)
        "p_rotate": 0.5,  # train_mocov2.py:180 RandomApply p 0.5
        "padding": "zeros",  # torchvision RandomRotation fill 0
        "p_resized_crop": 1.0,  # train_mocov2.py:181 always
        "crop_scale": (0.2, 1.0),  # train_mocov2.py:181 scale
        "crop_ratio": (3 / 4, 4 / 3),  # torchvision RandomResizedCrop default ratio
        "p_brightness_contrast": 1.0,  # train_mocov2.py:182 ColorJitter, not in RandomApply
        "brightness": 0.4,  # train_mocov2.py:182 ColorJitter(0.4, 0.4, ...)
        "contrast": 0.4,  # train_mocov2.py:182 (saturation, hue: no effect on grey images)
        "brightness_contrast": "torchvision",  # ColorJitter semantics
        "p_blur": 0.5,  # train_mocov2.py:183 RandomApply p 0.5
        "blur_sigma": (0.1, 2.0),  # dataset.py:103-112 GaussianBlur sigma U(0.1, 2)
        "blur_kernel": None,  # a Gaussian of that sigma (PIL radius = sigma)
        "p_noise": 0.5,  # train_mocov2.py:188 GaussNoise p 0.5
        "noise_var": (1e-5, 1e-4),  # dataset.py:114-127 variance on the [0, 1] scale
        "noise_log_var": True,  # dataset.py:114-127 log-uniform
        "p_dropout": 0.0,  # no CoarseDropout
        "order": ("brightness_contrast", "blur", "noise", "dropout"),  # train_mocov2.py:182-188
    },
}

# CEM500K fine-tuning of UNet-ResNet50: volume-em/cem-dataset evaluation/ (finetune.py, train_utils.py,
# benchmark_configs/lucchi_pp.yaml for the dataset-dependent values)
CEM500K_FINETUNE: dict[str, Any] = {
    "model": {"name": "unet_resnet50"},  # finetune.py:99 smp.Unet('resnet50', in_channels=1)
    "transfer": "encoder",  # utils.py:14-26 encoder_q.* (not fc) -> encoder.*
    "freeze": "encoder",  # finetune.py:133-164 finetune_layer none: the encoder frozen for the whole run
    "data": {"mean": CEM500K_NORM["mean"], "std": CEM500K_NORM["std"]},  # finetune.py:90-96 the checkpoint's norms
    "train": {
        "crop": 512,  # lucchi_pp.yaml:77-82 PadIfNeeded / RandomResizedCrop 512
        "optimizer": "adamw",  # train_utils.py:65-69 AdamW
        "lr": 0.003,  # lucchi_pp.yaml:38-41
        "weight_decay": 0.1,  # lucchi_pp.yaml:38-41
        "schedule": "onecycle",  # lucchi_pp.yaml:43 OneCycle (train_utils.py:74-76, PyTorch defaults)
        "warmup": 0,
        "loss": "ce",  # train_utils.py:86-96 BCE / CE, no Dice
    },
    "augment": {
        "flips": True,  # finetune.py:172-193 HorizontalFlip, VerticalFlip p 0.5
        "rot90": False,
        "rotate_degrees": 180.0,  # Rotate(limit=180)
        "p_rotate": 0.5,  # Rotate default p 0.5
        "p_resized_crop": 1.0,  # RandomResizedCrop (default p 1)
        "crop_scale": (0.08, 1.0),  # lucchi_pp.yaml augmentations
        "crop_ratio": (0.5, 1.5),
        "p_brightness_contrast": 0.5,  # RandomBrightnessContrast (default p 0.5)
        "brightness": 0.3,
        "contrast": 0.3,
        "brightness_contrast": "albumentations",
        "p_foreground_crop": 0.0,  # lucchi_pp has no CropNonEmptyMaskIfExists (cremi, kasthuri_pp do: p 0.8)
    },
}

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "retina": {"pretrain": RETINA_PRETRAIN, "finetune": RETINA_FINETUNE},
    "cem500k": {"pretrain": CEM500K_PRETRAIN, "finetune": CEM500K_FINETUNE},
}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


def recipe_values(name: str, stage: str) -> dict[str, Any]:
    """The config keys recipe `name` sets for `stage` (pretrain | finetune), as plain YAML-like values."""
    if name not in RECIPES or stage not in RECIPES[name]:
        from vemscale.config import ConfigError

        known = sorted(r for r in RECIPES if stage in RECIPES[r])
        raise ConfigError(f"recipe {name!r} has no {stage} values; known recipes: {known} (or none)")
    return _plain(RECIPES[name][stage])
