"""What `vemscale instances` reads: per-class probabilities (or class labels) of a volume, as a class image per box.

A source is a `vemscale infer` output directory (its `probabilities` layer, else its `labels`), a c,z,y,x
probability volume (uint8 p*255 or float in [0, 1]), or a z,y,x label volume of class ids (e.g. ground
truth). Class names come from the infer output's attributes; a volume without them names its channels
`class0..` (probabilities) or its values `1, 2, ...` (labels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from vemscale.config import absolute_url
from vemscale.errors import UserError
from vemscale.io.urls import join_url, parse_url
from vemscale.io.volume import Volume, open_volume
from vemscale.post.instances import class_image

__all__ = ["ClassSource", "open_source"]


def _attrs(url: str) -> dict[str, Any]:
    """The attributes of a zarr group, v2 or v3 ({} when there is none)."""
    import tensorstore as ts

    from vemscale.io.ome_zarr import read_group_attrs
    from vemscale.io.urls import kvstore_url

    parsed = parse_url(url)
    if not parsed.remote and not os.path.isdir(parsed.location):
        return {}
    return read_group_attrs(ts.KvStore.open(kvstore_url(parsed).rstrip("/") + "/").result())


def _infer_attrs(url: str) -> dict[str, Any] | None:
    return _attrs(url).get("vemscale")


def _channel_labels(url: str) -> list[str] | None:
    """OME-Zarr channel labels (omero metadata), if the image has them."""
    try:
        channels = _attrs(url).get("omero", {}).get("channels") or []
    except (OSError, ValueError):
        return None
    labels = [str(c.get("label")) for c in channels if c.get("label") is not None]
    return labels if labels and len(labels) == len(channels) else None


@dataclass
class ClassSource:
    """A volume and how a box of it becomes a class image 1..C for the requested classes (0 = none)."""

    volume: Volume
    kind: str  # "probabilities" | "labels"
    channels: list[int]  # probabilities: channel per requested class; labels: the value per requested class
    classes: list[str]  # requested class names, in class-index order 1..C
    threshold: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.shape[-3:])  # type: ignore[return-value]

    def read(self, box: Sequence[slice]) -> np.ndarray:
        if self.kind == "labels":
            data = self.volume.read(tuple(box))
            out = np.zeros(data.shape, np.uint8)
            for j, value in enumerate(self.channels):
                out[data == value] = j + 1
            return out
        data = self.volume.read((slice(None), *box))[self.channels]
        if data.dtype.kind == "f":
            data = np.rint(np.clip(data, 0.0, 1.0) * 255.0).astype(np.uint8)
        elif data.dtype != np.uint8:
            raise UserError(f"probabilities {self.volume.url!r} are {data.dtype}; expected uint8 (p*255) or float")
        return class_image(data, [self.threshold] * len(self.channels))


def open_source(source: str, classes: Sequence[str] | None, threshold: float) -> ClassSource:
    """Open `source` and pick the requested classes; UserError when a class has no probabilities (or labels)."""
    url = absolute_url(source)
    attrs = _infer_attrs(url) if not url.endswith((".tif", ".tiff", ".h5", ".mrc")) else None
    names: list[str] | None = None
    if attrs and "layers" in attrs:  # a vemscale infer output: prefer its probabilities
        names = list(attrs.get("classes") or [])
        layer = "probabilities" if "probabilities" in attrs["layers"] else "labels"
        url = join_url(url, layer)
    else:
        parent = _infer_attrs(os.path.dirname(url.rstrip("/"))) if "://" not in url else None
        if parent and parent.get("classes"):
            names = list(parent["classes"])
    vol = open_volume(url)
    if vol.ndim == 4:
        kind = "probabilities"
        if not names and not url.endswith((".tif", ".tiff", ".h5", ".mrc")):
            names = _channel_labels(url)
        names = names if names and len(names) == vol.shape[0] else [f"class{i}" for i in range(vol.shape[0])]
        default = names[1:] if len(names) > 1 else names
    elif vol.ndim == 3:
        if vol.dtype.kind not in "biu":
            raise UserError(f"{source!r} is a z,y,x {vol.dtype} volume: give class probabilities (c,z,y,x, e.g. a "
                            "vemscale infer output written with write=both) or integer class labels")
        kind = "labels"
        default = names[1:] if names else ["1"]
    else:
        raise UserError(f"{source!r} has shape {vol.shape}; instances need c,z,y,x probabilities or z,y,x class labels")
    wanted = list(classes) if classes else default
    if kind == "probabilities":
        missing = [c for c in wanted if c not in names]
        if missing:
            raise UserError(f"source {source!r} has no probabilities for class(es) {missing}; it has {names}"
                            + ("" if attrs and "probabilities" in attrs.get("layers", {}) or vol.ndim == 4 else
                               " (rerun vemscale infer with write=both)"))
        channels = [names.index(c) for c in wanted]
    else:
        channels = []
        for c in wanted:
            if names and c in names:
                channels.append(names.index(c))
            elif str(c).isdigit():
                channels.append(int(c))
            else:
                raise UserError(f"source {source!r} is a label volume without a class named {c!r}"
                                + (f" (classes: {names})" if names else "; name classes by their label value, e.g. classes=1"))
    if len(set(wanted)) != len(wanted):
        raise UserError(f"classes {wanted} repeat a class")
    if len(wanted) > 255:
        raise UserError(f"{len(wanted)} classes requested; at most 255")
    return ClassSource(vol, kind, channels, [str(c) for c in wanted], float(threshold))
