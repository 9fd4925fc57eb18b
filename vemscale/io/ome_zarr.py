"""OME-Zarr (NGFF) metadata: read a multiscale's axes and voxel size, and create a new image for writing.

We write NGFF 0.4 (zarr v2: `.zgroup` + `.zattrs`, arrays with '/' chunk keys) by default and NGFF 0.5
(zarr v3: `zarr.json` with `attributes.ome`) on request. Axes are [c,]z,y,x, spatial units nanometer,
one `scale` transform per dataset in nm. Group metadata goes through a tensorstore kvstore, so the same
code writes to a local path, s3:// or gs://.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from vemscale.errors import UserError
from vemscale.io.readers import clean_voxel_size, unit_factor_nm
from vemscale.io.urls import join_url, kvstore_url, parse_url

__all__ = ["Multiscale", "parse_multiscales", "multiscales_attrs", "create_ome_zarr", "read_json", "read_group_attrs",
           "write_group_attrs"]

log = logging.getLogger(__name__)

CHANNEL_NAMES = ("c", "ch", "channel", "channels")


def read_json(kv: ts.KvStore, key: str) -> Any | None:
    """The JSON document at `key`, or None when absent."""
    res = kv.read(key).result()
    if res.state != "value":
        return None
    try:
        return json.loads(bytes(res.value))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"metadata file {key!r} is not valid JSON: {err}") from None


def read_group_attrs(kv: ts.KvStore) -> dict[str, Any]:
    """A zarr group's attributes: `.zattrs` (v2) or `zarr.json` "attributes" (v3); {} when there is no group."""
    attrs = read_json(kv, ".zattrs")
    if attrs is None:
        attrs = (read_json(kv, "zarr.json") or {}).get("attributes")
    return attrs if isinstance(attrs, dict) else {}


def write_group_attrs(kv: ts.KvStore, attrs: dict[str, Any], zarr_format: int = 2) -> None:
    """Write a zarr group with `attrs` (v2: `.zgroup` + `.zattrs`; v3: `zarr.json`), replacing the other version's files."""
    if zarr_format == 3:
        doc = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
        kv.write("zarr.json", json.dumps(doc, indent=2, default=str).encode()).result()
        for key in (".zgroup", ".zattrs"):
            kv.delete_range(ts.KvStore.KeyRange(key, key + "\0")).result()
        return
    kv.write(".zgroup", json.dumps({"zarr_format": 2}).encode()).result()
    kv.write(".zattrs", json.dumps(attrs, indent=2, default=str).encode()).result()
    kv.delete_range(ts.KvStore.KeyRange("zarr.json", "zarr.json\0")).result()


@dataclass(frozen=True)
class Multiscale:
    """One OME-Zarr multiscale: dataset paths, lower-case axis names and types, per-dataset scale vectors."""

    paths: tuple[str, ...]
    axes: tuple[str, ...]
    axis_types: tuple[str | None, ...]
    units: tuple[str | None, ...]
    scales: tuple[tuple[float, ...] | None, ...]

    def index(self, scale: int | str | None, where: str) -> int:
        """Dataset index for `scale` (None -> 0, int -> index, str -> path)."""
        if scale is None:
            return 0
        if isinstance(scale, str) and not scale.isdigit():
            if scale in self.paths:
                return self.paths.index(scale)
            raise UserError(f"{where}: no scale with path {scale!r}; scales: {list(self.paths)}")
        i = int(scale)
        if not 0 <= i < len(self.paths):
            raise UserError(f"{where}: scale {i} out of range; it has {len(self.paths)} scales {list(self.paths)}")
        return i

    def voxel_size_xyz(self, i: int) -> tuple[float, float, float] | None:
        """Voxel size (x,y,z nm) of dataset `i`; axes without a unit are taken as nanometres."""
        vec = self.scales[i]
        if vec is None or not all(a in self.axes for a in "yx"):
            return None
        out = []
        for name in "xyz":
            if name not in self.axes:
                out.append(1.0 if name == "z" else None)
                continue
            k = self.axes.index(name)
            unit = self.units[k]
            factor = 1.0 if unit is None else unit_factor_nm(unit)
            if factor is None:
                log.warning("unknown unit %r for axis %s; voxel size left unknown", unit, name)
                return None
            out.append(vec[k] * factor)
        if None in out:
            return None
        return clean_voxel_size(out)  # type: ignore[arg-type]


def _scale_of(transforms: Sequence[dict[str, Any]] | None, ndim: int) -> list[float] | None:
    if not transforms:
        return None
    vec = [1.0] * ndim
    found = False
    for t in transforms:
        if t.get("type") == "scale" and "scale" in t and len(t["scale"]) == ndim:
            vec = [a * float(b) for a, b in zip(vec, t["scale"])]
            found = True
    return vec if found else None


def parse_multiscales(attrs: dict[str, Any] | None) -> Multiscale | None:
    """The first multiscale in group attributes (NGFF 0.1-0.5, with or without the 0.5 `ome` wrapper)."""
    if not attrs:
        return None
    if "ome" in attrs and isinstance(attrs["ome"], dict):
        attrs = attrs["ome"]
    ms_list = attrs.get("multiscales")
    if not ms_list:
        return None
    ms = ms_list[0]
    datasets = ms.get("datasets") or []
    if not datasets:
        return None
    raw_axes = ms.get("axes")
    if raw_axes is None:  # NGFF <= 0.3: always t,c,z,y,x
        names, types, units = ["t", "c", "z", "y", "x"], [None] * 5, [None] * 5
    else:
        names = [str(a["name"] if isinstance(a, dict) else a).lower() for a in raw_axes]
        types = [a.get("type") if isinstance(a, dict) else None for a in raw_axes]
        units = [a.get("unit") if isinstance(a, dict) else None for a in raw_axes]
    ndim = len(names)
    top = _scale_of(ms.get("coordinateTransformations"), ndim)
    scales = []
    for d in datasets:
        vec = _scale_of(d.get("coordinateTransformations"), ndim)
        if vec is not None and top is not None:
            vec = [a * b for a, b in zip(vec, top)]
        scales.append(tuple(vec) if vec is not None else None)
    return Multiscale(tuple(str(d["path"]) for d in datasets), tuple(names), tuple(types), tuple(units), tuple(scales))


def multiscales_attrs(
    ndim: int,
    voxel_size_xyz: Sequence[float] | None,
    *,
    name: str = "image",
    version: str = "0.4",
    channel_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """NGFF multiscales metadata for a one-scale image at path "0" with axes [c,]z,y,x in nanometres."""
    axes: list[dict[str, Any]] = [{"name": "c", "type": "channel"}] if ndim == 4 else []
    axes += [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    vs = [1.0, 1.0, 1.0] if voxel_size_xyz is None else [float(v) for v in voxel_size_xyz]
    scale = ([1.0] if ndim == 4 else []) + [vs[2], vs[1], vs[0]]
    ms: dict[str, Any] = {
        "name": name,
        "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
    }
    if version == "0.4":
        ms = {"version": "0.4", **ms}
    attrs: dict[str, Any] = {"multiscales": [ms]}
    if channel_names:
        attrs["omero"] = {
            "channels": [{"label": str(c), "active": True, "color": "FFFFFF"} for c in channel_names]
        }
    if version != "0.4":
        return {"ome": {"version": version, **attrs}}
    return attrs


def _array_spec(kv_url: str, zarr_format: int, shape: Sequence[int], dtype: np.dtype, chunks: Sequence[int],
                ndim: int, shard: Sequence[int] | None = None) -> dict[str, Any]:
    array_kv = join_url(kv_url, "0") + "/"
    if zarr_format == 2:
        return {
            "driver": "zarr",
            "kvstore": array_kv,
            "metadata": {
                "shape": list(shape),
                "chunks": list(chunks),
                "dtype": dtype.str,
                "compressor": {"id": "blosc", "cname": "zstd", "clevel": 5, "shuffle": 1},
                "fill_value": 0,
                "order": "C",
                "dimension_separator": "/",
            },
        }
    names = (["c"] if ndim == 4 else []) + ["z", "y", "x"]
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}} if dtype.itemsize > 1
                                    else {"name": "bytes"}, {"name": "zstd", "configuration": {"level": 5}}]
    grid = list(chunks)
    if shard is not None:  # zarr v3 sharding codec: a shard object holds whole inner chunks plus an index at its end
        codecs = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": list(chunks), "codecs": codecs, "index_location": "end",
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]
        grid = list(shard)
    return {
        "driver": "zarr3",
        "kvstore": array_kv,
        "metadata": {
            "shape": list(shape),
            "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": grid}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": codecs,
            "fill_value": False if dtype == np.bool_ else 0,
            "dimension_names": names,
        },
    }


def _existing_array(kv: ts.KvStore, kv_url: str) -> ts.TensorStore | None:
    """The scale-0 array of an existing image at `kv_url`, or None if there is none."""
    for key, driver in (("0/.zarray", "zarr"), ("0/zarr.json", "zarr3")):
        if kv.read(key).result().state == "value":
            return ts.open({"driver": driver, "kvstore": join_url(kv_url, "0") + "/"}, open=True).result()
    return None


def _looks_like_zarr(kv: ts.KvStore) -> bool:
    return any(kv.read(k).result().state == "value" for k in (".zgroup", ".zattrs", "zarr.json", ".zarray"))


def create_ome_zarr(
    url: str | os.PathLike[str],
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int],
    voxel_size_xyz: Sequence[float] | None,
    *,
    channel_names: Sequence[str] | None = None,
    overwrite: bool = False,
    zarr_format: int = 2,
    name: str | None = None,
    shard: Sequence[int] | None = None,
) -> ts.TensorStore:
    """Create (or reopen, for resume) a one-scale OME-Zarr image and return its writable scale-0 store.

    `shape`/`chunks` (and `shard`, a box of whole chunks: zarr v3 sharding) are z,y,x or c,z,y,x; chunks are
    clipped to the shape. A shard needs zarr v3 (NGFF 0.5), which `shard` implies. An existing image with the same
    shape and dtype is reopened as it is (unless `overwrite`); one with another shape or dtype is a
    UserError unless `overwrite`, which deletes it first. A non-zarr directory is never deleted.
    """
    parsed = parse_url(url)
    if parsed.dataset is not None or parsed.driver not in (None, "zarr", "zarr3"):
        raise UserError(f"output {str(url)!r} must be a zarr directory or URL (e.g. out.ome.zarr or s3://bucket/out.zarr)")
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise UserError(f"output shape must be z,y,x or c,z,y,x with positive sizes; got {shape}")
    if len(chunks) != len(shape):
        raise UserError(f"chunks {tuple(chunks)} must have one entry per axis of shape {shape}")
    chunks = tuple(max(1, min(int(c), s)) for c, s in zip(chunks, shape))
    if shard is not None:
        if len(shard) != len(shape):
            raise UserError(f"shard {tuple(shard)} must have one entry per axis of shape {shape}")
        shard = tuple(max(c, min(int(v), s)) for v, c, s in zip(shard, chunks, shape))
        shard = tuple(-(-v // c) * c for v, c in zip(shard, chunks))  # whole chunks (the last may pass the edge)
        zarr_format = 3
    dtype = np.dtype(dtype)
    if zarr_format not in (2, 3):
        raise UserError(f"zarr_format must be 2 or 3, got {zarr_format}")
    if channel_names is not None and (len(shape) != 4 or len(channel_names) != shape[0]):
        raise UserError(f"{len(channel_names)} channel names given for shape {shape}; need one per channel (c,z,y,x)")
    if not parsed.remote:
        if os.path.isfile(parsed.location):
            raise UserError(f"output {str(url)!r} is a file; an OME-Zarr output is a directory")
    kv_url = kvstore_url(parsed)
    kv = ts.KvStore.open(kv_url).result()
    exists_as_zarr = _looks_like_zarr(kv)
    if not exists_as_zarr and not parsed.remote and os.path.isdir(parsed.location) and os.listdir(parsed.location):
        raise UserError(f"output {str(url)!r} is a non-empty directory that is not a zarr image; choose another path")
    if exists_as_zarr:
        existing = _existing_array(kv, kv_url)
        same = existing is not None and tuple(existing.shape) == shape and np.dtype(existing.dtype.numpy_dtype) == dtype
        want = tuple(min(v, s) for v, s in zip(shard or chunks, shape))  # as `_write_unit` clips it
        if same and not overwrite and _write_unit(existing) != want:
            raise UserError(f"output {str(url)!r} exists with write chunks {_write_unit(existing)}, not "
                            f"{want} ({'sharded' if shard else 'unsharded'}); pass --overwrite "
                            "(overwrite=True) to replace it, or choose another output")
        if same and not overwrite:
            log.info("reopening existing %s (shape %s, %s)", url, shape, dtype)
            return existing
        if not overwrite:
            had = f"shape {tuple(existing.shape)} {np.dtype(existing.dtype.numpy_dtype)}" if existing is not None else "no scale-0 array"
            raise UserError(f"output {str(url)!r} exists with {had}, not shape {shape} {dtype}; "
                            "pass --overwrite (overwrite=True) to replace it, or choose another output")
        log.info("overwriting %s", url)
        kv.delete_range(ts.KvStore.KeyRange()).result()
    version = "0.4" if zarr_format == 2 else "0.5"
    attrs = multiscales_attrs(len(shape), voxel_size_xyz, name=name or os.path.basename(parsed.location.rstrip("/")),
                              version=version, channel_names=channel_names)
    write_group_attrs(kv, attrs, zarr_format)
    spec = _array_spec(kv_url, zarr_format, shape, dtype, chunks, len(shape), shard)
    return ts.open(spec, create=True, open=True).result()


def _write_unit(store: ts.TensorStore) -> tuple[int, ...]:
    """A store's write granularity: its shard when sharded, else its chunk (clipped to the shape)."""
    return tuple(min(int(c), int(n)) for c, n in zip(store.chunk_layout.write_chunk.shape, store.shape))

