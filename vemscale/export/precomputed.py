"""Neuroglancer precomputed layers through tensorstore: create a layer or a scale, open it, write aligned boxes.

Tensorstore orders precomputed axes x,y,z,channel; everything here hands out [c,]z,y,x views with a 0-based
domain (c only when the layer has more than one channel), as `vemscale.io` does for every other format.

Sharding: `sharding_spec` picks identity-hash parameters whose shards are boxes of chunks; tensorstore
reports a shard as the store's `chunk_layout.write_chunk`, so a writer whose box is a whole number of
write chunks (`write_chunk_shape(store)`) never shares a shard file with another writer.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Sequence

import numpy as np
import tensorstore as ts

from vemscale.errors import UserError
from vemscale.io.shards import DEFAULT_SHARD_VOXELS, grid_bits, precomputed_shard_bits
from vemscale.io.urls import kvstore_url, parse_url

__all__ = [
    "LayerType", "layer_kvstore", "precomputed_dtype", "default_encoding", "sharding_spec",
    "create_precomputed", "add_scale", "open_scale", "zyx_view", "write_chunk_shape", "read_chunk_shape", "check_aligned",
    "write_chunk_aligned_block", "read_info", "update_info", "view_spec",
]

LayerType = Literal["image", "segmentation"]
Box = tuple[slice, ...]

_IMAGE_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "float32")


def layer_kvstore(url: str) -> str:
    """The tensorstore kvstore URL (trailing '/') of a layer given as a path, file://, s3://, gs:// or precomputed://."""
    parsed = parse_url(url)
    if parsed.driver not in (None, "neuroglancer_precomputed"):
        raise UserError(f"{url!r} is not a precomputed layer URL (use a path, file://, s3://, gs:// or precomputed://)")
    return kvstore_url(parsed)


def precomputed_dtype(dtype: np.dtype | str, layer_type: LayerType) -> np.dtype:
    """The dtype a layer stores `dtype` as: labels as uint32/uint64, images as the nearest supported type."""
    dt = np.dtype(dtype)
    if layer_type == "segmentation":
        if dt.kind not in "biu":
            raise UserError(f"a segmentation layer needs integer labels, not {dt}")
        return np.dtype(np.uint64 if dt.itemsize >= 8 else np.uint32)
    if dt.kind == "b":
        return np.dtype(np.uint8)
    if dt.kind == "f":
        return np.dtype(np.float32)
    if dt.name not in _IMAGE_DTYPES:
        raise UserError(f"precomputed images cannot hold {dt}; convert to one of {', '.join(_IMAGE_DTYPES)}")
    return dt


def default_encoding(layer_type: LayerType) -> str:
    return "compressed_segmentation" if layer_type == "segmentation" else "raw"


def _check_encoding(encoding: str, layer_type: LayerType, dtype: np.dtype, num_channels: int) -> None:
    if encoding == "jpeg" and (dtype != np.uint8 or num_channels not in (1, 3)):
        raise UserError(f"jpeg encoding needs uint8 data with 1 or 3 channels, not {dtype} x{num_channels}; use raw")
    if encoding == "compressed_segmentation" and dtype not in (np.uint32, np.uint64):
        raise UserError(f"compressed_segmentation needs uint32/uint64 labels, not {dtype}")
    if encoding not in ("raw", "jpeg", "compressed_segmentation", "png"):
        raise UserError(f"unknown encoding {encoding!r}; use raw, jpeg or compressed_segmentation")


def sharding_spec(chunk_xyz: Sequence[int], size_xyz: Sequence[int], encoding: str,
                  target_voxels: int = DEFAULT_SHARD_VOXELS, k: int | None = None) -> dict[str, Any]:
    """`neuroglancer_uint64_sharded_v1` parameters whose shards are boxes of about `target_voxels` (or 2^k chunks).

    With the identity hash a chunk's shard is its compressed Morton code without the lowest
    preshift+minishard bits (k); those bits interleave x,y,z from the least significant end, so every shard is
    a box of 2^a x 2^b x 2^c chunks (`vemscale.io.shards.morton_box`; tensorstore reports it as the write
    chunk). Chunks are gzipped in the shard only for compressed_segmentation (gzip gains ~2x there; on raw EM
    it gains little and was ~25x slower to write than raw in `vemscale.bench.export`).
    """
    total_bits = sum(grid_bits(size_xyz, chunk_xyz))
    if k is None:
        k = precomputed_shard_bits(chunk_xyz, size_xyz, target_voxels)
    preshift = min(k, 3)
    return {"@type": "neuroglancer_uint64_sharded_v1", "hash": "identity", "preshift_bits": preshift,
            "minishard_bits": k - preshift, "shard_bits": total_bits - k, "minishard_index_encoding": "gzip",
            "data_encoding": "gzip" if encoding == "compressed_segmentation" else "raw"}


def _scale_metadata(size_xyz: Sequence[int], resolution: Sequence[float], chunk_xyz: Sequence[int], encoding: str,
                    jpeg_quality: int | None, sharded: bool = False, shard_voxels: int = DEFAULT_SHARD_VOXELS,
                    shard_bits: int | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "size": [int(s) for s in size_xyz],
        "resolution": [float(r) for r in resolution],
        "chunk_size": [int(min(c, s)) for c, s in zip(chunk_xyz, size_xyz)],
        "encoding": encoding,
    }
    if encoding == "compressed_segmentation":
        meta["compressed_segmentation_block_size"] = [8, 8, 8]
    if encoding == "jpeg" and jpeg_quality is not None:
        meta["jpeg_quality"] = int(jpeg_quality)
    if sharded:
        meta["sharding"] = sharding_spec(meta["chunk_size"], size_xyz, encoding, shard_voxels, shard_bits)
    return meta


def read_info(url: str) -> dict[str, Any] | None:
    """The layer's `info` JSON, or None when there is none."""
    kv = ts.KvStore.open(layer_kvstore(url)).result()
    res = kv.read("info").result()
    return json.loads(bytes(res.value)) if res.state == "value" else None


def update_info(url: str, **keys: Any) -> dict[str, Any]:
    """Add or replace top-level keys of the layer's `info` (e.g. mesh, segment_properties); returns the new info.

    Tensorstore keeps unknown keys when it later adds scales, so this is safe before or after `add_scale`.
    """
    kv = ts.KvStore.open(layer_kvstore(url)).result()
    info = read_info(url)
    if info is None:
        raise UserError(f"{url!r} has no precomputed info")
    info.update(keys)
    kv.write("info", json.dumps(info, indent=1).encode()).result()
    return info


def zyx_view(store: ts.TensorStore) -> ts.TensorStore:
    """x,y,z,channel store -> [c,]z,y,x view with origin 0 (the channel axis dropped when it has size 1)."""
    if store.shape[3] == 1:
        store = store[ts.d["channel"][store.domain[3].inclusive_min]]
    return store.T.translate_to[0]


def view_spec(store: ts.TensorStore) -> dict[str, Any]:
    """A JSON spec that reopens the same view (transform included) in a worker process."""
    return store.spec(minimal_spec=True).to_json()


def open_scale(url: str, scale_index: int = 0, write: bool = False) -> ts.TensorStore:
    """One scale of an existing layer as its [c,]z,y,x view."""
    try:
        store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": layer_kvstore(url), "scale_index": int(scale_index)},
                        open=True, read=True, write=write).result()
    except ValueError as err:
        raise UserError(f"cannot open scale {scale_index} of precomputed layer {url!r}: {err}") from None
    return zyx_view(store)


def _matches(info: dict[str, Any], layer_type: str, dtype: np.dtype, channels: int, size_xyz: Sequence[int],
             resolution: Sequence[float]) -> bool:
    s0 = (info.get("scales") or [{}])[0]
    return (info.get("type") == layer_type and info.get("data_type") == dtype.name
            and int(info.get("num_channels", 0)) == channels and s0.get("size") == list(size_xyz)
            and np.allclose(s0.get("resolution", []), resolution))


def create_precomputed(
    url: str,
    shape_zyx: Sequence[int],
    dtype: np.dtype | str,
    voxel_size_xyz: Sequence[float] | None,
    layer_type: LayerType = "image",
    num_channels: int = 1,
    chunk: Sequence[int] = (16, 128, 128),
    sharded: bool = False,
    encoding: str | None = None,
    jpeg_quality: int | None = None,
    overwrite: bool = False,
    shard_voxels: int = DEFAULT_SHARD_VOXELS,
    attrs: dict[str, Any] | None = None,
    shard_bits: int | None = None,
) -> ts.TensorStore:
    """Create (or reopen, when it matches) scale 0 of a precomputed layer; returns its writable [c,]z,y,x view.

    `chunk` is z,y,x; `voxel_size_xyz` in nm (1,1,1 when unknown). `dtype` is converted with
    `precomputed_dtype`, so write data of the returned store's dtype. An existing layer of another
    type/shape/dtype raises UserError unless `overwrite` (which deletes the whole layer first). `attrs`
    become extra top-level keys of the info (viewers ignore them; `vemscale view` reads `vemscale`).
    Writers must cover whole write chunks: see `write_chunk_aligned_block`.
    """
    if layer_type not in ("image", "segmentation"):
        raise UserError(f"layer type must be image or segmentation, not {layer_type!r}")
    if len(shape_zyx) != 3 or min(shape_zyx) < 1:
        raise UserError(f"shape {tuple(shape_zyx)} must be three positive sizes z,y,x")
    dt = precomputed_dtype(dtype, layer_type)
    if layer_type == "segmentation" and num_channels != 1:
        raise UserError("a segmentation layer has one channel")
    encoding = encoding or default_encoding(layer_type)
    _check_encoding(encoding, layer_type, dt, num_channels)
    size_xyz = [int(s) for s in shape_zyx[::-1]]
    resolution = [float(v) for v in (voxel_size_xyz or (1.0, 1.0, 1.0))]
    chunk_xyz = [int(c) for c in chunk[::-1]]
    kv_url = layer_kvstore(url)
    kv = ts.KvStore.open(kv_url).result()
    scale = _scale_metadata(size_xyz, resolution, chunk_xyz, encoding, jpeg_quality, sharded, shard_voxels, shard_bits)
    old = read_info(url)
    if old is not None:
        if overwrite:
            kv.delete_range(ts.KvStore.KeyRange()).result()
        elif _matches(old, layer_type, dt, num_channels, size_xyz, resolution):
            s0 = old["scales"][0]  # the info stores `chunk_sizes`, a list with one entry per chunk layout
            stored = {"chunk_size": (s0.get("chunk_sizes") or [None])[0], "encoding": s0.get("encoding"),
                      "sharding": s0.get("sharding")}
            want = {k: scale.get(k) for k in stored}
            if stored != want:  # resuming onto another layout would mix two layouts in one layer
                raise UserError(f"layer {url!r} exists stored as {stored}, not {want}; pass overwrite to replace it, "
                                "or choose another output")
            return open_scale(url, 0, write=True)
        else:
            s0 = (old.get("scales") or [{}])[0]
            raise UserError(f"layer {url!r} exists as {old.get('type')} {old.get('data_type')} x{old.get('num_channels')} "
                            f"size {s0.get('size')} at {s0.get('resolution')} nm, not {layer_type} {dt.name} "
                            f"x{num_channels} size {size_xyz} at {resolution} nm; pass overwrite to replace it")
    spec = {
        "driver": "neuroglancer_precomputed",
        "kvstore": kv_url,
        "multiscale_metadata": {"type": layer_type, "data_type": dt.name, "num_channels": int(num_channels)},
        "scale_metadata": scale,
    }
    try:
        store = ts.open(spec, create=True).result()
    except ValueError as err:
        raise UserError(f"cannot create precomputed layer {url!r}: {err}") from None
    if attrs:
        update_info(url, **attrs)
    return zyx_view(store)


def add_scale(url: str, size_zyx: Sequence[int], voxel_size_xyz: Sequence[float], chunk: Sequence[int],
              sharded: bool = False, encoding: str | None = None, jpeg_quality: int | None = None,
              shard_voxels: int = DEFAULT_SHARD_VOXELS) -> tuple[int, ts.TensorStore]:
    """Append a scale (or reopen one with the same resolution) to an existing layer; (scale index, [c,]z,y,x view)."""
    info = read_info(url)
    if info is None:
        raise UserError(f"{url!r} has no precomputed info; create scale 0 first")
    size_xyz = [int(s) for s in size_zyx[::-1]]
    resolution = [float(v) for v in voxel_size_xyz]
    for i, s in enumerate(info["scales"]):
        if np.allclose(s["resolution"], resolution):
            if s["size"] != size_xyz:
                raise UserError(f"{url!r} scale {s['key']} has size {s['size']}, expected {size_xyz}")
            return i, open_scale(url, i, write=True)
    s0 = info["scales"][0]
    encoding = encoding or s0.get("encoding", "raw")
    if jpeg_quality is None:
        jpeg_quality = s0.get("jpeg_quality")
    chunk_xyz = [int(c) for c in chunk[::-1]]
    spec = {
        "driver": "neuroglancer_precomputed",
        "kvstore": layer_kvstore(url),
        "scale_metadata": _scale_metadata(size_xyz, resolution, chunk_xyz, encoding, jpeg_quality, sharded, shard_voxels),
    }
    try:
        store = ts.open(spec, create=True, open=True).result()
    except ValueError as err:
        raise UserError(f"cannot add scale {resolution} nm to {url!r}: {err}") from None
    return len(info["scales"]), zyx_view(store)


def write_chunk_shape(store: ts.TensorStore) -> tuple[int, ...]:
    """The write granularity of a view, in its own axis order: a shard for sharded layers, else a chunk."""
    shape = store.chunk_layout.write_chunk.shape
    return tuple(int(c) if c else int(n) for c, n in zip(shape, store.shape))


def read_chunk_shape(store: ts.TensorStore) -> tuple[int, ...]:
    """The storage chunk of a view (the granularity of read-only tasks), in its own axis order."""
    shape = store.chunk_layout.read_chunk.shape
    return tuple(int(c) if c else int(n) for c, n in zip(shape, store.shape))


def check_aligned(store: ts.TensorStore, box: Sequence[slice]) -> None:
    """ValueError unless every box edge sits on the write-chunk grid or on the volume's end (one writer per chunk)."""
    wc = write_chunk_shape(store)
    for axis, (sl, c, n) in enumerate(zip(box, wc, store.shape)):
        start, stop = sl.start or 0, n if sl.stop is None else sl.stop
        if start % c or (stop % c and stop != n):
            raise ValueError(f"box {tuple(box)} is not aligned to write chunks {wc} on axis {axis} "
                             f"(size {n}); parallel writers could share a chunk or shard")


def write_chunk_aligned_block(store: ts.TensorStore, box: Sequence[slice], data: np.ndarray) -> int:
    """Write `data` into `box` of a [c,]z,y,x view after checking alignment; returns bytes once the write is durable.

    For a view with channels, `box` may give z,y,x only (all channels are written).
    """
    box = tuple(box)
    if len(box) == store.rank - 1:
        box = (slice(None), *box)
    check_aligned(store, box)
    arr = np.asarray(data, dtype=store.dtype.numpy_dtype)
    store[box].write(arr).result()
    return arr.nbytes
