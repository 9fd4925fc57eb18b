"""Named recipes: `recipe=retina` sets the values BaderLab/RETINA's code uses (a list written from that code,
docs/recipes_reference.md, not from vemscale's recipe table), the augmentations produce the recipe's noise
variances and rotation angles when measured on images, and RETINA's loss equals its formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vemscale.config import apply_overrides, load_config
from vemscale.train.finetune import FinetuneConfig
from vemscale.train.pretrain import PretrainConfig

# written from BaderLab/RETINA pretrainer.py:114-170, pretrain.py:110-112 and albumentations 1.x defaults
RETINA_PRETRAIN_REFERENCE = [
    ("train.optimizer", "sgd"), ("train.lr", 0.003), ("train.momentum", 0.9), ("train.weight_decay", 1e-4),
    ("train.poly_power", 0.9), ("train.poly_horizon", 5000 / 200), ("train.warmup", 0), ("train.crop", 224),
    ("normalization.mean", [0.57287007]), ("normalization.std", [0.12740536]),
    ("augment.flips", True), ("augment.rot90", False), ("augment.rotate_degrees", 90.0), ("augment.p_rotate", 0.5),
    ("augment.p_resized_crop", 1.0), ("augment.crop_scale", (0.08, 1.0)), ("augment.crop_ratio", (0.5, 1.5)),
    ("augment.p_brightness_contrast", 0.5), ("augment.brightness", 0.3), ("augment.contrast", 0.3),
    ("augment.brightness_contrast", "albumentations"), ("augment.p_noise", 0.5),
    ("augment.noise_var", (400 / 255 ** 2, 1200 / 255 ** 2)), ("augment.p_blur", 0.5), ("augment.blur_kernel", (3, 7)),
    ("augment.p_dropout", 0.5), ("augment.dropout_holes", (1, 32)), ("augment.dropout_size", 16),
    ("augment.dropout_fill", 0.0), ("augment.order", ("brightness_contrast", "noise", "blur", "dropout")),
]
# written from BaderLab/RETINA train.py:144-159, trainer.py:89-133 and the benchmark YAMLs (cremi.yaml @11f75e1)
RETINA_FINETUNE_REFERENCE = [
    ("transfer", "retina"), ("freeze", "vit_blocks"), ("train.optimizer", "sgd"), ("train.lr", 0.003),
    ("train.momentum", 0.9), ("train.weight_decay", 1e-4), ("train.poly_power", 0.9), ("train.warmup", 0),
    ("train.loss", "retina"), ("train.crop", 224), ("augment.flips", True), ("augment.rot90", False),
    ("augment.rotate_degrees", 180.0), ("augment.p_rotate", 0.5), ("augment.p_resized_crop", 1.0),
    ("augment.crop_scale", (0.08, 1.0)), ("augment.crop_ratio", (0.5, 1.5)), ("augment.p_brightness_contrast", 0.5),
    ("augment.brightness", 0.3), ("augment.contrast", 0.3), ("augment.brightness_contrast", "albumentations"),
    ("augment.p_foreground_crop", 0.8),
]

# written from volume-em/cem-dataset pretraining/mocov2 (mocov2_config.yaml, train_mocov2.py:179-189, dataset.py)
CEM500K_PRETRAIN_REFERENCE = [
    ("objective", "moco"), ("model.name", "unet_resnet50"), ("moco.dim", 128), ("moco.queue", 65536),
    ("moco.momentum", 0.999), ("moco.temperature", 0.2), ("moco.hidden", 2048), ("train.optimizer", "sgd"),
    ("train.lr", 0.015), ("train.momentum", 0.9), ("train.weight_decay", 1e-4), ("train.schedule", "step"),
    ("train.milestones", (120 / 200, 160 / 200)), ("train.gamma", 0.1), ("train.crop", 224),
    ("normalization.mean", [0.57287007]), ("normalization.std", [0.12740536]),
    ("augment.rot90", False), ("augment.rotate_degrees", 180.0), ("augment.p_rotate", 0.5), ("augment.padding", "zeros"),
    ("augment.p_resized_crop", 1.0), ("augment.crop_scale", (0.2, 1.0)), ("augment.crop_ratio", (3 / 4, 4 / 3)),
    ("augment.p_brightness_contrast", 1.0), ("augment.brightness", 0.4), ("augment.contrast", 0.4),
    ("augment.brightness_contrast", "torchvision"), ("augment.p_blur", 0.5), ("augment.blur_sigma", (0.1, 2.0)),
    ("augment.p_noise", 0.5), ("augment.noise_var", (1e-5, 1e-4)), ("augment.noise_log_var", True),
    ("augment.p_dropout", 0.0),
]
# written from volume-em/cem-dataset evaluation/finetune.py, train_utils.py, benchmark_configs/lucchi_pp.yaml
CEM500K_FINETUNE_REFERENCE = [
    ("model.name", "unet_resnet50"), ("transfer", "encoder"), ("freeze", "encoder"), ("train.optimizer", "adamw"),
    ("train.lr", 0.003), ("train.weight_decay", 0.1), ("train.schedule", "onecycle"), ("train.loss", "ce"),
    ("train.crop", 512), ("data.mean", [0.57287007]), ("data.std", [0.12740536]), ("augment.rotate_degrees", 180.0),
    ("augment.p_rotate", 0.5), ("augment.p_resized_crop", 1.0), ("augment.crop_scale", (0.08, 1.0)),
    ("augment.crop_ratio", (0.5, 1.5)), ("augment.p_brightness_contrast", 0.5), ("augment.brightness", 0.3),
    ("augment.contrast", 0.3), ("augment.brightness_contrast", "albumentations"),
]


def _get(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("recipe, model, config, reference", [
    ("retina", PretrainConfig, "configs/pretrain_retina.yaml", RETINA_PRETRAIN_REFERENCE),
    ("retina", FinetuneConfig, "configs/finetune_vnc_mito.yaml", RETINA_FINETUNE_REFERENCE),
    ("cem500k", PretrainConfig, "configs/pretrain_moco.yaml", CEM500K_PRETRAIN_REFERENCE),
    ("cem500k", FinetuneConfig, "configs/finetune_vnc_mito.yaml", CEM500K_FINETUNE_REFERENCE),
])
def test_recipes_set_the_reference_codes_values_over_the_config_file(recipe, model, config, reference):
    cfg = load_config(model, config, [f"recipe={recipe}"])
    for path, value in reference:
        got = _get(cfg, path)
        if isinstance(value, (tuple, list)):
            assert list(got) == pytest.approx(list(value)) if not isinstance(value[0], str) else list(got) == list(value), path
        else:
            assert got == pytest.approx(value) if isinstance(value, float) else got == value, path
    plain = load_config(model, config, ["recipe=none"])  # the file as written, without the recipe
    assert sum(_get(plain, p) != _get(cfg, p) for p, _ in reference) >= 5  # the recipe did replace the file's


def test_command_line_keys_win_over_the_recipe_and_sweep_arms_can_name_it():
    from vemscale.config import ConfigError
    from vemscale.tune.config import compose

    cfg = load_config(FinetuneConfig, "configs/finetune_vnc_mito.yaml",
                      ["recipe=retina", "train.lr=0.01", "augment.rotate_degrees=30"])
    assert cfg.train.lr == 0.01 and cfg.augment.rotate_degrees == 30 and cfg.train.optimizer == "sgd"
    again = apply_overrides(cfg, ["train.batch_size=4"])  # a later override keeps the earlier keys
    assert again.train.lr == 0.01 and again.augment.rotate_degrees == 30 and again.train.batch_size == 4
    # a sweep trial: base file <- recipe named by the arm <- the sweep's own keys
    base = load_config(FinetuneConfig, "configs/finetune_vnc_mito.yaml").model_dump(mode="json")
    state = {"base": base, "cwd": ".", "sweep": {"overrides": {"train.iterations": 10},
                                                  "arms": {"retina": {"recipe": "retina"}, "plain": {}},
                                                  "resources": {"workers": 1}}}
    trial = FinetuneConfig.model_validate(compose(state, "retina", 3, {"train.lr": 0.02}, "/tmp/t"))
    assert trial.freeze == "vit_blocks" and trial.train.loss == "retina" and trial.augment.rotate_degrees == 180
    assert trial.train.lr == 0.02 and trial.train.iterations == 10 and trial.train.seed == 3
    plain = FinetuneConfig.model_validate(compose(state, "plain", 3, {}, "/tmp/t"))
    assert plain.train.optimizer == "adamw" and plain.freeze == "none"
    with pytest.raises(ConfigError, match="recipe"):
        load_config(FinetuneConfig, "configs/finetune_vnc_mito.yaml", ["recipe=cem"])


def test_retina_blur_draws_albumentations_kernel_sizes_and_opencvs_kernels():
    from vemscale.train.augment import degrade

    aug = load_config(PretrainConfig, None, ["recipe=retina"]).augment
    only_blur = aug.model_copy(update={"p_brightness_contrast": 0.0, "p_noise": 0.0, "p_dropout": 0.0, "p_blur": 1.0})
    impulse = torch.zeros(500, 1, 15, 15)
    impulse[:, :, 7, 7] = 1.0
    out = degrade(impulse, only_blur, torch.Generator().manual_seed(6))
    # OpenCV getGaussianKernel(k, 0) for k <= 7 (its fixed small kernels), written from OpenCV's source
    tables = {3: [1, 2, 1], 5: [1, 4, 6, 4, 1], 7: [1, 3.5, 7, 9, 7, 3.5, 1]}
    seen = {3: 0, 5: 0, 7: 0}
    for o in out[:, 0]:
        k = int((o[7] > 0).sum())
        row = torch.tensor(tables[k], dtype=torch.float64)
        row = row / row.sum()
        ref = torch.zeros(15, 15, dtype=torch.float64)
        ref[7 - k // 2: 8 + k // 2, 7 - k // 2: 8 + k // 2] = torch.outer(row, row)
        assert torch.allclose(o.double(), ref, atol=1e-6), k
        seen[k] += 1
    share = {k: v / 500 for k, v in seen.items()}
    assert abs(share[3] - 0.2) < 0.06 and abs(share[5] - 0.4) < 0.07 and abs(share[7] - 0.4) < 0.07  # randrange(3, 8), even + 1


def test_albumentations_contrast_scales_around_zero_and_vemscales_around_the_mean():
    from vemscale.train.augment import degrade

    aug = load_config(PretrainConfig, None, ["recipe=retina"]).augment
    only_bc = aug.model_copy(update={"p_noise": 0.0, "p_blur": 0.0, "p_dropout": 0.0, "p_brightness_contrast": 1.0,
                                     "brightness": 0.0})
    x = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(7)) * 0.55 + 0.2  # never clipped at 1.3x
    ratio = degrade(x, only_bc, torch.Generator().manual_seed(8)) / x  # RandomBrightnessContrast: alpha x
    assert float(ratio.flatten(1).std(1).max()) < 1e-5 and 0.7 <= float(ratio.min()) and float(ratio.max()) <= 1.3
    around_mean = degrade(x, only_bc.model_copy(update={"brightness_contrast": "mean"}), torch.Generator().manual_seed(8))
    assert float((around_mean / x).flatten(1).std(1).max()) > 1e-3  # not a pure scaling


def test_retina_noise_has_the_reference_variance_range_and_probability():
    from vemscale.train.augment import degrade

    aug = load_config(PretrainConfig, None, ["recipe=retina"]).augment
    only_noise = aug.model_copy(update={"p_brightness_contrast": 0.0, "p_blur": 0.0, "p_dropout": 0.0})
    x = torch.full((400, 1, 128, 128), 0.5)
    out = degrade(x, only_noise, torch.Generator().manual_seed(0))
    var = (out - 0.5).flatten(1).var(dim=1) * 255 ** 2  # on the 0-255 scale of albumentations' var_limit
    noisy = var > 1.0
    assert 0.42 < noisy.float().mean() < 0.58  # p 0.5: 400 draws, +-4 sigma
    v = var[noisy]
    assert v.min() > 400 * 0.97 and v.max() < 1200 * 1.03  # within var_limit (sampling error ~0.6 % per image)
    assert v.min() < 430 and v.max() > 1170  # and it spans it (uniform in variance)
    assert abs(float(v.mean()) - 800) < 40


def _angle_of(img: torch.Tensor) -> float:
    """Rotation (degrees) of an x-ramp image, from a plane fitted to its central disk."""
    h, w = img.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64) - (h - 1) / 2,
                            torch.arange(w, dtype=torch.float64) - (w - 1) / 2, indexing="ij")
    disk = (yy ** 2 + xx ** 2) < (0.4 * h) ** 2
    a = torch.stack([xx[disk], yy[disk], torch.ones_like(xx[disk])], dim=1)
    coef = torch.linalg.lstsq(a, img[0][disk].double().unsqueeze(1)).solution.squeeze(1)
    return math.degrees(math.atan2(float(coef[1]), float(coef[0])))


def test_retina_rotation_angles_measured_on_images_follow_the_recipe():
    from vemscale.train.augment import geometric

    aug = load_config(PretrainConfig, None, ["recipe=retina"]).augment
    rotate_only = aug.model_copy(update={"flips": False, "p_resized_crop": 0.0})
    ramp = torch.linspace(0, 1, 96).view(1, 1, 1, 96).expand(300, 1, 96, 96).contiguous()
    out = geometric(ramp, rotate_only, torch.Generator().manual_seed(1))
    angles = np.array([_angle_of(o) for o in out])
    turned = np.abs(angles) > 0.5
    assert 0.4 < turned.mean() < 0.6  # Rotate p 0.5
    assert np.abs(angles).max() <= 90.5 and np.abs(angles[turned]).max() > 80  # limit 90, reached
    assert abs(np.abs(angles[turned]).mean() - 45) < 6  # uniform in +-90


def test_finetune_geometry_moves_labels_with_the_image_and_crops_find_labels():
    from vemscale.train.augment import geometric_pair
    from vemscale.train.data import CropSampler, LabelledStack

    aug = load_config(FinetuneConfig, None, ["recipe=retina"]).augment
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    img = (0.5 + 0.5 * torch.sin(xx / 5) * torch.cos(yy / 7)).view(1, 1, 64, 64).expand(16, 1, 64, 64).contiguous()
    lab = (img[:, 0] > 0.5).long()
    out, out_lab = geometric_pair(img, lab, aug, torch.Generator().manual_seed(2))
    agree = ((out[:, 0] > 0.5).long() == out_lab).float().mean()
    unmoved = ((out[:, 0] > 0.5).long() == lab).float().mean()  # labels left where they were
    print(f"labels agree with the moved image: {agree:.3f} (unmoved labels: {unmoved:.3f})")
    assert agree > 0.93 and unmoved < 0.75  # only boundary voxels differ (nearest vs bilinear)
    assert out_lab.dtype == torch.long and set(out_lab.unique().tolist()) <= {0, 1}

    labels = np.zeros((1, 512, 512), np.uint8)
    labels[0, 400:404, 30:34] = 1  # one small labelled spot
    stack = LabelledStack(np.zeros((1, 1, 512, 512), np.uint8), labels, "spot", None)
    hits = [CropSampler([stack], 64, [0], seed=3, p_foreground=p).sample(200)[1].reshape(200, -1).any(1).mean()
            for p in (0.0, 0.8)]
    assert hits[0] < 0.1 and 0.7 < hits[1] < 0.9  # CropNonEmptyMaskIfExists p 0.8 (+ chance hits)


def test_retina_loss_equals_its_formula_binary_and_multiclass():
    from vemscale.train.losses import retina_loss

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 2, 16, 16, generator=g)
    target = torch.randint(0, 2, (3, 16, 16), generator=g)
    d = logits[:, 1] - logits[:, 0]  # RETINA's binary model has one logit: softmax of two = sigmoid of this
    p = torch.sigmoid(d)
    t = target.float()
    dice = (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5)  # utils.py BinaryDiceLoss
    ref = 0.5 * F.binary_cross_entropy_with_logits(d, t) + 0.5 * (1 - dice)
    assert float(retina_loss(logits, target)) == pytest.approx(float(ref), rel=1e-5)

    logits = torch.randn(3, 4, 16, 16, generator=g)
    target = torch.randint(0, 4, (3, 16, 16), generator=g)
    probs = torch.softmax(logits, 1)
    per = []
    for i in range(4):  # utils.py DiceLoss: squared sums, every class, mean
        s, t = probs[:, i], (target == i).float()
        per.append(1 - (2 * (s * t).sum() + 1e-5) / ((s * s).sum() + (t * t).sum() + 1e-5))
    ref = 0.5 * F.cross_entropy(logits, target) + 0.5 * sum(per) / 4
    assert float(retina_loss(logits, target)) == pytest.approx(float(ref), rel=1e-5)


def test_step_and_onecycle_schedules_equal_torchs_schedulers():
    from vemscale.train.schedule import lr_at

    total = 50
    w = [torch.nn.Parameter(torch.zeros(1))]
    sgd = torch.optim.SGD(w, lr=0.015, momentum=0.9)
    step = torch.optim.lr_scheduler.MultiStepLR(sgd, milestones=[30, 40], gamma=0.1)  # 0.6, 0.8 of 50
    adamw = torch.optim.AdamW(w, lr=0.003, weight_decay=0.1)
    cycle = torch.optim.lr_scheduler.OneCycleLR(adamw, max_lr=0.003, total_steps=total)
    for it in range(total):
        lr, mom = lr_at({"lr": 0.015, "schedule": "step", "milestones": (0.6, 0.8), "gamma": 0.1}, it, total)
        assert lr == pytest.approx(sgd.param_groups[0]["lr"], rel=1e-9) and mom is None
        lr, mom = lr_at({"lr": 0.003, "schedule": "onecycle"}, it, total)
        assert lr == pytest.approx(adamw.param_groups[0]["lr"], rel=1e-9), it
        assert mom == pytest.approx(adamw.param_groups[0]["betas"][0], rel=1e-9), it
        sgd.step(), step.step(), adamw.step(), cycle.step()


def test_cem500k_noise_variance_is_log_uniform_in_its_range():
    from vemscale.train.augment import degrade

    aug = load_config(PretrainConfig, None, ["recipe=cem500k"]).augment
    only_noise = aug.model_copy(update={"p_brightness_contrast": 0.0, "p_blur": 0.0, "p_noise": 1.0})
    out = degrade(torch.full((400, 1, 128, 128), 0.5), only_noise, torch.Generator().manual_seed(5))
    var = (out - 0.5).flatten(1).var(dim=1)
    assert var.min() > 1e-5 * 0.95 and var.max() < 1e-4 * 1.05
    logs = np.log10(var.numpy())
    assert abs(float(np.median(logs)) + 4.5) < 0.08  # log-uniform: the median is the geometric middle, 10^-4.5
