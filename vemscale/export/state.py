"""Neuroglancer viewer state for a set of layers: what each layer is, and the JSON state that shows them.

A layer argument is `[name=]url[:kind]` (kind = image | probabilities | segmentation, else read from the
metadata): a precomputed layer (its `info` says image/segmentation; `vemscale` attrs mark probabilities),
an OME-Zarr/zarr array or an n5 array. Local layers are served by `vemscale view`; s3://, gs:// and
http(s):// layers are referenced directly, so their state works on a public Neuroglancer too.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from vemscale.errors import UserError
from vemscale.io.urls import kvstore_url, parse_url

__all__ = ["Layer", "describe_layer", "expand_layer_args", "build_state", "state_url", "PUBLIC_VIEWER", "KINDS"]

PUBLIC_VIEWER = "https://neuroglancer-demo.appspot.com/"
KINDS = ("image", "probabilities", "segmentation")
MAX_SHOWN_SEGMENTS = 200  # more segments than this: none selected (all drawn in 2D, no meshes loaded)
COLORS = ((1.0, 0.2, 0.2), (0.2, 1.0, 0.2), (0.3, 0.5, 1.0), (1.0, 1.0, 0.2), (1.0, 0.2, 1.0), (0.2, 1.0, 1.0),
          (1.0, 0.6, 0.2), (0.7, 0.4, 1.0))
_NG_PREFIX = {"precomputed": "precomputed://", "zarr2": "zarr2://", "zarr3": "zarr3://", "n5": "n5://"}


@dataclass
class Layer:
    """One layer to show: where it lives, how Neuroglancer reads it and how to draw it."""

    name: str
    url: str  # kvstore URL (file://... or s3://, gs://, http(s)://), with trailing '/'
    fmt: str  # precomputed | zarr2 | zarr3 | n5
    kind: str  # image | probabilities | segmentation
    local_path: str | None  # directory to serve, None when remote
    shape_zyx: tuple[int, int, int]
    voxel_size_xyz: tuple[float, float, float] | None
    channels: int = 1
    classes: list[str] | None = None
    segments: list[int] = field(default_factory=list)

    def source(self, served_base: str | None = None) -> str:
        """The Neuroglancer data source: served over HTTP when local, else the remote URL itself."""
        if self.local_path is not None:
            if served_base is None:
                raise UserError(f"layer {self.name!r} is local; it must be served (vemscale view serves it)")
            where = f"{served_base.rstrip('/')}/{urllib.parse.quote(self.name)}/"
        else:
            where = self.url
        return _NG_PREFIX[self.fmt] + where.rstrip("/")


def _split_arg(arg: str) -> tuple[str | None, str, str | None]:
    """`[name=]url[:kind]` -> (name, url, kind)."""
    name = None
    head, sep, rest = arg.partition("=")
    if sep and "/" not in head and ":" not in head and head:
        name, arg = head, rest
    kind = None
    base, _, tail = arg.rpartition(":")
    if base and tail in KINDS:
        arg, kind = base, tail
    return name, arg, kind


def _read_json(kv_url: str, key: str) -> Any | None:
    import tensorstore as ts

    try:
        res = ts.KvStore.open(kv_url).result().read(key).result()
    except ValueError:
        return None
    if res.state != "value":
        return None
    try:
        return json.loads(bytes(res.value))
    except ValueError:
        return None


def _detect_format(kv_url: str, hint: str | None) -> str:
    if hint == "neuroglancer_precomputed":
        return "precomputed"
    if hint == "n5":
        return "n5"
    if hint == "zarr3":
        return "zarr3"
    for key, fmt in (("info", "precomputed"), ("zarr.json", "zarr3"), (".zattrs", "zarr2"), (".zarray", "zarr2"),
                     (".zgroup", "zarr2"), ("attributes.json", "n5")):
        if _read_json(kv_url, key) is not None:
            return fmt
    raise UserError(f"{kv_url!r} holds no precomputed, zarr or n5 metadata; Neuroglancer reads only those: "
                    "convert it first with `vemscale export SRC DST` (or `vemscale ingest`)")


def _guess_kind(name: str, dtype: np.dtype, channels: int, ndim: int) -> str:
    if ndim == 4 and channels > 1:
        return "probabilities"
    if dtype.kind in "iub" and (dtype.itemsize > 1 or any(w in name.lower() for w in ("label", "seg", "mask"))):
        return "segmentation"
    return "image"


def _omero_labels(kv_url: str) -> list[str] | None:
    attrs = _read_json(kv_url, ".zattrs") or (_read_json(kv_url, "zarr.json") or {}).get("attributes", {})
    attrs = attrs.get("ome", attrs) if isinstance(attrs, dict) else {}
    channels = (attrs.get("omero") or {}).get("channels") if isinstance(attrs, dict) else None
    return [str(c.get("label", i)) for i, c in enumerate(channels)] if channels else None


def expand_layer_args(args: Sequence[str]) -> list[str]:
    """Replace a local `vemscale infer` output folder by its layers (`.zattrs` "vemscale" layers, or the
    precomputed sub-layers of a folder without metadata of its own); other arguments stay as they are."""
    out: list[str] = []
    for arg in args:
        name, url, kind = _split_arg(arg)
        parsed = parse_url(url)
        path = parsed.location
        if name or kind or parsed.remote or not os.path.isdir(path) or os.path.exists(os.path.join(path, "info")):
            out.append(arg)
            continue
        attrs = _read_json(kvstore_url(parsed), ".zattrs") or (_read_json(kvstore_url(parsed), "zarr.json") or {}).get("attributes") or {}
        layers = (attrs.get("vemscale") or {}).get("layers") if "multiscales" not in attrs else None
        if not layers and not any(os.path.exists(os.path.join(path, k)) for k in (".zattrs", "zarr.json", ".zarray")):
            layers = {d: d for d in sorted(os.listdir(path)) if os.path.exists(os.path.join(path, d, "info"))}
        out.extend([f"{n}={os.path.join(path, p)}" for n, p in layers.items()] if layers else [arg])
    return out


def describe_layer(arg: str) -> Layer:
    """Read a layer's metadata (shape, voxel size, type, classes, segments) from `[name=]url[:kind]`."""
    from vemscale.io import open_volume

    name, url, kind = _split_arg(arg)
    parsed = parse_url(url)
    if parsed.dataset is not None or (not parsed.remote and os.path.isfile(parsed.location)):
        raise UserError(f"{url!r} is a file; Neuroglancer reads precomputed, zarr and n5 directories: "
                        f"export it first (vemscale export {url} DST)")
    if not parsed.remote and not os.path.isdir(parsed.location):
        raise UserError(f"layer {url!r} does not exist")
    kv = kvstore_url(parsed)
    fmt = _detect_format(kv, parsed.driver)
    name = name or os.path.basename(parsed.location.rstrip("/")) or "layer"
    vol = open_volume(url)
    channels = vol.shape[0] if vol.ndim == 4 else 1
    classes, segments = None, []
    if fmt == "precomputed":
        info = _read_json(kv, "info") or {}
        extra = info.get("vemscale") or {}
        classes = extra.get("classes")
        auto = "segmentation" if info.get("type") == "segmentation" else (
            "probabilities" if extra.get("kind") == "probabilities" or channels > 1 else "image")
        if info.get("segment_properties"):
            props = _read_json(kv + info["segment_properties"].strip("/") + "/", "info") or {}
            segments = [int(i) for i in (props.get("inline") or {}).get("ids", [])]
        if not segments and info.get("mesh"):
            from vemscale.export.meshes import mesh_ids

            segments = mesh_ids(url, limit=MAX_SHOWN_SEGMENTS)
    else:
        auto = _guess_kind(name, vol.dtype, channels, vol.ndim)
        classes = _omero_labels(kv) if channels > 1 else None
    if len(segments) > MAX_SHOWN_SEGMENTS:
        segments = []
    return Layer(name=name, url=kv, fmt=fmt, kind=kind or auto, local_path=None if parsed.remote else parsed.location,
                 shape_zyx=tuple(int(s) for s in vol.shape[-3:]), voxel_size_xyz=vol.voxel_size_xyz,
                 channels=channels, classes=list(classes) if classes else None, segments=segments)


def probability_shader(channels: int, classes: Sequence[str] | None,
                       color: tuple[float, float, float] | None = None) -> str:
    """A shader colouring each foreground class's probability (channel 0 skipped when it is background)."""
    skip0 = channels > 1 and (classes is None or str(classes[0]).lower() in ("background", "bg", "class_0"))
    lines, k = [], 0
    for c in range(channels):
        if c == 0 and skip0:
            continue
        r, g, b = color or COLORS[k % len(COLORS)]
        value = "toNormalized(getDataValue())" if channels == 1 else f"toNormalized(getDataValue({c}))"
        lines.append(f"  p = {value}; rgb += p * vec3({r}, {g}, {b}); a = max(a, p);")
        k += 1
    return ("#uicontrol float strength slider(min=0, max=1, default=0.6)\n"
            "void main() {\n  vec3 rgb = vec3(0.0); float a = 0.0; float p;\n" + "\n".join(lines)
            + "\n  emitRGBA(vec4(min(rgb, vec3(1.0)), a * strength));\n}\n")


def _foreground(layer: Layer) -> list[int]:
    """Channels to colour: all but channel 0 when it is background."""
    c = layer.channels
    skip0 = c > 1 and (layer.classes is None or str(layer.classes[0]).lower() in ("background", "bg", "class_0"))
    return [i for i in range(c) if not (i == 0 and skip0)]


def _layer_states(layer: Layer, served_base: str | None) -> list[dict[str, Any]]:
    """One layer's state; zarr/n5 probabilities become one layer per class (their channels are chunked apart,
    which a multi-channel shader cannot read), selected by the local channel position."""
    source = layer.source(served_base)
    if layer.kind == "segmentation":
        return [{"type": "segmentation", "source": source, "name": layer.name,
                 "segments": [str(s) for s in layer.segments], "selectedAlpha": 0.45}]
    if layer.kind != "probabilities":
        return [{"type": "image", "source": source, "name": layer.name}]
    if layer.fmt == "precomputed" or layer.channels == 1:
        return [{"type": "image", "source": source, "name": layer.name,
                 "shader": probability_shader(layer.channels, layer.classes)}]
    out = []
    for k, c in enumerate(_foreground(layer)):
        label = layer.classes[c] if layer.classes and c < len(layer.classes) else f"class_{c}"
        out.append({"type": "image", "source": source, "name": f"{layer.name}:{label}", "localPosition": [c],
                    "shader": probability_shader(1, None, COLORS[k % len(COLORS)])})
    return out


def build_state(layers: Sequence[Layer], served_base: str | None = None, layout: str = "4panel",
                panel_pixels: int = 500) -> dict[str, Any]:
    """The viewer state: the layers in order, voxel-size dimensions, position at the volume centre, zoom to fit."""
    if not layers:
        raise UserError("no layers to show")
    ref = next((lay for lay in layers if lay.voxel_size_xyz), layers[0])
    vs = ref.voxel_size_xyz or (1.0, 1.0, 1.0)
    z, y, x = ref.shape_zyx
    return {
        "dimensions": {axis: [float(v) * 1e-9, "m"] for axis, v in zip("xyz", vs)},
        "position": [x / 2, y / 2, z / 2],
        "crossSectionScale": max(max(x, y) / (0.9 * panel_pixels), 0.05),
        "projectionScale": float(max(x * vs[0], y * vs[1], z * vs[2]) / min(vs) * 1.5),
        "layers": [state for lay in layers for state in _layer_states(lay, served_base)],
        "selectedLayer": {"visible": False},
        "layout": layout,
    }


def state_url(state: dict[str, Any], viewer_base: str = PUBLIC_VIEWER) -> str:
    """A viewer URL carrying the whole state in its fragment (`#!{json}`)."""
    text = json.dumps(state, separators=(",", ":"))
    return viewer_base.rstrip("/") + "/#!" + urllib.parse.quote(text, safe="~@$&()*!+=:;,.?/'")
