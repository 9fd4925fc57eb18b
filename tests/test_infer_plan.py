"""Block plan, done-ledger and orthoplane tiling: the parts of blockwise inference that need no Ray."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tensorstore as ts
import torch

from vemscale.errors import UserError
from vemscale.infer.ledger import SHARD, Ledger
from vemscale.infer.plan import BlockPlan, parse_roi
from vemscale.infer.tiling import (
    Normalizer,
    TileGrid,
    numpy_reader,
    predict_block_orthoplane,
    predict_block_xy,
    predict_volume_orthoplane,
    read_span,
)
from vemscale.models import create_model


@pytest.mark.parametrize("block,roi", [((2, 48, 48), None), ((4, 96, 48), "1:5,50:150,0:100"), ((6, 200, 232), None)])
def test_blocks_tile_the_roi_exactly_on_chunk_bounds(block, roi):
    shape, chunks = (6, 200, 232), (2, 48, 48)
    plan = BlockPlan.create(shape, chunks, block, roi)
    count = np.zeros(shape, np.int32)
    for i in range(plan.num_blocks):
        box = plan.block_box(i)
        count[box] += 1
        for s, c, size in zip(box, plan.chunk_shape, shape):  # cores start and end on chunk bounds (or the volume end)
            assert s.start % c == 0 and (s.stop % c == 0 or s.stop == size)
    inside = tuple(slice(a, b) for a, b in plan.roi)
    assert count[inside].min() == 1 and count.max() == 1 and count.sum() == plan.roi_voxels


def test_roi_is_aligned_outwards_to_chunks():
    plan = BlockPlan.create((6, 200, 232), (2, 48, 48), (2, 48, 48), "1:5,50:150,10:20")
    assert plan.roi == ((0, 6), (48, 192), (0, 48))


def test_block_shape_must_be_whole_chunks_and_error_names_nearest():
    with pytest.raises(UserError, match=r"nearest valid block_shape: 16,128,256"):
        BlockPlan.create((100, 1000, 1000), (16, 128, 128), (16, 100, 250))
    # a block covering the whole extent of an axis is valid whatever the chunks
    assert BlockPlan.create((6, 200, 232), (4, 48, 48), (8, 48, 48)).block_shape == (6, 48, 48)


@pytest.mark.parametrize("roi", ["0:5", "0:5,0:5,0:5,0:5", "a:b,0:1,0:1", "5:2,0:10,0:10", "0:7,:,:"])
def test_bad_roi(roi):
    with pytest.raises(UserError):
        parse_roi(roi, (6, 200, 232))


def test_petavoxel_plan_is_instant():
    t = time.perf_counter()
    plan = BlockPlan.create((100_000, 100_000, 100_000), (64, 512, 512), (64, 1024, 1024))
    last = plan.block_box(plan.num_blocks - 1)
    assert time.perf_counter() - t < 1.0
    assert plan.num_blocks == 1563 * 98 * 98 and last[0].stop == last[1].stop == last[2].stop == 100_000


def test_ledger_marks_lists_and_counts(tmp_path):
    url = f"file://{tmp_path}/ledger/"
    ledger = Ledger.open(url, {"geometry": 1})
    n = SHARD + 100
    done = [0, 5, SHARD - 1, SHARD, SHARD + 99]
    threads = [threading.Thread(target=ledger.mark_done, args=(i,)) for i in done]  # concurrent writers
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.count_done(n) == len(done) and ledger.count_done(SHARD) == 3
    pending = np.concatenate(list(ledger.pending(0, n, batch=1000)))
    assert len(pending) == n - len(done) and not set(done) & set(pending.tolist())
    assert Ledger.open(url, {"geometry": 1}).count_done(n) == len(done)  # same run: resumes
    assert Ledger.open(url, {"geometry": 2}).count_done(n) == 0  # changed geometry: starts over
    kv = ts.KvStore.open(url).result()
    assert kv.list().result() == [b"ledger.json"]  # stale markers of the old run are gone


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
    from vemscale.infer.predictor import BlockReader, predict_block, tile_context_box
    from vemscale.io.volume import array_volume

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
        reader = BlockReader(array_volume(vol), context)
        got = predict_block(model, reader, box, vol.shape, grid, norm, mode, 4, torch.device("cpu"), None)
        fn = predict_block_orthoplane if mode == "orthoplane" else predict_block_xy
        want = fn(model, numpy_reader(vol), box, vol.shape, grid, norm, batch_size=4)
    finally:
        torch.set_num_threads(threads)
    assert reader.misses == 0 and np.array_equal(got, want)
