"""RETINA augmentations: geometric ones shared by input and target, degradations on the input only."""

from __future__ import annotations

import pytest
import torch

from vemscale.config import ConfigError, build_config
from vemscale.train.augment import (
    Normalize,
    RetinaAugmentConfig,
    coarse_dropout,
    degrade,
    geometric,
    retina_pair,
    two_views,
)

NO_DEGRADE = dict(p_brightness_contrast=0.0, p_noise=0.0, p_blur=0.0, p_dropout=0.0)
NO_GEOMETRY = dict(flips=False, rot90=False, rotate_degrees=0.0, p_resized_crop=0.0)
NORM = Normalize([0.57287], [0.12741], "cpu")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int = 6, size: int = 64) -> torch.Tensor:
    return torch.rand(b, 1, size, size, generator=_gen(123)) * 0.8 + 0.1


def test_geometric_is_shared_by_input_and_target():
    x = _images()
    cfg = RetinaAugmentConfig(**NO_DEGRADE)
    inp, target = retina_pair(x, cfg, _gen(), NORM)
    assert torch.equal(inp, target)  # no degradation: the input is exactly the transformed target
    assert not torch.allclose(target, NORM(x), atol=1e-3)  # and the geometry did change it
    # the same draws, taken apart: target = normalize(geometric(x)), input = normalize(degrade(that))
    cfg = RetinaAugmentConfig()
    g = _gen(5)
    inp, target = retina_pair(x, cfg, g, NORM)
    g2 = _gen(5)
    clean = geometric(x, cfg, g2)
    assert torch.equal(target, NORM(clean))
    assert torch.equal(inp, NORM(degrade(clean, cfg, g2)))


def test_degradations_touch_the_input_only():
    x = _images()
    cfg = RetinaAugmentConfig(**NO_GEOMETRY, p_brightness_contrast=1.0, p_noise=1.0, p_blur=1.0, p_dropout=1.0)
    inp, target = retina_pair(x, cfg, _gen(), NORM)
    assert torch.allclose(target, NORM(x), atol=1e-4)  # identity geometry: the target is the clean image
    assert inp.shape == target.shape == x.shape and inp.dtype == torch.float32
    assert (inp - target).abs().mean(dim=(1, 2, 3)).min() > 0.05  # every sample degraded


def test_flips_and_rot90_are_exact_pixel_moves():
    x = _images()
    y = geometric(x, RetinaAugmentConfig(flips=True, rot90=True, p_resized_crop=0.0), _gen(1))
    for i in range(x.shape[0]):
        moves = [torch.rot90(t, k, dims=(-2, -1)) for k in range(4) for t in (x[i], x[i].flip(-1))]
        assert any(torch.allclose(y[i], m, atol=1e-4) for m in moves)


def test_resized_crop_zooms_in():
    ramp = torch.arange(64, dtype=torch.float32).view(1, 1, 1, 64).expand(4, 1, 64, 64) / 64
    cfg = RetinaAugmentConfig(**NO_GEOMETRY | {"p_resized_crop": 1.0}, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    y = geometric(ramp, cfg, _gen())
    slope = (y[..., 1:] - y[..., :-1]).mean(dim=(1, 2, 3))
    assert torch.allclose(slope, torch.full_like(slope, 0.5 / 64), rtol=0.05)  # half the width, stretched 2x
    assert geometric(ramp, cfg, _gen(), out_size=32).shape == (4, 1, 32, 32)


def test_coarse_dropout_hole_counts():
    x = _images(b=32)
    cfg = RetinaAugmentConfig(p_dropout=1.0, dropout_holes=(1, 32), dropout_size=16, dropout_fill=0.0)
    y, n = coarse_dropout(x, cfg, _gen())
    assert int(n.min()) >= 1 and int(n.max()) <= 32
    holes = (y == 0).sum(dim=(1, 2, 3))  # x has no zeros, so zeros are holes
    assert bool((holes >= 16 * 16).all()) and bool((holes <= n * 16 * 16).all())
    y0, n0 = coarse_dropout(x, cfg.model_copy(update={"p_dropout": 0.0}), _gen())
    assert int(n0.max()) == 0 and torch.equal(y0, x)


def test_blur_noise_and_clipping():
    x = _images()
    blur = RetinaAugmentConfig(**(NO_DEGRADE | {"p_blur": 1.0}), blur_sigma=(2.0, 2.0))
    assert degrade(x, blur, _gen()).var() < 0.5 * x.var()
    noise = RetinaAugmentConfig(**(NO_DEGRADE | {"p_noise": 1.0}), noise_std=(0.05, 0.05))
    y = degrade(x, noise, _gen())
    assert 0.03 < float((y - x).std()) < 0.06 and float(y.min()) >= 0 and float(y.max()) <= 1


def test_two_views_differ():
    q, k = two_views(_images(), RetinaAugmentConfig(), _gen(), NORM)
    assert q.shape == k.shape and not torch.allclose(q, k)


@pytest.mark.parametrize("bad", [{"crop_scale": [0.5, 0.2]}, {"crop_scale": [0.0, 1.0]}, {"dropout_holes": [3, 1]},
                                 {"p_noise": 1.5}, {"contrast": 1.0}, {"brightnes": 0.1}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        build_config(RetinaAugmentConfig, bad)


def test_crops_stay_inside_the_image_under_quarter_turns():
    """A non-square crop turned by 90 degrees must still lie inside the patch: no reflected pixels."""
    from vemscale.train.augment import affine_params

    cfg = RetinaAugmentConfig(flips=True, rot90=True, rotate_degrees=0.0, p_resized_crop=1.0,
                              crop_scale=(0.08, 0.6), crop_ratio=(0.5, 1.5))
    theta = affine_params(4096, cfg, torch.Generator().manual_seed(0), "cpu")
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    where = torch.einsum("bij,kj->bki", theta, corners)  # output corners -> input coordinates
    assert where.abs().max() <= 1.0 + 1e-6
    turned = (theta[:, 0, 0].abs() < 1e-6)  # quarter turns happened, with non-square crops among them
    assert turned.float().mean() > 0.4 and ((theta[:, 0, 1].abs() - theta[:, 1, 0].abs()).abs() > 0.05)[turned].any()


@pytest.mark.parametrize("shape", [(64, 64), (48, 80)], ids=["square", "non-square"])
def test_flip_and_quarter_turn_maps_move_pixels_exactly_for_images_and_labels(shape):
    """One geometry for both stages: the flip/quarter-turn maps `affine_params` draws are applied as exact pixel
    moves, equal to one of the 8 dihedral moves written with torch.flip/rot90, and to grid_sample's result."""
    import torch.nn.functional as F

    from vemscale.train.augment import AugmentConfig, affine_params, geometric_pair, is_pixel_move, move_pixels

    h, w = shape
    x = torch.rand(64, 2, h, w, generator=_gen(9))
    cfg = RetinaAugmentConfig(flips=True, rot90=h == w, p_resized_crop=0.0)
    theta = affine_params(64, cfg, _gen(3), "cpu")
    assert is_pixel_move(theta, (h, w), (h, w))
    y = move_pixels(x, theta)
    grid = F.affine_grid(theta, [64, 2, h, w], align_corners=False)
    assert torch.allclose(y, F.grid_sample(x, grid, mode="bilinear", align_corners=False), atol=1e-5)
    kinds = set()
    for i in range(64):
        moves = {(k, f): torch.rot90(x[i].flip(-1) if f else x[i], k, dims=(-2, -1))
                 for k in (range(4) if h == w else (0, 2)) for f in (False, True)}
        hit = [key for key, m in moves.items() if m.shape == y[i].shape and torch.equal(m, y[i])]
        assert hit, i
        kinds.add(hit[0])
    assert len(kinds) == (8 if h == w else 4)  # every move drawn
    lab = (torch.arange(h * w).view(1, h, w) % 7).expand(64, h, w).contiguous()
    img, moved = geometric_pair(x, lab, AugmentConfig(), _gen(4))
    assert moved.dtype == lab.dtype and torch.equal(torch.sort(moved.flatten(1))[0], torch.sort(lab.flatten(1))[0])
    assert not is_pixel_move(affine_params(4, RetinaAugmentConfig(p_resized_crop=1.0), _gen(), "cpu"), (h, w), (h, w))
