"""Labelled 2D training crops from EM volumes: load the labelled slices, check them, sample random crops.

Labelled data in vEM is a few slices (the RETINA premise), so the chosen slices are held in memory; the
image volumes themselves may be of any size, since only the named z range is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vemscale.errors import UserError

# the label id of pixels the loss skips: pseudo-labels a teacher was not confident about (`load_labelled`)
IGNORE = 255


def parse_range(text: str | None, size: int, what: str = "slices") -> slice:
    """'a:b' (either side optional, negatives from the end) -> slice within [0, size); None -> everything."""
    if text is None or str(text).strip() in ("", ":"):
        return slice(0, size)
    parts = str(text).split(":")
    if len(parts) != 2:
        raise UserError(f"{what} {text!r} must look like 'start:stop', e.g. '0:16'")
    try:
        lo = int(parts[0]) if parts[0].strip() else 0
        hi = int(parts[1]) if parts[1].strip() else size
    except ValueError:
        raise UserError(f"{what} {text!r} must hold integers, e.g. '0:16'") from None
    lo, hi = (lo + size if lo < 0 else lo), (hi + size if hi < 0 else hi)
    if not 0 <= lo < hi <= size:
        raise UserError(f"{what} {text!r} is empty or outside the volume's {size} slices")
    return slice(lo, hi)


@dataclass
class LabelledStack:
    """Image (C, Z, Y, X) raw values and labels (Z, Y, X) uint8 class ids of the chosen slices."""

    image: np.ndarray
    labels: np.ndarray
    name: str
    voxel_size_xyz: tuple[float, float, float] | None
    weight: float = 1.0  # crops are drawn in proportion to the stack's voxels (ignored ones included) x weight
    pseudo: bool = False  # labels are a teacher's pseudo-labels (IGNORE where it was unsure)


def pseudo_labels(probs: np.ndarray, confidence: float, area: list[float] | None = None) -> np.ndarray:
    """Class probabilities (K, Z, Y, X; uint8 = round(p * 255) as infer writes them, or float in [0, 1]) ->
    the most probable class (uint8), IGNORE where that class's probability is below `confidence`.

    With `area` (one fraction per foreground class 1..K-1, e.g. the source labels' class shares): foreground class
    c goes to the round(area[c-1] x N) pixels of highest p_c (ties at the cut included; among classes that claim a
    pixel, the more probable), background to the rest where p_0 >= `confidence`, IGNORE elsewhere: the teacher's
    ranking with the source's proportions, for a teacher that under- or over-segments the new volume."""
    p = np.asarray(probs)
    cut = np.ceil(confidence * 255 - 1e-6) if p.dtype == np.uint8 else confidence
    if area is None:
        sure = p.max(axis=0) >= cut
        return np.where(sure, p.argmax(axis=0), IGNORE).astype(np.uint8)
    if len(area) != p.shape[0] - 1:
        raise UserError(f"pseudo-label area: {len(area)} fraction(s) for {p.shape[0] - 1} foreground class(es)")
    out = np.where(p[0] >= cut, 0, IGNORE).astype(np.uint8)
    best = np.full(p.shape[1:], -1.0, np.float32)
    for c, share in enumerate(area, start=1):
        n = int(round(float(share) * p[c].size))
        if n <= 0:
            continue
        flat = p[c].ravel()
        t = np.partition(flat, flat.size - n)[flat.size - n]  # the n-th largest p_c
        claim = (p[c] >= t) & (p[c] > best)
        out[claim] = c
        best[claim] = p[c][claim]
    return out


def load_labelled(image_url: str, labels_url: str, slices: str | None, num_classes: int,
                  pseudo: float | None = None, weight: float = 1.0,
                  area: list[float] | None = None) -> LabelledStack:
    """Read the z range `slices` of an image and its labels, failing clearly on any mismatch.

    With `pseudo`, `labels_url` is a class-probability volume (c, z, y, x: a `vemscale infer` output's
    probabilities, one channel per class) and the labels are `pseudo_labels(probs, pseudo, area)`: self-training on a
    volume without manual labels, from a teacher's predictions."""
    from vemscale.io.volume import open_volume

    img = open_volume(image_url)
    lab = open_volume(labels_url)
    img_zyx = img.shape[-3:] if img.ndim >= 3 else (1,) + tuple(img.shape)
    lab_zyx = lab.shape[-3:] if lab.ndim >= 3 else (1,) + tuple(lab.shape)
    if pseudo is not None:
        if lab.ndim != 4 or lab.shape[0] != num_classes:
            raise UserError(f"pseudo-labels {labels_url!r} must be class probabilities (c,z,y,x) with one channel per "
                            f"class ({num_classes}), e.g. a vemscale infer output's probabilities; got shape "
                            f"{tuple(lab.shape)}")
        if lab.dtype != np.uint8 and not np.issubdtype(lab.dtype, np.floating):
            raise UserError(f"pseudo-labels {labels_url!r} have dtype {lab.dtype}; expected uint8 (p x 255, as infer "
                            "writes) or float probabilities")
    if tuple(img_zyx) != tuple(lab_zyx):
        raise UserError(
            f"labels {labels_url!r} have shape {tuple(lab.shape)} (z,y,x) but image {image_url!r} has {tuple(img.shape)}; "
            "they must cover the same voxels"
        )
    if pseudo is None and not np.issubdtype(lab.dtype, np.integer) and lab.dtype != np.bool_:
        raise UserError(f"labels {labels_url!r} have dtype {lab.dtype}; expected integer class ids")
    zs = parse_range(slices, img_zyx[0])
    image = img.read((slice(None),) * (img.ndim - 3) + (zs,)) if img.ndim >= 3 else img.read()[None]
    image = image if image.ndim == 4 else image[None]
    if pseudo is not None:
        probs = np.asarray(lab.read((slice(None), zs)))
        if probs.dtype != np.uint8 and probs.size and not (0 <= float(probs.min()) and float(probs.max()) <= 1):
            raise UserError(f"pseudo-labels {labels_url!r} hold values in [{float(probs.min()):g}, {float(probs.max()):g}]; "
                            "float probabilities must lie in [0, 1] (softmax outputs, not logits)")
        labels = pseudo_labels(probs, pseudo, area)
        return LabelledStack(image, labels, f"{image_url}[{zs.start}:{zs.stop}] (pseudo-labels)", img.voxel_size_xyz,
                             weight, True)
    labels = lab.read((zs,)) if lab.ndim >= 3 else lab.read()[None]
    labels = np.asarray(labels)
    top = int(labels.max()) if labels.size else 0
    if top >= num_classes or (labels.size and int(labels.min()) < 0):
        found = np.unique(labels)
        raise UserError(
            f"labels {labels_url!r} hold values {found[:10].tolist()} but the config declares {num_classes} classes "
            f"(ids 0..{num_classes - 1}); fix data.classes or the labels"
        )
    return LabelledStack(image, labels.astype(np.uint8), f"{image_url}[{zs.start}:{zs.stop}]", img.voxel_size_xyz,
                         weight)


def class_shares(stacks: list[LabelledStack], num_classes: int) -> list[float]:
    """The share of labelled voxels of each foreground class (1..K-1) over manually labelled stacks."""
    counts = np.zeros(num_classes, np.int64)
    for st in stacks:
        counts += np.bincount(st.labels.ravel(), minlength=num_classes)[:num_classes]
    return (counts[1:] / max(1, counts.sum())).tolist()


def dtype_scale(dtype: np.dtype) -> float:
    """The value that maps to 1.0: the integer max for integer images, 1 for floats."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def channel_stats(stacks: list[LabelledStack], scale: float) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images after dividing by `scale` (for normalisation)."""
    c = stacks[0].image.shape[0]
    s1, s2, n = np.zeros(c), np.zeros(c), 0
    for st in stacks:
        x = st.image.reshape(c, -1).astype(np.float64) / scale
        s1 += x.sum(1)
        s2 += (x**2).sum(1)
        n += x.shape[1]
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 1e-12))
    return mean.tolist(), std.tolist()


def plane_axes(planes: str, voxel_size_xyz) -> list[int]:
    """Axes to slice along: [0] = xy slices; [0,1,2] = xy, xz, yz (isotropic data, as RETINA did for UroCell)."""
    if planes == "xy":
        return [0]
    if planes == "all":
        return [0, 1, 2]
    if planes == "auto":
        if voxel_size_xyz is None:
            return [0]
        x, y, z = voxel_size_xyz
        return [0, 1, 2] if max(x, y, z) <= 2 * min(x, y, z) else [0]
    raise UserError(f"planes must be xy, all or auto, got {planes!r}")


class CropSampler:
    """Random 2D crops (image (C,T,T) raw, labels (T,T)) from labelled stacks, along the chosen plane axes."""

    def __init__(self, stacks: list[LabelledStack], crop: int, axes: list[int], seed: int,
                 match: dict | None = None, match_p: float = 0.0, p_foreground: float = 0.0):
        if not stacks:
            raise UserError("the training set is empty: give at least one labelled volume under data.train")
        self.stacks, self.crop, self.axes = stacks, crop, axes
        from vemscale.io.histogram import Histogram

        # histogram matching as an augmentation: a crop is matched to `match` with probability match_p
        self.match, self.match_p = (Histogram.from_dict(match) if match else None), float(match_p)
        sizes = np.array([st.labels.size * st.weight for st in stacks], np.float64)
        self.p = sizes / sizes.sum()
        self.rng = np.random.default_rng(seed)
        # albumentations CropNonEmptyMaskIfExists: with p_foreground, a crop around a random labelled pixel
        self.p_foreground = float(p_foreground)

    def _plane(self, st: LabelledStack, axis: int) -> tuple[np.ndarray, np.ndarray]:
        i = int(self.rng.integers(st.labels.shape[axis]))
        img = np.take(st.image, i, axis=axis + 1)
        lab = np.take(st.labels, i, axis=axis)
        return img, lab

    def sample(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        t = self.crop
        c = self.stacks[0].image.shape[0]
        imgs = np.empty((batch, c, t, t), self.stacks[0].image.dtype)
        labs = np.empty((batch, t, t), np.int64)
        for b in range(batch):
            st = self.stacks[int(self.rng.choice(len(self.stacks), p=self.p))]
            axis = self.axes[int(self.rng.integers(len(self.axes)))]
            img, lab = self._plane(st, axis)
            h, w = lab.shape
            if h < t or w < t:  # small planes are mirror-padded up to the crop size
                ph, pw = max(0, t - h), max(0, t - w)
                img = np.pad(img, ((0, 0), (0, ph), (0, pw)), mode="reflect" if min(h, w) > 1 else "edge")
                lab = np.pad(lab, ((0, ph), (0, pw)), mode="reflect" if min(h, w) > 1 else "edge")
                h, w = lab.shape
            y = int(self.rng.integers(h - t + 1))
            x = int(self.rng.integers(w - t + 1))
            if self.p_foreground > 0 and self.rng.random() < self.p_foreground:
                fg = np.flatnonzero((lab > 0) & (lab != IGNORE))
                if len(fg):  # a random labelled pixel, then a random crop that holds it
                    py, px = divmod(int(fg[int(self.rng.integers(len(fg)))]), w)
                    y = int(self.rng.integers(max(0, py - t + 1), min(py, h - t) + 1))
                    x = int(self.rng.integers(max(0, px - t + 1), min(px, w - t) + 1))
            imgs[b] = img[:, y : y + t, x : x + t]
            labs[b] = lab[y : y + t, x : x + t]
            if self.match is not None and self.rng.random() < self.match_p:
                from vemscale.io.histogram import histogram_of, match_lut

                imgs[b] = match_lut(histogram_of(imgs[b]), self.match)[imgs[b]]
        return imgs, labs
