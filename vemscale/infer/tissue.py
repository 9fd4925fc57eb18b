"""`mask=auto`: find tissue once, on a coarse grid of cells, and store it with the output as `<output>/mask`.

Empty resin, the area outside the section and padding are flat; tissue has texture. Per cell (default
4 x 32 x 32 voxels of the scale read), the statistic is the standard deviation of the cell's in-plane means
over `pool` x `pool` pixels (pooling removes shot noise, which is not tissue): a cell is tissue when it is at
least `min_std` grey levels (on the 0-255 scale of the input's dtype). Tissue cells are then dilated by
`dilate` cells so objects that cross the tissue edge are kept whole. The mask is an OME-Zarr uint8 volume of
cells (voxel size = the read scale's voxel size x cell), made by a block run with its own ledger: a rerun
reuses it, a kill resumes it, and any other setting rebuilds it.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
import warnings
from typing import Any, Sequence

import numpy as np

from vemscale.blocks.grid import BlockGrid
from vemscale.blocks.ledger import Ledger, ledger_url, volume_identity
from vemscale.blocks.runner import Stage, run_blocks
from vemscale.errors import UserError

log = logging.getLogger(__name__)

TISSUE_VERSION = 1  # bump when the cells computed for the same input and settings change
MASK_BLOCK = (8, 64, 64)  # cells per mask block (and chunk): 32 x 2048 x 2048 voxels read per task at 4x32x32 cells
MASK_LAYER = "mask"


def dtype_scale(dtype: np.dtype) -> float:
    """Grey levels of `dtype` per level of the 0-255 scale (1 for uint8, 257 for uint16; 1/255 for floats in [0, 1])."""
    dt = np.dtype(dtype)
    if dt.kind in "ui":
        return (float(np.iinfo(dt).max) - float(np.iinfo(dt).min)) / 255.0
    return 1.0 / 255.0


def check_mask_cell(cell: Sequence[int], pool: int = 4) -> None:
    """UserError unless the cell's y and x are whole multiples of the in-plane pooling."""
    p = max(1, min(int(pool), int(cell[1]), int(cell[2])))
    if int(cell[1]) % p or int(cell[2]) % p:
        raise UserError(f"mask_cell {tuple(cell)}: y and x must be multiples of {p} (the in-plane pooling)")


def cell_std(data: np.ndarray, cell: Sequence[int], pool: int = 4) -> np.ndarray:
    """Per cell of `data` (z,y,x; partial cells at the high ends allowed): std of the pool x pool in-plane means."""
    cz, cy, cx = (int(c) for c in cell)
    check_mask_cell(cell, pool)
    p = max(1, min(int(pool), cy, cx))
    grid = [-(-n // c) for n, c in zip(data.shape, (cz, cy, cx))]
    if all(n % c == 0 for n, c in zip(data.shape, (cz, cy, cx))):  # whole cells (the common case): no NaN padding
        z, y, x = data.shape
        pooled = data.reshape(z, y // p, p, x // p, p).mean(axis=(2, 4), dtype=np.float32)
        cells = pooled.reshape(grid[0], cz, grid[1], cy // p, grid[2], cx // p).transpose(0, 2, 4, 1, 3, 5)
        return cells.reshape(*grid, -1).std(axis=-1)
    full = np.full((grid[0] * cz, grid[1] * cy, grid[2] * cx), np.nan, np.float32)
    full[tuple(slice(0, n) for n in data.shape)] = data
    with warnings.catch_warnings():  # pools wholly past the edge are all-NaN: "mean of empty slice", by design
        warnings.simplefilter("ignore", RuntimeWarning)
        pooled = np.nanmean(full.reshape(grid[0] * cz, grid[1] * cy // p, p, grid[2] * cx // p, p), axis=(2, 4))
        cells = pooled.reshape(grid[0], cz, grid[1], cy // p, grid[2], cx // p).transpose(0, 2, 4, 1, 3, 5)
        std = np.nanstd(cells.reshape(*grid, -1), axis=-1)
    return np.nan_to_num(std, nan=0.0)


def tissue_cells(data: np.ndarray, cell: Sequence[int], min_std: float, dilate: int, dtype: np.dtype) -> np.ndarray:
    """uint8 tissue (1) / empty (0) per cell of `data`, dilated by `dilate` cells (a pure function of the data)."""
    from scipy import ndimage

    tissue = cell_std(data, cell) >= min_std * dtype_scale(dtype)
    if dilate > 0:
        tissue = ndimage.maximum_filter(tissue, size=2 * dilate + 1, mode="constant", cval=0)
    return tissue.astype(np.uint8)


def tissue_block(batch: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Ray task: compute and write the mask cells of each mask block (read with a `dilate`-cell halo)."""
    from vemscale.infer.blockio import _open_outputs
    from vemscale.io.volume import open_volume_cached

    vol = open_volume_cached(job["input"], job["scale"], job["run_id"])
    grid = BlockGrid.from_dict(job["grid"])
    out = _open_outputs(json.dumps({MASK_LAYER: job["mask_spec"]}, sort_keys=True), job["run_id"])[MASK_LAYER]
    cell, d = job["cell"], int(job["dilate"])
    counts = []
    for index in np.asarray(batch["id"], np.int64):
        core = grid.context(int(index), (0, 0, 0))
        ctx = grid.context(int(index), (d, d, d))
        vbox = tuple(slice(s.start * c, min(s.stop * c, n)) for s, c, n in zip(ctx, cell, vol.shape[-3:]))
        lead = (slice(0, 1),) if vol.ndim == 4 else ()
        data = np.asarray(vol.read(lead + vbox)).reshape([b.stop - b.start for b in vbox])
        cells = tissue_cells(data, cell, job["min_std"], d, vol.dtype)
        crop = tuple(slice(c.start - x.start, c.stop - x.start) for c, x in zip(core, ctx))
        cells = cells[crop]
        out[core].write(cells).result()
        counts.append(int(cells.sum()))
    return {"id": np.asarray(batch["id"], np.int64), "tissue_cells": np.asarray(counts, np.int64)}


def make_tissue_mask(input_url: str, scale: int | str | None, output: str, cell: Sequence[int], min_std: float,
                     dilate: int, progress: bool = True) -> dict[str, Any]:
    """Build (or reuse, or resume) `<output>/mask` for the volume at `input_url`; returns its URL and counts."""
    from vemscale.io.ome_zarr import create_ome_zarr
    from vemscale.io.urls import join_url, kvstore_url, parse_url
    from vemscale.io.volume import open_volume

    vol = open_volume(input_url, scale=scale)
    shape = tuple(int(s) for s in vol.shape[-3:])
    cell = tuple(min(int(c), s) for c, s in zip(cell, shape))
    mask_shape = tuple(-(-s // c) for s, c in zip(shape, cell))
    voxel = vol.voxel_size_xyz or (1.0, 1.0, 1.0)
    mask_voxel = tuple(float(v) * c for v, c in zip(voxel, cell[::-1]))
    describe = {"version": TISSUE_VERSION, "input": volume_identity(vol), "scale": scale, "cell": list(cell),
                "min_std": float(min_std), "dilate": int(dilate)}
    parsed = parse_url(output)
    ledger = Ledger.open(ledger_url(output, MASK_LAYER), describe)
    url = join_url(kvstore_url(parsed) if parsed.remote else parsed.location, MASK_LAYER)
    block = tuple(min(b, s) for b, s in zip(MASK_BLOCK, mask_shape))
    store = create_ome_zarr(url, mask_shape, np.uint8, block, mask_voxel, overwrite=ledger.fresh, name=MASK_LAYER)
    grid = BlockGrid.create(mask_shape, block, block)
    job = {"input": vol.url, "scale": scale, "grid": grid.to_dict(), "cell": list(cell), "min_std": float(min_std),
           "dilate": int(dilate), "mask_spec": store.spec(minimal_spec=True).to_json(),
           "run_id": uuid.uuid4().hex}
    totals = {"tissue_cells": 0}

    def fold(batch: dict[str, Any]) -> None:
        totals["tissue_cells"] += int(np.sum(batch["tissue_cells"]))

    run = run_blocks("tissue mask", grid.num_blocks, ledger, [Stage("tissue", tissue_block, {"job": job})],
                     batch_ids=1, on_batch=fold, progress=progress)
    cells = math.prod(mask_shape)
    log.info("tissue mask %s: %d cells of %s voxels, %d blocks computed, %d reused", url, cells, cell,
             run["computed"], run["skipped"])
    return {"url": url, "scale": None, "cells": cells, "cell": list(cell), "computed": run["computed"],
            "reused": run["skipped"], "seconds": run["seconds"],
            "tissue_cells_computed": totals["tissue_cells"], "fingerprint": ledger.fingerprint}


__all__ = ["make_tissue_mask", "tissue_cells", "cell_std", "check_mask_cell", "MASK_LAYER"]
