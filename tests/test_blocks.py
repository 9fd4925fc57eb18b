"""The block layer: lazy grids, the done-ledger (runs, payloads, generations), the runner's local executor."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tensorstore as ts

from vemscale.blocks.grid import BlockGrid, parse_roi
from vemscale.blocks.ledger import SHARD, Ledger, runs
from vemscale.blocks.runner import Stage, contiguous_batches, ids_per_batch, run_blocks
from vemscale.errors import UserError


@pytest.mark.parametrize("block,roi", [((2, 48, 48), None), ((4, 96, 48), "1:5,50:150,0:100"), ((6, 200, 232), None)])
def test_blocks_tile_the_roi_exactly_on_chunk_bounds(block, roi):
    shape, chunks = (6, 200, 232), (2, 48, 48)
    grid = BlockGrid.create(shape, chunks, block, roi)
    cover = np.zeros(shape, np.int32)
    for i in range(grid.num_blocks):
        box = grid.box(i)
        cover[box] += 1
        for s, c, n in zip(box, chunks, shape):
            assert s.start % c == 0 and (s.stop % c == 0 or s.stop == n)
    lo = tuple(a for a, _ in grid.roi)
    hi = tuple(b for _, b in grid.roi)
    assert (cover[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == 1).all() and cover.sum() == grid.roi_voxels


def test_roi_is_aligned_outwards_to_chunks():
    grid = BlockGrid.create((6, 200, 232), (2, 48, 48), (2, 48, 48), "1:5,50:150,10:20")
    assert grid.roi == ((0, 6), (48, 192), (0, 48))


def test_block_shape_must_be_whole_chunks_and_error_names_nearest():
    with pytest.raises(UserError, match="nearest valid block_shape: 16,128,256"):
        BlockGrid.create((100, 1000, 1000), (16, 128, 128), (16, 100, 250))
    assert BlockGrid.create((6, 200, 232), (4, 48, 48), (8, 48, 48)).block_shape == (6, 48, 48)
    with pytest.raises(UserError, match="three positive integers"):
        BlockGrid.create((6, 200, 232), (2, 48, 48), (0, 48, 48))


@pytest.mark.parametrize("roi", ["0:7,:,:", "5:5,:,:", "a:b,:,:", "0:1,0:1", ":,:,300:400"])
def test_bad_roi(roi):
    with pytest.raises(UserError, match="roi"):
        parse_roi(roi, (6, 200, 232))


def test_petavoxel_grid_is_instant():
    t = time.perf_counter()
    grid = BlockGrid.create((100_000, 100_000, 100_000), (64, 512, 512), (64, 1024, 1024))
    last = grid.box(grid.num_blocks - 1)
    assert time.perf_counter() - t < 1.0
    assert grid.num_blocks == 1563 * 98 * 98 and last[0].stop == last[1].stop == last[2].stop == 100_000


def test_aligned_grid_grows_whole_write_chunks_to_the_target():
    grid = BlockGrid.aligned((40, 1000, 1000), (64, 64, 64), target_voxels=64 * 64 * 64 * 4)
    assert grid.block_shape == (40, 128, 128) and grid.num_blocks == 1 * 8 * 8  # z clipped, y and x doubled
    ctx = grid.context(9, (2, 10, 10))
    assert ctx == (slice(0, 40), slice(118, 266), slice(118, 266))
    inside = BlockGrid.create((40, 100, 100), None, (10, 50, 50), "10:30,:,:").context(0, (4, 4, 4), within_roi=True)
    assert inside[0] == slice(10, 24)


def test_runs_split_at_gaps_and_shards():
    ids = np.array([0, 1, 2, 5, 6, SHARD - 1, SHARD, SHARD + 1], np.int64)
    assert runs(ids) == [(0, 3, 0, 3), (5, 7, 3, 5), (SHARD - 1, SHARD, 5, 6), (SHARD, SHARD + 2, 6, 8)]
    assert [b.tolist() for b in contiguous_batches(np.array([1, 2, 3, 4, 9]), 3)] == [[1, 2, 3], [4], [9]]


def test_ledger_marks_lists_counts_and_payloads(tmp_path):
    url = f"file://{tmp_path}/ledger/"
    ledger = Ledger.open(url, {"geometry": 1})
    assert ledger.fresh
    n = SHARD + 100
    batches = [np.array([0, 1, 2]), np.array([5]), np.array([SHARD - 1, SHARD]), np.array([SHARD + 99])]
    threads = [threading.Thread(target=ledger.mark_done, args=(b, [f"p{i}".encode() for i in b])) for b in batches]
    for t in threads:  # concurrent writers
        t.start()
    for t in threads:
        t.join()
    done = np.concatenate(batches)
    assert ledger.count_done(n) == done.size and ledger.count_done(SHARD) == 5
    pending = np.concatenate(list(ledger.pending(0, n)))
    assert len(pending) == n - done.size and not set(done.tolist()) & set(pending.tolist())
    assert dict(ledger.payloads(n)) == {int(i): f"p{i}".encode() for i in done}
    again = Ledger.open(url, {"geometry": 1})
    assert not again.fresh and again.count_done(n) == done.size  # same run: resumes
    moved = Ledger.open(url, {"geometry": 2})
    assert moved.fresh and moved.count_done(n) == 0  # changed geometry: a new generation, old markers untouched
    kv = ts.KvStore.open(url).result()
    assert len(kv.list().result()) == 1 + 5  # ledger.json + 5 run keys of the old generation (O(1) restart)
    assert moved.collect_garbage() == 1
    assert kv.list().result() == [b"ledger.json"]  # stale markers are gone after the run
    Ledger.invalidate(url)
    assert Ledger.open(url, {"geometry": 2}).fresh  # an overwrite forgets the done set


def test_overlapping_marks_count_and_yield_each_block_once(tmp_path):
    """A stale task of a failed run can mark ids that the rerun marks again under other keys (the rerun batches the
    pending ids differently): counts and payloads are of the union, checked against a Python set."""
    ledger = Ledger.open(f"file://{tmp_path}/ledger/", {"geometry": 1})
    marks = [np.arange(4, 8), np.arange(6, 10), np.arange(0, 2), np.arange(5, 7), np.array([SHARD - 1, SHARD, SHARD + 1])]
    for ids in marks:
        ledger.mark_done(ids, [f"p{i}".encode() for i in ids])
    done = sorted({int(i) for ids in marks for i in ids})
    n = SHARD + 2
    assert ledger.count_done(n) == len(done) and ledger.count_done(9) == len([i for i in done if i < 9])
    assert [i for i, _ in ledger.payloads(n)] == done
    assert dict(ledger.payloads(n)) == {i: f"p{i}".encode() for i in done}
    assert sorted(set(range(n)) - set(done)) == np.concatenate(list(ledger.pending(0, n))).tolist()


def test_resuming_a_million_block_ledger_lists_in_seconds(tmp_path):
    """1e6 blocks marked in batches of 256 (the runner's batches): counting and listing pending stay fast."""
    ledger = Ledger.open(f"file://{tmp_path}/big/", {"n": 1_000_000})
    n = 1_000_000
    futures = []
    for lo in range(0, n - 256, 256):  # all but the last batch done
        prefix = ledger._prefix(lo // SHARD)
        futures.append(ledger.kv.write(f"{prefix}{lo:015d}-{min(lo + 256, n):015d}", b""))
    for f in futures:
        f.result()
    t = time.perf_counter()
    done = ledger.count_done(n)
    left = np.concatenate(list(ledger.pending(0, n)))
    seconds = time.perf_counter() - t
    assert done == (n // 256 - (1 if n % 256 == 0 else 0)) * 256 and left.size == n - done
    assert seconds < 30, f"listing a 1e6-block ledger took {seconds:.1f} s"


def _square(batch, offset):
    return {"id": batch["id"], "value": batch["id"] ** 2 + offset}


class _Double:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, batch):
        return {"id": batch["id"], "value": batch["value"] * self.factor}


def _emit(batch):
    if (batch["id"] == 13).any() and _emit.fail:
        raise ValueError("block 13 is broken")
    return {"id": batch["id"], "payload": [int(v).to_bytes(8, "little") for v in batch["value"]]}


_emit.fail = False


def test_local_runner_stages_payloads_resume_and_failure(tmp_path):
    ledger = Ledger.open(f"file://{tmp_path}/l/", {"x": 1})
    stages = [Stage("square", _square, {"offset": 1}), Stage("double", _Double, {"factor": 2}, actors=1),
              Stage("emit", _emit)]
    _emit.fail = True
    with pytest.raises(RuntimeError, match=r"failed with 10/50 blocks done .*block 13 is broken"):
        run_blocks("toy", 50, ledger, stages, batch_ids=5, executor="local", progress=False)
    _emit.fail = False
    seen = []
    out = run_blocks("toy", 50, ledger, stages, batch_ids=5, executor="local", progress=False,
                     on_batch=lambda b: seen.extend(b["id"].tolist()))
    assert (out["computed"], out["skipped"]) == (40, 10) and sorted(seen) == list(range(10, 50))
    values = {i: int.from_bytes(p, "little") for i, p in ledger.payloads(50)}
    assert values == {i: 2 * (i * i + 1) for i in range(50)}


def test_ids_per_batch_balances_small_runs_and_caps_bytes():
    assert ids_per_batch(block_bytes=256, pending=100_000, workers=2) == 1024
    assert ids_per_batch(block_bytes=8 << 20, pending=100_000, workers=2) == 2
    assert ids_per_batch(block_bytes=32 << 20, pending=100_000, workers=2) == 1
    assert ids_per_batch(block_bytes=256, pending=20, workers=2) == 3


@pytest.mark.parametrize("executor", ["tasks"])  # "ray" (Ray Data) runs in every infer test
def test_ray_executors_mark_every_block_and_keep_payloads(tmp_path, ray_local, executor):
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the toy stages live in this test module
    ledger = Ledger.open(f"file://{tmp_path}/l/", {"x": executor})
    stages = [Stage("square", _square, {"offset": 1}, num_cpus=0.5), Stage("emit", _emit, num_cpus=0.5)]
    seen = []
    out = run_blocks("toy", 300, ledger, stages, batch_ids=7, executor=executor, progress=False,
                     on_batch=lambda b: seen.extend(b["id"].tolist()))
    assert (out["computed"], out["skipped"]) == (300, 0) and sorted(seen) == list(range(300))
    assert {i: int.from_bytes(p, "little") for i, p in ledger.payloads(300)} == {i: i * i + 1 for i in range(300)}
    again = run_blocks("toy", 300, ledger, stages, batch_ids=7, executor=executor, progress=False)
    assert (again["computed"], again["skipped"]) == (0, 300)
