"""2D tiles anchored to a global grid, so a voxel's prediction never depends on how the volume was split.

Tile k along an axis reads input [k*core - margin, k*core - margin + tile) and keeps only its core
[k*core, (k+1)*core). Positions outside the volume are filled by mirroring at the *volume* bounds (never at
block bounds), and batches always have the same size (tiles of several blocks share a batch; only the last one is
padded), so a block, a whole slice or a whole volume give the same bytes for the same voxel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch

# read(z: slice, y: slice, x: slice) -> array (C, z, y, x) of raw input values inside the volume bounds
Reader = Callable[[slice, slice, slice], np.ndarray]


@dataclass(frozen=True)
class TileGrid:
    """Tile size and the margin of context cropped from each side of a tile (both in pixels)."""

    tile: int = 256
    margin: int = 32

    def __post_init__(self) -> None:
        if self.tile % 16:
            raise ValueError(f"tile size must be a multiple of 16, got {self.tile}")
        if not 0 <= 2 * self.margin < self.tile:
            raise ValueError(f"margin must be in [0, tile/2), got {self.margin} for tile {self.tile}")

    @property
    def core(self) -> int:
        return self.tile - 2 * self.margin

    def tile_range(self, lo: int, hi: int) -> range:
        """Indices of tiles whose cores intersect [lo, hi)."""
        return range(lo // self.core, -(-hi // self.core))

    def window(self, lo: int, hi: int) -> tuple[int, int]:
        """Global input span [start, stop) read by the tiles covering [lo, hi) (may leave the volume)."""
        ks = self.tile_range(lo, hi)
        return ks.start * self.core - self.margin, (ks.stop - 1) * self.core - self.margin + self.tile


def mirror_index(idx: np.ndarray, size: int) -> np.ndarray:
    """Map global indices into [0, size) by mirroring at the volume bounds (numpy's 'reflect' mode)."""
    if size == 1:
        return np.zeros_like(idx)
    period = 2 * (size - 1)
    m = np.mod(idx, period)
    return np.where(m < size, m, period - m)


def read_mirrored(read: Reader, z: slice, y: tuple[int, int], x: tuple[int, int], shape_yx: tuple[int, int]) -> np.ndarray:
    """Read global span y=[y0,y1), x=[x0,x1) of slices z, mirroring where it leaves the volume."""
    yi = mirror_index(np.arange(*y), shape_yx[0])
    xi = mirror_index(np.arange(*x), shape_yx[1])
    ylo, yhi = int(yi.min()), int(yi.max()) + 1
    xlo, xhi = int(xi.min()), int(xi.max()) + 1
    data = read(z, slice(ylo, yhi), slice(xlo, xhi))
    return data[:, :, yi - ylo][:, :, :, xi - xlo]


@dataclass
class Normalizer:
    """Input normalisation stored in checkpoints: x / scale, then (x - mean) / std per channel."""

    scale: float = 255.0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    lut: np.ndarray | None = field(default=None, repr=False, compare=False)  # histogram matching (io.histogram)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """raw (C, ...) -> float32 normalised (C, ...); grey values first go through `lut` when there is one."""
        if self.lut is not None:
            raw = self.lut[raw]
        x = raw.astype(np.float32) / np.float32(self.scale)
        mean = np.asarray(self.mean, np.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        std = np.asarray(self.std, np.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        return (x - mean) / std

    def to_dict(self) -> dict:
        return {"scale": float(self.scale), "mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std]}


class TileBatcher:
    """Runs tiles through the model in batches of exactly `batch_size`, packing the tiles of consecutive requests.

    Each tile's numbers depend only on the tile and the (fixed) batch size, never on its batch-mates, so
    packing tiles of many blocks into one batch keeps the bytes of every block; only the last batch of a
    `flush` is zero-padded. A 1-tile block among many costs one tile, not a whole padded batch.
    Results keep only each tile's core (margins cropped).
    """

    def __init__(self, model: torch.nn.Module, batch_size: int, margin: int, device: torch.device | str = "cpu",
                 amp_dtype: torch.dtype | None = None) -> None:
        import torch  # here, not at import: the read and write stages import this module without a model

        self.model, self.batch_size, self.margin = model, int(batch_size), int(margin)
        self.device, self.amp_dtype = torch.device(device), amp_dtype
        self._queue: list[list] = []  # [request id, tiles, next index]
        self._queued = 0
        self._out: dict[int, np.ndarray] = {}
        self._filled: dict[int, int] = {}
        self._size: dict[int, int] = {}
        self._next_id = 0
        self.tiles_run = 0  # real tiles through the model
        self.batches_run = 0
        self.forward_seconds = 0.0

    def submit(self, tiles: np.ndarray) -> int:
        """Queue tiles (N, C, T, T) float32; runs every full batch now available. Returns the request id."""
        rid = self._next_id
        self._next_id += 1
        self._filled[rid] = 0
        self._size[rid] = len(tiles)
        self._out[rid] = None  # type: ignore[assignment]
        if len(tiles):
            self._queue.append([rid, tiles, 0])
            self._queued += len(tiles)
        while self._queued >= self.batch_size:
            self._run(self.batch_size)
        return rid

    def flush(self) -> None:
        """Run what is queued, zero-padding the last batch to `batch_size`."""
        while self._queued:
            self._run(min(self._queued, self.batch_size))

    def done(self, rid: int) -> bool:
        return not any(q[0] == rid for q in self._queue)

    def result(self, rid: int) -> np.ndarray:
        """(N, K, core, core) probabilities of a finished request (and forget it)."""
        if not self.done(rid):
            raise RuntimeError(f"tile request {rid} has not run yet; flush first")
        self._filled.pop(rid)
        self._size.pop(rid)
        out = self._out.pop(rid)
        return out if out is not None else np.zeros((0,), np.float32)

    def _run(self, n: int) -> None:
        import time

        import torch

        parts, owners = [], []
        while sum(len(p) for p in parts) < n:
            entry = self._queue[0]
            rid, tiles, pos = entry
            take = min(len(tiles) - pos, n - sum(len(p) for p in parts))
            parts.append(tiles[pos : pos + take])
            owners.append((rid, take))
            entry[2] = pos + take
            if entry[2] == len(tiles):
                self._queue.pop(0)
        self._queued -= n
        chunk = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if n < self.batch_size:
            chunk = np.concatenate([chunk, np.zeros((self.batch_size - n,) + chunk.shape[1:], chunk.dtype)])
        t0 = time.perf_counter()
        x = torch.from_numpy(np.ascontiguousarray(chunk))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(x)
        m = self.margin
        core = logits.shape[-1] - 2 * m
        probs = torch.softmax(logits.float(), dim=1)[:n, :, m : m + core, m : m + core].cpu().numpy()
        self.forward_seconds += time.perf_counter() - t0
        self.tiles_run += n
        self.batches_run += 1
        i = 0
        for rid, take in owners:
            if self._out[rid] is None:
                self._out[rid] = np.empty((self._size[rid], *probs.shape[1:]), np.float32)
            f = self._filled[rid]
            self._out[rid][f : f + take] = probs[i : i + take]
            self._filled[rid] = f + take
            i += take


@dataclass
class PlaneTiles:
    """The tiles of one box in one plane orientation, and how to put their cores back together."""

    tiles: np.ndarray  # (N, C, T, T) normalised input
    nz: int
    ny: int  # tiles along y
    nx: int  # tiles along x
    crop: tuple[slice, slice]  # y, x crop of the assembled core canvas to the box
    keep: np.ndarray | None = None  # (nz * ny * nx,) bool: tiles cut (None: all); the others' cores are 0


def tiles_with_tissue(tissue: np.ndarray, ny: int, nx: int, core: int, crop: tuple[slice, slice]) -> np.ndarray:
    """(nz * ny * nx,) bool: the tiles whose core (inside the box) holds a tissue voxel of `tissue` (z, y, x)."""
    canvas = np.zeros((tissue.shape[0], ny * core, nx * core), bool)
    canvas[:, crop[0], crop[1]] = tissue
    return canvas.reshape(tissue.shape[0], ny, core, nx, core).any(axis=(2, 4)).ravel()


def xy_tiles(read: Reader, box: tuple[slice, slice, slice], volume_shape: tuple[int, int, int], grid: TileGrid,
             normalize: Normalizer, tissue: np.ndarray | None = None) -> PlaneTiles:
    """Cut the global-grid tiles that cover `box` slice by slice in xy (context mirrored at the volume bounds).

    With `tissue` (a bool mask of the box), tiles whose core has no tissue are not cut (their output is
    background anyway), so a block on the edge of the tissue costs its tissue tiles only.
    """
    zs, ys, xs = box
    y0, y1 = grid.window(ys.start, ys.stop)
    x0, x1 = grid.window(xs.start, xs.stop)
    window = normalize(read_mirrored(read, zs, (y0, y1), (x0, x1), volume_shape[1:]))  # (C, z, Y, X)
    c, nz = window.shape[0], window.shape[1]
    ky, kx = grid.tile_range(ys.start, ys.stop), grid.tile_range(xs.start, xs.stop)
    t, s = grid.tile, grid.core
    core_y0, core_x0 = ky.start * s, kx.start * s
    crop = (slice(ys.start - core_y0, ys.stop - core_y0), slice(xs.start - core_x0, xs.stop - core_x0))
    keep = None if tissue is None else tiles_with_tissue(tissue, len(ky), len(kx), s, crop)
    tiles = np.empty((nz * len(ky) * len(kx) if keep is None else int(keep.sum()), c, t, t), np.float32)
    i = j = 0
    for z in range(nz):
        for a in range(len(ky)):
            for b in range(len(kx)):
                if keep is None or keep[j]:
                    tiles[i] = window[:, z, a * s : a * s + t, b * s : b * s + t]
                    i += 1
                j += 1
    return PlaneTiles(tiles, nz, len(ky), len(kx), crop, keep)


def assemble_xy(plane: PlaneTiles, cores: np.ndarray) -> np.ndarray:
    """Tile cores (N, K, core, core) -> probabilities (K, z, y, x) of the box (0 where a tile was not cut)."""
    if plane.keep is not None:
        full = np.zeros((plane.keep.size, *cores.shape[1:]), np.float32)
        full[plane.keep] = cores
        cores = full
    k, s = cores.shape[1], cores.shape[-1]
    grid = cores.reshape(plane.nz, plane.ny, plane.nx, k, s, s).transpose(3, 0, 1, 4, 2, 5)
    canvas = grid.reshape(k, plane.nz, plane.ny * s, plane.nx * s)
    return canvas[:, :, plane.crop[0], plane.crop[1]]


def permuted_reader(read: Reader, order: tuple[int, int, int]) -> Reader:
    """A Reader over the volume with spatial axes permuted: axis i of the view is axis order[i] of `read`."""
    inv = tuple(int(i) for i in np.argsort(order))

    def view(*slices: slice) -> np.ndarray:
        data = read(*(slices[inv[j]] for j in range(3)))
        return data.transpose(0, *(1 + o for o in order))

    return view


# slicing orders of the three orthogonal planes: xy tiles (y, x) per z; xz tiles (z, x) per y; yz tiles (z, y) per x
ORTHO_ORDERS: tuple[tuple[int, int, int], ...] = ((0, 1, 2), (1, 0, 2), (2, 0, 1))
XY_ORDERS: tuple[tuple[int, int, int], ...] = ((0, 1, 2),)


def plane_orders(mode: str) -> tuple[tuple[int, int, int], ...]:
    """xy: one plane; orthoplane: xy, xz and yz (for isotropic data), averaged."""
    if mode not in ("xy", "orthoplane"):
        raise ValueError(f"mode must be xy or orthoplane, got {mode!r}")
    return XY_ORDERS if mode == "xy" else ORTHO_ORDERS


def predict_boxes(
    batcher: TileBatcher,
    jobs: list[tuple[Reader, tuple[slice, slice, slice]] | tuple[Reader, tuple[slice, slice, slice], np.ndarray | None]],
    volume_shape: tuple[int, int, int],
    grid: TileGrid,
    normalize: Normalizer,
    mode: str = "xy",
) -> Iterator[np.ndarray]:
    """Class probabilities (K, z, y, x) float32 of each (reader, core box[, tissue mask]), in order, tiles packed
    across boxes.

    Each plane is tiled on its own global grid through a permuted view, mirrored at volume bounds only, so a
    voxel's value does not depend on the box it was predicted in. Boxes are yielded as soon as their tiles ran.
    Tiles without tissue are skipped (probabilities 0 there).
    """
    orders = plane_orders(mode)
    waiting: list[tuple[list[int], list[PlaneTiles]]] = []

    def finished() -> Iterator[np.ndarray]:
        while waiting and all(batcher.done(r) for r in waiting[0][0]):
            rids, planes = waiting.pop(0)
            total = None
            for rid, plane, order in zip(rids, planes, orders):
                probs = assemble_xy(plane, batcher.result(rid))
                if order != (0, 1, 2):
                    inv = tuple(int(i) for i in np.argsort(order))
                    probs = probs.transpose(0, *(1 + i for i in inv))
                total = np.ascontiguousarray(probs) if total is None else total + probs
            yield total if len(orders) == 1 else total / np.float32(len(orders))

    for job in jobs:
        read, box, tissue = (*job, None)[:3]
        rids, planes = [], []
        for order in orders:
            pbox = tuple(box[i] for i in order)
            pshape = tuple(volume_shape[i] for i in order)
            ptissue = None if tissue is None else tissue.transpose(order)
            plane = xy_tiles(read if order == (0, 1, 2) else permuted_reader(read, order), pbox, pshape, grid, normalize,
                             ptissue)
            planes.append(plane)
            rids.append(batcher.submit(plane.tiles))
            plane.tiles = None  # type: ignore[assignment]  # queued in the batcher; free it there once run
        waiting.append((rids, planes))
        yield from finished()
    batcher.flush()
    yield from finished()


def predict_block_xy(
    model: torch.nn.Module,
    read: Reader,
    box: tuple[slice, slice, slice],
    volume_shape: tuple[int, int, int],
    grid: TileGrid,
    normalize: Normalizer,
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Class probabilities (K, z, y, x) float32 for the core `box` of a volume, predicted slice by slice in xy.

    `read` gives raw input inside the volume; context beyond `box` is read through it, mirrored at the volume
    bounds, so the result is independent of how boxes are chosen.
    """
    batcher = TileBatcher(model, batch_size, grid.margin, device, amp_dtype)
    return next(iter(predict_boxes(batcher, [(read, box)], volume_shape, grid, normalize, "xy")))


def numpy_reader(volume: np.ndarray) -> Reader:
    """A Reader over an in-memory (C, Z, Y, X) or (Z, Y, X) array."""
    vol = volume if volume.ndim == 4 else volume[None]
    return lambda z, y, x: vol[:, z, y, x]


def predict_volume_xy(model, volume: np.ndarray, grid: TileGrid, normalize: Normalizer, **kw) -> np.ndarray:
    """Whole-volume sliding-window reference (no blocks, no Ray): probabilities (K, Z, Y, X)."""
    vol = volume if volume.ndim == 4 else volume[None]
    box = (slice(0, vol.shape[1]), slice(0, vol.shape[2]), slice(0, vol.shape[3]))
    return predict_block_xy(model, numpy_reader(vol), box, vol.shape[1:], grid, normalize, **kw)


def read_span(grid: TileGrid, lo: int, hi: int, size: int) -> tuple[int, int]:
    """The in-volume range [start, stop) that the tiles covering [lo, hi) read along an axis of length `size`."""
    idx = mirror_index(np.arange(*grid.window(lo, hi)), size)
    return int(idx.min()), int(idx.max()) + 1


def predict_block_orthoplane(
    model: torch.nn.Module,
    read: Reader,
    box: tuple[slice, slice, slice],
    volume_shape: tuple[int, int, int],
    grid: TileGrid,
    normalize: Normalizer,
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Mean of xy, xz and yz predictions (K, z, y, x) for the core `box` (for isotropic data)."""
    batcher = TileBatcher(model, batch_size, grid.margin, device, amp_dtype)
    return next(iter(predict_boxes(batcher, [(read, box)], volume_shape, grid, normalize, "orthoplane")))


def predict_volume_orthoplane(model, volume: np.ndarray, grid: TileGrid, normalize: Normalizer, **kw) -> np.ndarray:
    """Whole-volume orthoplane reference (no blocks, no Ray): probabilities (K, Z, Y, X)."""
    vol = volume if volume.ndim == 4 else volume[None]
    box = (slice(0, vol.shape[1]), slice(0, vol.shape[2]), slice(0, vol.shape[3]))
    return predict_block_orthoplane(model, numpy_reader(vol), box, vol.shape[1:], grid, normalize, **kw)
