"""Tiles anchored to a global grid: the prediction of a voxel must not depend on the box it was predicted in."""

import numpy as np
import pytest
import torch

from vemscale.infer.tiling import Normalizer, TileGrid, mirror_index, numpy_reader, predict_block_xy, predict_volume_xy
from vemscale.models import create_model


def test_mirror_index_matches_numpy_reflect():
    size = 7
    a = np.arange(size)
    padded = np.pad(a, 20, mode="reflect")
    idx = np.arange(-20, size + 20)
    assert np.array_equal(a[mirror_index(idx, size)], padded)


def test_grid_validation():
    with pytest.raises(ValueError):
        TileGrid(tile=100)
    with pytest.raises(ValueError):
        TileGrid(tile=64, margin=32)


@pytest.mark.parametrize("boxes", [
    [(0, 3, 0, 70, 0, 90)],
    [(0, 1, 0, 35, 0, 50), (0, 1, 35, 70, 0, 50), (0, 1, 0, 70, 50, 90), (1, 3, 0, 70, 0, 90)],
    [(0, 3, 0, 16, 0, 16), (0, 3, 16, 70, 0, 16), (0, 3, 0, 70, 16, 90)],
])
def test_blocks_equal_whole_volume(boxes):
    torch.manual_seed(0)
    model = create_model("tiny", in_chans=1, num_classes=2).eval()
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 255, (3, 70, 90), dtype=np.uint8)
    grid, norm = TileGrid(tile=48, margin=8), Normalizer(255.0, (0.5,), (0.2,))
    ref = predict_volume_xy(model, vol, grid, norm, batch_size=3)
    assert ref.shape == (2, 3, 70, 90)
    out = np.full_like(ref, np.nan)
    for z0, z1, y0, y1, x0, x1 in boxes:
        box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
        out[:, z0:z1, y0:y1, x0:x1] = predict_block_xy(model, numpy_reader(vol), box, vol.shape, grid, norm, batch_size=3)
    assert np.array_equal(out, ref)
    assert np.allclose(ref.sum(0), 1, atol=1e-5)
