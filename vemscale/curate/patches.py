"""Pure functions over one 2D patch or one plane: where patches are cut, which are kept, their statistics and hash.

- Where: a plane of H x W pixels gives max(1, round(H/P)) x max(1, round(W/P)) patches of P x P, the count
  CEM500K's `patchify3d.py` cuts (non-overlapping P-pixel tiles, a strip under P/2 dropped); we spread the
  starts evenly so every patch is whole (CEM500K keeps clipped edge patches), and a plane smaller than P gives
  one smaller patch.
- Which: a patch is drawn with probability `density x its area in um^2` (capped at 1), decided by a seeded
  generator of (seed, source, plane, slice), so a rerun or a resumed run draws the same patches, and a volume
  contributes in proportion to its physical area, not its pixel count.
- Statistics of the 8-bit patch: grey-level std, std of its 4x4-pooled means (the tissue measure of
  `infer mask=auto`: pooling averages detector noise out, so noisy empty resin scores low), Shannon entropy
  (bits), variance of the Laplacian (focus), fraction of saturated pixels (0 or 255); `reason` names the first
  rule a patch fails.
- Hash: imagehash's dHash of the patch resized to 224 x 224 bilinear, hash_size 8 (CEM500K `patchify3d.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

PLANES = ("xy", "xz", "yz")
PLANE_NORMAL = {"xy": 0, "xz": 1, "yz": 2}  # axis of z,y,x a plane is perpendicular to
HASH_SIZE = 8  # dHash bits per side: 64-bit hashes (CEM500K patchify3d.py: imagehash.dhash(..., hash_size=8))
HASH_RESIZE = 224  # patches are hashed at 224 x 224, bilinear (CEM500K patchify3d.py: .resize((224, 224), resample=2))
REASONS = ("flat", "saturated", "low_entropy", "blurry", "classifier", "duplicate")


def patch_starts(size: int, patch: int) -> np.ndarray:
    """Starts of the patches along one axis: round(size/patch) of them (>= 1), spread so each lies inside."""
    if size <= patch:
        return np.zeros(1, np.int64)
    n = max(1, int(round(size / patch)))
    return np.rint(np.linspace(0, size - patch, n)).astype(np.int64)


def draw_probability(density_per_um2: float | None, window_yx: Sequence[int], pixel_nm: Sequence[float] | None) -> float:
    """Chance that a patch is drawn: density (patches per um^2) x the patch window's area; None: every patch."""
    if density_per_um2 is None:
        return 1.0
    if pixel_nm is None:
        raise ValueError("a density needs the pixel size")
    area_um2 = window_yx[0] * pixel_nm[0] * window_yx[1] * pixel_nm[1] / 1e6
    return min(1.0, density_per_um2 * area_um2)


def drawn(seed: int, source: int, plane: int, slice_index: int, n: int, p: float) -> np.ndarray:
    """Which of the n grid patches of one slice are drawn (a pure function of its arguments)."""
    if p >= 1.0:
        return np.ones(n, bool)
    return np.random.default_rng([seed, source, plane, slice_index]).random(n) < p


def to_uint8(x: np.ndarray, scale: float) -> np.ndarray:
    """Raw grey values -> uint8 by the dtype's range (x / scale * 255), as CEM500K's patchify3d.py converts."""
    if x.dtype == np.uint8:
        return x
    return np.clip(np.rint(x.astype(np.float64) / scale * 255.0), 0, 255).astype(np.uint8)


def resample(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A uint8 patch resized to `shape` (anti-aliased when shrinking): patches at a target pixel size."""
    if tuple(x.shape) == tuple(shape):
        return x
    from skimage.transform import resize

    out = resize(x, tuple(shape), order=1, anti_aliasing=x.shape[0] > shape[0], preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class PatchStats:
    std: float
    pooled_std: float
    entropy: float
    laplacian_var: float
    saturated: float


def patch_stats(x: np.ndarray) -> PatchStats:
    """Statistics of a uint8 patch that tell empty resin, saturation and blur from tissue."""
    from scipy import ndimage

    from vemscale.infer.tissue import cell_std

    f = x.astype(np.float64)
    hist = np.bincount(x.ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / x.size
    lap = ndimage.laplace(f, mode="reflect")
    h, w = max(1, x.shape[0] // 4 * 4), max(1, x.shape[1] // 4 * 4)
    pooled = float(cell_std(x[None, :h, :w], (1, h, w))[0, 0, 0])
    return PatchStats(std=float(f.std()), pooled_std=pooled, entropy=float(-(p * np.log2(p)).sum()),
                      laplacian_var=float(lap.var()), saturated=float((hist[0] + hist[255]) / x.size))


@dataclass(frozen=True)
class Filters:
    """Thresholds of the hand-made filters (defaults checked on ../shared/data, see BENCHMARKS.md)."""

    min_std: float = 8.0
    max_saturated: float = 0.5
    min_entropy: float = 4.0
    min_laplacian_var: float = 20.0


def reason(stats: PatchStats, filters: Filters) -> str:
    """The first rule a patch fails ('' when it passes every rule)."""
    if stats.pooled_std < filters.min_std:
        return "flat"
    if stats.saturated > filters.max_saturated:
        return "saturated"
    if stats.entropy < filters.min_entropy:
        return "low_entropy"
    if stats.laplacian_var < filters.min_laplacian_var:
        return "blurry"
    return ""


def dhash(x: np.ndarray) -> int:
    """64-bit difference hash of a uint8 patch, as an unsigned int (CEM500K's settings, see the module doc)."""
    import imagehash
    from PIL import Image

    img = Image.fromarray(x).resize((HASH_RESIZE, HASH_RESIZE), resample=Image.BILINEAR)
    bits = imagehash.dhash(img, hash_size=HASH_SIZE).hash.ravel()
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """Bit differences between uint64 hashes (broadcast)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64))).astype(np.int64)


def plane_shape(zyx: Sequence[int], plane: str) -> tuple[int, int, int]:
    """(slices, H, W) of a volume cut in `plane`: xy (z; y, x), xz (y; z, x), yz (x; z, y)."""
    a = PLANE_NORMAL[plane]
    rest = [int(zyx[i]) for i in range(3) if i != a]
    return int(zyx[a]), rest[0], rest[1]


def plane_box(plane: str, k: int, y0: int, y1: int, x0: int, x1: int) -> tuple[slice, slice, slice]:
    """The z,y,x box of slice k, rows y0:y1, columns x0:x1 of a plane."""
    a = PLANE_NORMAL[plane]
    rest = [slice(y0, y1), slice(x0, x1)]
    box = []
    for i in range(3):
        box.append(slice(k, k + 1) if i == a else rest.pop(0))
    return tuple(box)  # type: ignore[return-value]


def window(patch: int, pixel_nm: Sequence[float] | None, target_nm: float | None) -> tuple[int, int]:
    """Source pixels (rows, columns) a patch covers: `patch` at native resolution, else patch x target/source."""
    if target_nm is None or pixel_nm is None:
        return patch, patch
    return tuple(max(1, int(round(patch * target_nm / p))) for p in pixel_nm)  # type: ignore[return-value]


def slices_per_task(grid_patches: int, target_patches: int = 256) -> int:
    """Slices one task cuts: about `target_patches` patches per task, at least one slice."""
    return max(1, target_patches // max(1, grid_patches))
