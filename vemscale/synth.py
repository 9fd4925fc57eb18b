"""Synthetic EM-like volumes with ground truth, for the demo and unit tests (never a stand-in for real data).

Cells are a Voronoi tessellation with dark membranes; mitochondria are dark ellipsoids with a brighter
striped interior (cristae); the whole is blurred and noised like an ssTEM stack. Label 1 = mitochondria.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def synthetic_em(shape: tuple[int, int, int] = (16, 256, 256), seed: int = 0, n_cells: int = 40, n_mito: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """image (uint8) and mitochondria labels (uint8 0/1), both (z, y, x); anisotropic like ssTEM (z ~10x xy)."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    zz, yy, xx = np.meshgrid(np.arange(z) * 10.0, np.arange(y), np.arange(x), indexing="ij")
    # cells: label each voxel by its nearest seed (coarse grid for speed, then upsampled)
    seeds = rng.uniform([0, 0, 0], [z * 10.0, y, x], size=(n_cells, 3))
    coords = np.stack([zz, yy, xx], -1).reshape(-1, 3)
    nearest = np.zeros(coords.shape[0], np.int32)
    best = np.full(coords.shape[0], np.inf)
    for i, s in enumerate(seeds):
        d = ((coords - s) ** 2).sum(1)
        closer = d < best
        best[closer], nearest[closer] = d[closer], i
    cells = nearest.reshape(shape)
    membrane = np.zeros(shape, bool)
    for axis in (1, 2):
        membrane |= np.diff(cells, axis=axis, prepend=np.take(cells, [0], axis=axis)) != 0
    membrane = ndimage.binary_dilation(membrane, structure=np.ones((1, 3, 3), bool))
    cytoplasm = rng.uniform(150, 200, n_cells)[cells]
    image = cytoplasm.astype(np.float32)
    image[membrane] = 60
    # mitochondria: elongated ellipsoids with stripes
    labels = np.zeros(shape, np.uint8)
    for _ in range(n_mito):
        c = rng.uniform([0, 0, 0], [z * 10.0, y, x])
        r = np.array([rng.uniform(15, 40), rng.uniform(8, 14), rng.uniform(14, 30)])
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - c[1], xx - c[2]
        u = dy * np.cos(theta) + dx * np.sin(theta)
        v = -dy * np.sin(theta) + dx * np.cos(theta)
        inside = ((zz - c[0]) / r[0]) ** 2 + (u / r[1]) ** 2 + (v / r[2]) ** 2 <= 1
        labels[inside] = 1
        stripes = 0.5 + 0.5 * np.sin(v[inside] / 2.0)
        image[inside] = 70 + 40 * stripes
    image = ndimage.gaussian_filter(image, sigma=(0, 1.2, 1.2))
    image += rng.normal(0, 12, shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels
