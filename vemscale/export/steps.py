"""One export step (scale 0, a pyramid level, meshes, label counts) = a block grid + a per-block function,
run by the block runner with a ledger inside the layer, so a killed export reruns only the missing blocks.

    <layer>/.vemscale-ledger/<step>/      the step's done-ledger (Neuroglancer ignores it)

A step's fingerprint includes the generation of the step it reads from (scale 1 names scale 0's, meshes name
their scale's), so a rewritten source invalidates everything built on it and nothing else.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterator

import numpy as np
import tensorstore as ts

from vemscale.blocks.grid import BlockGrid, Box
from vemscale.blocks.ledger import Ledger, ledger_url
from vemscale.blocks.runner import Stage, ids_per_batch, run_blocks

log = logging.getLogger(__name__)

# fn(box, **kwargs) -> payload bytes (or None): an idempotent function of one block
BlockFn = Callable[..., "bytes | None"]


@functools.lru_cache(maxsize=8)
def _open_cached(spec_json: str, write: bool, run: str) -> ts.TensorStore:
    import json

    return ts.open(json.loads(spec_json), open=True, read=True, write=write).result()


def open_spec(spec: dict[str, Any], write: bool = False, run: str = "") -> ts.TensorStore:
    """Open a store from its JSON spec in a task; handles are reused within one run (`run`) only, so a layer
    rewritten since is never seen stale."""
    import json

    return _open_cached(json.dumps(spec, sort_keys=True), write, run)


def _per_block(batch: dict[str, Any], fn: BlockFn, grid: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The batch function of a step: `fn` on each block's box; payloads (when any) go to the ledger."""
    g = BlockGrid.from_dict(grid)
    ids = np.asarray(batch["id"], np.int64)
    payloads = [fn(g.box(int(i)), **kwargs) for i in ids]
    out: dict[str, Any] = {"id": ids}
    if any(p is not None for p in payloads):
        out["payload"] = [p or b"" for p in payloads]
    return out


def run_step(layer_url: str, step: str, describe: dict[str, Any], grid: BlockGrid, fn: BlockFn,
             kwargs: dict[str, Any], *, bytes_per_voxel: float = 4.0, max_in_flight: int | None = None,
             blocks_per_batch: int | None = None, progress: bool = False) -> tuple[Ledger, dict[str, Any]]:
    """Run `fn` over every pending block of `grid`; returns the step's ledger (payloads of all blocks) and counts."""
    import ray

    ledger = Ledger.open(ledger_url(layer_url, step), {**describe, "grid": grid.to_dict()})
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending = grid.num_blocks - ledger.count_done(grid.num_blocks)
    batch = blocks_per_batch or ids_per_batch(grid.block_bytes(bytes_per_voxel), pending, cpus)
    stage = Stage(step, functools.partial(_per_block, fn=fn), {"grid": grid.to_dict(), "kwargs": kwargs},
                  num_cpus=1, concurrency=max_in_flight)
    summary = run_blocks(f"export {step}", grid.num_blocks, ledger, [stage], batch_ids=batch, progress=progress)
    return ledger, summary


def payloads(ledger: Ledger, num_blocks: int) -> Iterator[bytes]:
    """Every done block's non-empty payload (computed now or in an earlier, killed run)."""
    for _, p in ledger.payloads(num_blocks):
        if p:
            yield p


def box_list(box: Box) -> list[list[int]]:
    return [[int(s.start), int(s.stop)] for s in box]
