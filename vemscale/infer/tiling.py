"""2D tiles anchored to a global grid, so a voxel's prediction never depends on how the volume was split.

Tile k along an axis reads input [k*core - margin, k*core - margin + tile) and keeps only its core
[k*core, (k+1)*core). Positions outside the volume are filled by mirroring at the *volume* bounds (never at
block bounds), and batches always have the same size, so a block, a whole slice or a whole volume give the
same bytes for the same voxel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
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

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """raw (C, ...) -> float32 normalised (C, ...)."""
        x = raw.astype(np.float32) / np.float32(self.scale)
        mean = np.asarray(self.mean, np.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        std = np.asarray(self.std, np.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        return (x - mean) / std

    def to_dict(self) -> dict:
        return {"scale": float(self.scale), "mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std]}


def _run_batches(model: torch.nn.Module, tiles: np.ndarray, batch_size: int, device: torch.device, amp_dtype) -> np.ndarray:
    """Softmax probabilities for (N, C, T, T) tiles, always in batches of exactly `batch_size` (zero-padded)."""
    out = []
    n = tiles.shape[0]
    for start in range(0, n, batch_size):
        chunk = tiles[start : start + batch_size]
        if chunk.shape[0] < batch_size:
            pad = np.zeros((batch_size - chunk.shape[0],) + chunk.shape[1:], chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        x = torch.from_numpy(chunk).to(device, non_blocking=True)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        probs = torch.softmax(logits.float(), dim=1)
        out.append(probs.cpu().numpy()[: min(batch_size, n - start)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


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
    device = torch.device(device)
    zs, ys, xs = box
    y0, y1 = grid.window(ys.start, ys.stop)
    x0, x1 = grid.window(xs.start, xs.stop)
    window = normalize(read_mirrored(read, zs, (y0, y1), (x0, x1), volume_shape[1:]))  # (C, z, Y, X)
    c, nz = window.shape[0], window.shape[1]
    ky, kx = grid.tile_range(ys.start, ys.stop), grid.tile_range(xs.start, xs.stop)
    t, m, s = grid.tile, grid.margin, grid.core
    tiles = np.empty((nz * len(ky) * len(kx), c, t, t), np.float32)
    i = 0
    for z in range(nz):
        for a in range(len(ky)):
            for b in range(len(kx)):
                tiles[i] = window[:, z, a * s : a * s + t, b * s : b * s + t]
                i += 1
    probs = _run_batches(model, tiles, batch_size, device, amp_dtype)
    k = probs.shape[1]
    # assemble cores on the tile grid, then crop to the box
    core_y0, core_x0 = ky.start * s, kx.start * s
    canvas = np.empty((k, nz, len(ky) * s, len(kx) * s), np.float32)
    i = 0
    for z in range(nz):
        for a in range(len(ky)):
            for b in range(len(kx)):
                canvas[:, z, a * s : (a + 1) * s, b * s : (b + 1) * s] = probs[i][:, m : m + s, m : m + s]
                i += 1
    return canvas[:, :, ys.start - core_y0 : ys.stop - core_y0, xs.start - core_x0 : xs.stop - core_x0]


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


def permuted_reader(read: Reader, order: tuple[int, int, int]) -> Reader:
    """A Reader over the volume with spatial axes permuted: axis i of the view is axis order[i] of `read`."""
    inv = tuple(int(i) for i in np.argsort(order))

    def view(*slices: slice) -> np.ndarray:
        data = read(*(slices[inv[j]] for j in range(3)))
        return data.transpose(0, *(1 + o for o in order))

    return view


# slicing orders of the three orthogonal planes: xy tiles (y, x) per z; xz tiles (z, x) per y; yz tiles (z, y) per x
ORTHO_ORDERS: tuple[tuple[int, int, int], ...] = ((0, 1, 2), (1, 0, 2), (2, 0, 1))


def predict_block_orthoplane(
    model: torch.nn.Module,
    read: Reader,
    box: tuple[slice, slice, slice],
    volume_shape: tuple[int, int, int],
    grid: TileGrid,
    normalize: Normalizer,
    **kw,
) -> np.ndarray:
    """Mean of xy, xz and yz predictions (K, z, y, x) for the core `box` (for isotropic data).

    Each plane is `predict_block_xy` on a permuted view of the volume, so each is anchored to its own global
    grid and mirrored at volume bounds only: the result is as decomposition independent as the xy one.
    """
    total = None
    for order in ORTHO_ORDERS:
        inv = tuple(int(i) for i in np.argsort(order))
        pbox = tuple(box[i] for i in order)
        pshape = tuple(volume_shape[i] for i in order)
        probs = predict_block_xy(model, permuted_reader(read, order), pbox, pshape, grid, normalize, **kw)
        probs = np.ascontiguousarray(probs.transpose(0, *(1 + i for i in inv)))
        total = probs if total is None else total + probs
    return total / np.float32(len(ORTHO_ORDERS))


def predict_volume_orthoplane(model, volume: np.ndarray, grid: TileGrid, normalize: Normalizer, **kw) -> np.ndarray:
    """Whole-volume orthoplane reference (no blocks, no Ray): probabilities (K, Z, Y, X)."""
    vol = volume if volume.ndim == 4 else volume[None]
    box = (slice(0, vol.shape[1]), slice(0, vol.shape[2]), slice(0, vol.shape[3]))
    return predict_block_orthoplane(model, numpy_reader(vol), box, vol.shape[1:], grid, normalize, **kw)
