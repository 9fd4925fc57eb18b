"""Dihedral test-time augmentation: the mean over the 8 views, checked against numpy's rot90/flip, its symmetry,
its use at validation, and the checkpoint key that carries it to inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vemscale.infer.tiling import Normalizer, TileGrid, numpy_reader, predict_block_xy, predict_volume_xy
from vemscale.infer.tta import DihedralTTA, with_tta
from vemscale.models import create_model


def _model(classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("tiny", in_chans=1, num_classes=classes).eval()
    with torch.no_grad():
        model.head.weight.mul_(30.0)  # a random head predicts ~1/K everywhere; make the views disagree
    return model


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def numpy_dihedral_mean(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """Reference written with numpy: the 8 views by np.rot90 / np.flip, each inverted, probabilities averaged."""
    total = np.zeros((x.shape[0], model.num_classes, *x.shape[2:]), np.float64)
    for rot in range(4):
        for flip in (False, True):
            v = np.rot90(x, rot, axes=(2, 3))
            v = v[..., ::-1] if flip else v
            with torch.no_grad():
                p = _softmax(model(torch.from_numpy(np.ascontiguousarray(v))).numpy().astype(np.float64))
            p = p[..., ::-1] if flip else p
            total += np.rot90(p, -rot, axes=(2, 3))
    return total / 8


def test_dihedral_mean_equals_a_numpy_reference():
    model = _model()
    x = np.random.default_rng(0).normal(size=(3, 1, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ours = torch.softmax(DihedralTTA(model)(torch.from_numpy(x)), 1).numpy()
        plain = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    ref = numpy_dihedral_mean(model, x)
    assert np.abs(ours - ref).max() < 1e-5
    assert np.abs(plain - ref).max() > 1e-2  # the views disagree, so the test would see a missing or wrong view


def test_prediction_with_tta_commutes_with_rotation_and_flip():
    """The group mean is equivariant: predicting a rotated (or flipped) tile gives the rotated prediction."""
    model = _model(2)
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(2, 1, 48, 48)).astype(np.float32))
    tta = DihedralTTA(model)
    with torch.no_grad():
        base = torch.softmax(tta(x), 1)
        for t in (lambda a: torch.rot90(a, 1, (2, 3)), lambda a: torch.flip(a, (3,)), lambda a: a.transpose(2, 3)):
            assert torch.allclose(torch.softmax(tta(t(x)), 1), t(base), atol=1e-5)
        raw = torch.softmax(model(torch.rot90(x, 1, (2, 3))), 1)
        assert not torch.allclose(raw, torch.rot90(torch.softmax(model(x), 1), 1, (2, 3)), atol=1e-3)


def test_tiled_prediction_with_tta_does_not_depend_on_the_box():
    model = with_tta(_model(2), 8)
    vol = np.random.default_rng(2).integers(0, 255, (2, 70, 90), dtype=np.uint8)
    grid, norm = TileGrid(tile=48, margin=8), Normalizer(255.0, (0.5,), (0.2,))
    ref = predict_volume_xy(model, vol, grid, norm, batch_size=3)
    box = (slice(1, 2), slice(16, 70), slice(0, 50))
    part = predict_block_xy(model, numpy_reader(vol), box, vol.shape, grid, norm, batch_size=3)
    assert np.array_equal(part, ref[(slice(None), *box)])


def test_validation_scores_the_tta_prediction():
    from vemscale.train.data import LabelledStack
    from vemscale.train.loop import validate

    model = _model(2)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (1, 2, 64, 64), dtype=np.uint8)
    labels = rng.integers(0, 2, (2, 64, 64), dtype=np.uint8)
    grid, norm = TileGrid(tile=32, margin=8), Normalizer(255.0, (0.5,), (0.2,))
    stack = LabelledStack(image, labels, "s", None)
    for views in (1, 8):
        probs = predict_volume_xy(with_tta(model, views), image, grid, norm, batch_size=2)
        pred, truth = probs.argmax(0) == 1, labels == 1
        expected = (pred & truth).sum() / (pred | truth).sum()
        assert validate(model, [stack], grid, norm, 2, "cpu", 2, views)["val_iou"] == pytest.approx(expected, abs=1e-12)
    assert validate(model, [stack], grid, norm, 2, "cpu", 2, 8) != validate(model, [stack], grid, norm, 2, "cpu", 2, 1)


def test_the_tiles_key_reaches_the_checkpoint_and_bad_values_fail():
    from vemscale.train.finetune import TileConfig
    from vemscale.train.loop import build_meta

    cfg = {"data": {"classes": ["background", "mito"], "planes": "xy"}, "normalization": {"scale": 255.0},
           "tiles": TileConfig(tta=8).model_dump(), "config": {}}
    assert build_meta(cfg, {"name": "tiny"}, 10, {}).tta == 8
    with pytest.raises(ValueError, match="tta"):
        TileConfig(tta=4)
    with pytest.raises(ValueError, match="tta must be one of"):
        with_tta(_model(2), 3)
    with pytest.raises(ValueError, match="square"):
        DihedralTTA(_model(2))(torch.zeros(1, 1, 32, 48))
