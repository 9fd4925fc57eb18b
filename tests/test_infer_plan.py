"""Orthoplane tiling, the auto halo and tile packing: the parts of blockwise inference that need no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vemscale.infer.tiling import (
    Normalizer,
    TileBatcher,
    TileGrid,
    numpy_reader,
    predict_block_orthoplane,
    predict_block_xy,
    predict_boxes,
    predict_volume_orthoplane,
    read_span,
)
from vemscale.models import create_model


def test_orthoplane_is_decomposition_independent():
    torch.manual_seed(0)
    model = create_model("tiny", in_chans=1, num_classes=2).eval()
    vol = np.random.default_rng(0).integers(0, 255, (10, 20, 28), dtype=np.uint8)
    grid, norm = TileGrid(tile=32, margin=4), Normalizer(255.0, (0.5,), (0.2,))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: spin-waiting OpenMP threads crawl on a busy 2-core machine
    try:
        ref = predict_volume_orthoplane(model, vol, grid, norm, batch_size=4)
        out = np.full_like(ref, np.nan)
        for z0, z1, y0, y1, x0, x1 in [(0, 3, 0, 20, 0, 28), (3, 10, 0, 7, 0, 28), (3, 10, 7, 20, 0, 11),
                                       (3, 10, 7, 20, 11, 28)]:
            box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
            out[:, z0:z1, y0:y1, x0:x1] = predict_block_orthoplane(model, numpy_reader(vol), box, vol.shape, grid,
                                                                   norm, batch_size=4)
    finally:
        torch.set_num_threads(threads)
    assert ref.shape == (2, 10, 20, 28) and np.allclose(ref.sum(0), 1, atol=1e-5)
    assert np.array_equal(out, ref)


def test_read_span_covers_the_tile_window():
    grid = TileGrid(tile=64, margin=8)
    assert read_span(grid, 48, 96, 200) == (40, 104)  # one tile: [48 - 8, 48 - 8 + 64)
    assert read_span(grid, 0, 48, 200) == (0, 56)  # [-8, 56) mirrored at the volume start


@pytest.mark.parametrize("mode", ["xy", "orthoplane"])
def test_auto_halo_holds_everything_the_tiles_read(mode):
    """The default context box is exactly what the tiles need: no read leaves it, and bytes match a plain reader."""
    from vemscale.infer.blockio import tile_context_box
    from vemscale.infer.predictor import BlockReader

    torch.manual_seed(0)
    model = create_model("tiny", in_chans=1, num_classes=2).eval()
    vol = np.random.default_rng(1).integers(0, 255, (9, 40, 50), dtype=np.uint8)
    grid, norm = TileGrid(tile=32, margin=4), Normalizer(255.0, (0.5,), (0.2,))
    box = (slice(3, 6), slice(24, 40), slice(0, 24))
    context = tile_context_box(box, vol.shape, grid, mode)
    assert context[0] == box[0] if mode == "xy" else context[0] != box[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reader = BlockReader(vol[context][None], context)
        batcher = TileBatcher(model, 4, grid.margin)
        got = next(predict_boxes(batcher, [(reader, box)], vol.shape, grid, norm, mode))
        fn = predict_block_orthoplane if mode == "orthoplane" else predict_block_xy
        want = fn(model, numpy_reader(vol), box, vol.shape, grid, norm, batch_size=4)
    finally:
        torch.set_num_threads(threads)
    assert reader.misses == 0 and np.array_equal(got, want)


def test_tiles_of_many_blocks_share_batches_and_keep_every_byte():
    """Packing the tiles of consecutive blocks into fixed-size batches changes no byte, and a 1-tile block
    costs one tile (only the last batch of a run is padded), not a whole padded batch."""
    torch.manual_seed(0)
    model = create_model("tiny", in_chans=1, num_classes=2).eval()
    vol = np.random.default_rng(2).integers(0, 255, (2, 96, 96), dtype=np.uint8)
    grid, norm = TileGrid(tile=32, margin=4), Normalizer(255.0, (0.5,), (0.2,))
    boxes = [(slice(z, z + 1), slice(y, y + 24), slice(x, x + 24)) for z in range(2) for y in (0, 24, 48, 72)
             for x in (0, 24, 48, 72)]  # 32 one-tile blocks (the tile core is 24)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = [predict_block_xy(model, numpy_reader(vol), b, vol.shape, grid, norm, batch_size=8) for b in boxes]
        batcher = TileBatcher(model, 8, grid.margin)
        packed = list(predict_boxes(batcher, [(numpy_reader(vol), b) for b in boxes], vol.shape, grid, norm))
    finally:
        torch.set_num_threads(threads)
    assert all(np.array_equal(a, p) for a, p in zip(alone, packed))
    assert batcher.tiles_run == 32 and batcher.batches_run == 4  # alone: 32 batches of 8 = 256 tiles computed
    odd = TileBatcher(model, 8, grid.margin)
    list(predict_boxes(odd, [(numpy_reader(vol), b) for b in boxes[:11]], vol.shape, grid, norm))
    assert (odd.tiles_run, odd.batches_run) == (11, 2)  # 8 + 3 (the last one padded to 8)


@pytest.mark.parametrize("mode", ["xy", "orthoplane"])
def test_tiles_without_tissue_are_skipped_and_tissue_voxels_keep_their_bytes(mode):
    """A box on the tissue's edge runs only the tiles whose core holds tissue; inside the tissue the bytes equal
    the whole-volume sliding window (outside, the writer stores background)."""
    from vemscale.infer.tiling import predict_volume_orthoplane, predict_volume_xy

    torch.manual_seed(0)
    model = create_model("tiny", in_chans=1, num_classes=2).eval()
    vol = np.random.default_rng(3).integers(0, 255, (4, 48, 72), dtype=np.uint8)
    grid, norm = TileGrid(tile=32, margin=4), Normalizer(255.0, (0.5,), (0.2,))
    tissue = np.zeros(vol.shape, bool)
    tissue[1:3, 5:20, 30:33] = True  # a thin strip: in xy it touches tile cores x 24-48 only, y 0-24
    box = (slice(0, 4), slice(0, 48), slice(0, 72))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batcher = TileBatcher(model, 4, grid.margin)
        got = next(predict_boxes(batcher, [(numpy_reader(vol), box, tissue)], vol.shape, grid, norm, mode))
        whole = (predict_volume_xy if mode == "xy" else predict_volume_orthoplane)(model, vol, grid, norm, batch_size=4)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(got[:, tissue], whole[:, tissue])
    # tiles with tissue in their core, counted plane by plane (cores of 24 on the global grid)
    expect = 0
    for order in ((0, 1, 2),) if mode == "xy" else ((0, 1, 2), (1, 0, 2), (2, 0, 1)):
        t = tissue.transpose(order)
        expect += sum(t[i, a : a + 24, b : b + 24].any() for i in range(t.shape[0])
                      for a in range(0, t.shape[1], 24) for b in range(0, t.shape[2], 24))
    full = sum(vol.shape[o[0]] * -(-vol.shape[o[1]] // 24) * -(-vol.shape[o[2]] // 24)
               for o in (((0, 1, 2),) if mode == "xy" else ((0, 1, 2), (1, 0, 2), (2, 0, 1))))
    assert batcher.tiles_run == expect and expect < full / 3


def test_cell_std_is_the_std_of_each_cells_pooled_means():
    """mask=auto's tissue measure, against explicit loops: whole cells (the fast path) and partial edge cells."""
    from vemscale.infer.tissue import cell_std

    d = np.random.default_rng(4).integers(0, 255, (8, 64, 96), dtype=np.uint8)

    def reference(a: np.ndarray, cell: tuple[int, int, int], p: int = 4) -> np.ndarray:
        out = np.zeros([-(-n // c) for n, c in zip(a.shape, cell)])
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                for k in range(out.shape[2]):
                    blk = a[i * cell[0] : (i + 1) * cell[0], j * cell[1] : (j + 1) * cell[1],
                            k * cell[2] : (k + 1) * cell[2]].astype(np.float64)
                    pooled = [blk[z, y : y + p, x : x + p].mean() for z in range(blk.shape[0])
                              for y in range(0, blk.shape[1], p) for x in range(0, blk.shape[2], p)]
                    out[i, j, k] = np.std(pooled)
        return out

    np.testing.assert_allclose(cell_std(d, (4, 32, 32)), reference(d, (4, 32, 32)), rtol=1e-4, atol=1e-3)
    part = d[:7, :60, :90]  # partial cells at the high ends of every axis, partial pools along x
    np.testing.assert_allclose(cell_std(part, (4, 32, 32)), reference(part, (4, 32, 32)), rtol=1e-4, atol=1e-3)
