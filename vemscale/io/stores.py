"""Open chunked stores with tensorstore (zarr v2/v3, OME-Zarr, n5, Neuroglancer precomputed), local or remote.

The format is found from metadata keys read through the tensorstore kvstore (`zarr.json`, `.zarray`,
`.zattrs`, `attributes.json`, `info`), so detection is the same for a local directory and an s3:// or
gs:// prefix. Every store is returned as a view in [c,]z,y,x order with a 0-based domain:
- precomputed (x,y,z,channel in tensorstore) is transposed, and a single channel dropped;
- N5 lists dimensions fastest-first (x,y,z[,c]); its `axes` attribute is used when present, otherwise the
  order is reversed;
- OME-Zarr axes are matched by name; singleton axes other than c,z,y,x (e.g. t) are dropped;
- a 2-D (y,x) array gets a leading z axis of size 1.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from vemscale.errors import UserError
from vemscale.io.ome_zarr import Multiscale, parse_multiscales, read_json
from vemscale.io.readers import Box, Reader, clean_voxel_size, unit_factor_nm
from vemscale.io.urls import ACCEPTED_FORMATS, ParsedUrl, join_url, kvstore_url

__all__ = ["TensorStoreReader", "open_tensorstore"]

_META_KEYS = ("zarr.json", ".zarray", ".zattrs", ".zgroup", "attributes.json", "info")


class TensorStoreReader(Reader):
    """A normalised tensorstore view ([c,]z,y,x, origin 0); TensorStore handles pickle by spec."""

    def __init__(self, store: ts.TensorStore, voxel_size_xyz: Sequence[float] | None, kind: str) -> None:
        self.store = store
        self.kind = kind
        self.shape = tuple(int(s) for s in store.shape)
        self.dtype = np.dtype(store.dtype.numpy_dtype)
        try:
            chunk = store.chunk_layout.read_chunk.shape
            self.chunks = tuple(int(c) if c else 1 for c in chunk) if chunk is not None else None
        except (ValueError, TypeError):
            self.chunks = None
        self.voxel_size_xyz = clean_voxel_size(voxel_size_xyz)
        self._lock = threading.Lock()

    def read(self, box: Box) -> np.ndarray:
        return np.asarray(self.store[box].read().result())

    def read_into(self, box: Box, out: np.ndarray) -> np.ndarray:
        """Decode straight into `out` (no new array: see `vemscale.blocks.scratch`)."""
        view = self.store[box]
        ts.array(out, copy=False, write=True).write(view.translate_to[(0,) * view.rank]).result()
        return out


def _result(future: Any, what: str) -> Any:
    try:
        return future.result()
    except ValueError as err:  # tensorstore reports I/O, auth and format errors as ValueError
        from vemscale.io.writable import access_hint

        hint = access_hint(err)
        raise UserError(f"cannot open {what}: {err}" + (f"; {hint}" if hint else "")) from None


def _to_zyx(store: ts.TensorStore, names: Sequence[str | None], types: Sequence[str | None] | None = None,
            where: str = "") -> ts.TensorStore:
    """Reorder `store` (axes named `names`) to [c,]z,y,x: drop other singleton axes, add z if missing."""
    names = [None if n is None else str(n).lower() for n in names]
    types = list(types) if types is not None else [None] * len(names)
    role: list[str | None] = []
    for n, t in zip(names, types):
        if n in ("z", "y", "x"):
            role.append(n)
        elif t == "channel" or n in ("c", "ch", "channel", "channels"):
            role.append("c")
        else:
            role.append(None)
    if "y" not in role or "x" not in role or len(set(r for r in role if r)) != len([r for r in role if r]):
        raise UserError(f"{where}: cannot map axes {names} to [c,]z,y,x")
    keep = [i for i, r in enumerate(role) if r is not None]
    for i, r in enumerate(role):
        if r is None and store.shape[i] != 1:
            raise UserError(f"{where}: axis {names[i]!r} has size {store.shape[i]}; only c,z,y,x axes may be larger than 1")
    index: list[Any] = [slice(None) if r is not None else store.domain[i].inclusive_min for i, r in enumerate(role)]
    view = store[tuple(index)] if len(keep) < len(role) else store
    roles = [role[i] for i in keep]
    order = [roles.index(r) for r in ("c", "z", "y", "x") if r in roles]
    view = view[ts.d[order].transpose[:]] if order != list(range(len(order))) else view
    if "z" not in roles:
        pos = 1 if "c" in roles else 0
        view = view[(slice(None),) * pos + (ts.newaxis, Ellipsis)]
    return view.translate_to[0]


def _positional(store: ts.TensorStore, where: str) -> ts.TensorStore:
    """An array without axis names: y,x / z,y,x / c,z,y,x by position."""
    names = {2: "yx", 3: "zyx", 4: "czyx"}.get(store.rank)
    if names is None:
        raise UserError(f"{where}: array of rank {store.rank} (shape {tuple(store.shape)}) has no axis names; "
                        "expected y,x / z,y,x / c,z,y,x")
    return _to_zyx(store, list(names), where=where)


def _parent_multiscale(parsed: ParsedUrl) -> tuple[Multiscale, int] | None:
    """If the array sits in an OME-Zarr group that lists it, that multiscale and the array's index."""
    loc = parsed.location.rstrip("/")
    if "/" not in loc:
        return None
    parent, leaf = loc.rsplit("/", 1)
    try:
        kv = ts.KvStore.open(kvstore_url(ParsedUrl(parsed.original, parent, parsed.remote))).result()
        attrs = read_json(kv, ".zattrs")
        if attrs is None:
            group = read_json(kv, "zarr.json") or {}
            attrs = group.get("attributes")
    except (ValueError, UserError):
        return None
    ms = parse_multiscales(attrs)
    if ms is None or leaf not in ms.paths:
        return None
    return ms, ms.paths.index(leaf)


def _open_ome(kv_url: str, ms: Multiscale, driver: str, scale: int | str | None, where: str) -> tuple[ts.TensorStore, Any]:
    i = ms.index(scale, where)
    store = _result(ts.open({"driver": driver, "kvstore": join_url(kv_url, ms.paths[i]) + "/"}, open=True, read=True),
                    f"{where} scale {ms.paths[i]!r}")
    if store.rank != len(ms.axes):
        raise UserError(f"{where}: scale {ms.paths[i]!r} has rank {store.rank} but metadata lists axes {list(ms.axes)}")
    return _to_zyx(store, ms.axes, ms.axis_types, where), ms.voxel_size_xyz(i)


def _n5_voxel(attrs: dict[str, Any], factors: Sequence[float] | None = None) -> tuple[float, float, float] | None:
    """N5 voxel size (x,y,z nm) from `resolution`/`pixelResolution` (+`units`), times downsampling factors."""
    res, unit = None, None
    if isinstance(attrs.get("pixelResolution"), dict):
        res = attrs["pixelResolution"].get("dimensions")
        unit = attrs["pixelResolution"].get("unit")
    elif "resolution" in attrs:
        res = attrs["resolution"]
        units = attrs.get("units")
        unit = units[0] if isinstance(units, list) and units else units
    if not res or len(res) < 3:
        return None
    factor = 1.0 if unit is None else unit_factor_nm(unit)
    if factor is None:
        return None
    f = list(factors or [1, 1, 1])[:3]
    return clean_voxel_size([float(r) * factor * float(k) for r, k in zip(res[:3], f)])


def _open_n5(kv: ts.KvStore, kv_url: str, attrs: dict[str, Any], scale: int | str | None, where: str) -> tuple[ts.TensorStore, Any]:
    group_attrs: dict[str, Any] = {}
    if "dimensions" not in attrs:  # a multiscale group: s0, s1, ...
        group_attrs = attrs
        if scale is None:
            path = "s0"
        elif isinstance(scale, int) or str(scale).isdigit():
            path = f"s{int(scale)}"
        else:
            path = str(scale)
        sub = read_json(kv, f"{path}/attributes.json")
        if sub is None or "dimensions" not in sub:
            raise UserError(f"{where}: N5 group has no dataset {path!r} (expected s0, s1, ... or an N5 array)")
        attrs, kv_url = sub, join_url(kv_url, path) + "/"
        scales = group_attrs.get("scales")
        level = int(path[1:]) if path[1:].isdigit() else 0
        factors = attrs.get("downsamplingFactors") or (scales[level] if isinstance(scales, list) and level < len(scales) else None)
        voxel = _n5_voxel(attrs) or _n5_voxel(group_attrs, factors)
    else:
        if scale not in (None, 0, "0"):
            raise UserError(f"{where}: is a single N5 array, not a multiscale group; leave the scale out")
        voxel = _n5_voxel(attrs)
    store = _result(ts.open({"driver": "n5", "kvstore": kv_url}, open=True, read=True), where)
    axes = attrs.get("axes") or group_attrs.get("axes")
    if axes and len(axes) == store.rank:
        return _to_zyx(store, [str(a) for a in axes], where=where), voxel
    names = {2: "xy", 3: "xyz", 4: "xyzc"}.get(store.rank)
    if names is None:
        raise UserError(f"{where}: N5 array of rank {store.rank} without an 'axes' attribute")
    return _to_zyx(store, list(names), where=where), voxel


def _open_precomputed(kv_url: str, info: dict[str, Any], scale: int | str | None, where: str) -> tuple[ts.TensorStore, Any]:
    scales = info.get("scales") or []
    keys = [s.get("key") for s in scales]
    if scale is None:
        i = 0
    elif isinstance(scale, str) and not scale.isdigit():
        if scale not in keys:
            raise UserError(f"{where}: no scale with key {scale!r}; scales: {keys}")
        i = keys.index(scale)
    else:
        i = int(scale)
        if not 0 <= i < len(scales):
            raise UserError(f"{where}: scale {i} out of range; it has {len(scales)} scales {keys}")
    store = _result(ts.open({"driver": "neuroglancer_precomputed", "kvstore": kv_url, "scale_index": i},
                            open=True, read=True), where)
    if store.shape[3] == 1:
        store = store[ts.d["channel"][store.domain[3].inclusive_min]]
    view = store.T.translate_to[0]  # x,y,z[,c] -> [c,]z,y,x
    return view, scales[i].get("resolution")


def open_tensorstore(parsed: ParsedUrl, scale: int | str | None) -> TensorStoreReader:
    """Detect the chunked format at `parsed` from its metadata and open it as a [c,]z,y,x reader."""
    where = parsed.original
    kv_url = kvstore_url(parsed)
    kv = _result(ts.KvStore.open(kv_url), where)
    futures = {k: kv.read(k) for k in _META_KEYS}
    found: dict[str, Any] = {}
    for key, fut in futures.items():
        res = _result(fut, f"{where} ({key})")
        if res.state == "value":
            try:
                found[key] = json.loads(bytes(res.value))
            except ValueError:
                raise UserError(f"{where}: metadata {key!r} is not valid JSON") from None
    hint = parsed.driver

    def no_scale(kind: str) -> None:
        if scale not in (None, 0, "0"):
            raise UserError(f"{where}: is a single {kind} array, not a multiscale image; leave the scale out")

    if "info" in found and hint in (None, "neuroglancer_precomputed") and "scales" in found["info"]:
        store, voxel = _open_precomputed(kv_url, found["info"], scale, where)
        return TensorStoreReader(store, voxel, "precomputed")
    if "zarr.json" in found and hint in (None, "zarr3", "zarr"):
        meta = found["zarr.json"]
        if meta.get("node_type") == "array":
            no_scale("zarr v3")
            store = _result(ts.open({"driver": "zarr3", "kvstore": kv_url}, open=True, read=True), where)
            return _plain_array(store, parsed, meta.get("dimension_names"), "zarr3", where)
        ms = parse_multiscales(meta.get("attributes"))
        if ms is not None:
            store, voxel = _open_ome(kv_url, ms, "zarr3", scale, where)
            return TensorStoreReader(store, voxel, "ome-zarr")
        raise UserError(f"{where} is a zarr v3 group without OME-Zarr multiscales metadata; point the URL at an array inside it")
    if ".zarray" in found and hint in (None, "zarr"):
        no_scale("zarr v2")
        store = _result(ts.open({"driver": "zarr", "kvstore": kv_url}, open=True, read=True), where)
        dims = (found.get(".zattrs") or {}).get("_ARRAY_DIMENSIONS")
        return _plain_array(store, parsed, dims, "zarr", where)
    if hint in (None, "zarr") and (".zattrs" in found or ".zgroup" in found):
        ms = parse_multiscales(found.get(".zattrs"))
        if ms is not None:
            store, voxel = _open_ome(kv_url, ms, "zarr", scale, where)
            return TensorStoreReader(store, voxel, "ome-zarr")
        raise UserError(f"{where} is a zarr group without OME-Zarr multiscales metadata; point the URL at an array inside it")
    if "attributes.json" in found and hint in (None, "n5"):
        store, voxel = _open_n5(kv, kv_url, found["attributes.json"], scale, where)
        return TensorStoreReader(store, voxel, "n5")
    what = f"no {hint} metadata" if hint else "no zarr/OME-Zarr/n5/precomputed metadata"
    raise UserError(f"cannot open {where}: {what} found there; accepted: {ACCEPTED_FORMATS}")


def _plain_array(store: ts.TensorStore, parsed: ParsedUrl, dims: Any, kind: str, where: str) -> TensorStoreReader:
    """A zarr array: axes from dimension names when they are c/z/y/x, voxel size from a parent OME group."""
    parent = _parent_multiscale(parsed)
    if parent is not None and len(parent[0].axes) == store.rank:
        ms, i = parent
        return TensorStoreReader(_to_zyx(store, ms.axes, ms.axis_types, where), ms.voxel_size_xyz(i), kind)
    if isinstance(dims, list) and len(dims) == store.rank and all(isinstance(d, str) for d in dims) \
            and {"y", "x"} <= {d.lower() for d in dims}:
        return TensorStoreReader(_to_zyx(store, dims, where=where), None, kind)
    return TensorStoreReader(_positional(store, where), None, kind)
