"""Neuroglancer `neuroglancer_uint64_sharded_v1` shard files assembled whole: the shard and minishard of a key,
one shard's bytes from its entries, and the keys a shard holds.

Volume shards are written by tensorstore. A multi-resolution mesh shard needs each object's fragment data placed
immediately before its manifest, with the index pointing at the manifest (Neuroglancer's sharded.md and meshes.md),
which a generic key-value writer cannot lay out, so mesh shards are built here: murmurhash3_x86_128 of the key
(spreads any id set, sparse or dense, evenly; identity is also read), values raw, minishard indexes gzipped.
"""

from __future__ import annotations

import gzip
import math
from typing import Any, Callable, Iterable

import numpy as np

__all__ = ["SHARDED", "mesh_sharding", "shard_of", "minishard_of", "shard_name", "encode_shard", "shard_entries"]

SHARDED = "neuroglancer_uint64_sharded_v1"


def mesh_sharding(num_keys: int, keys_per_shard: int = 2048, keys_per_minishard: int = 64) -> dict[str, Any]:
    """Sharding for `num_keys` objects (murmurhash): ~`keys_per_shard` per shard file (one Ray task writes one) and
    ~`keys_per_minishard` per minishard (the index Neuroglancer fetches before an object: 24 bytes per key).
    A function of the key count only, so the layout is the same on any cluster."""
    shard_bits = max(0, math.ceil(math.log2(max(1.0, num_keys / keys_per_shard))))
    per_shard = num_keys / 2**shard_bits
    minishard_bits = min(12, max(0, math.ceil(math.log2(max(1.0, per_shard / keys_per_minishard)))))
    return {"@type": SHARDED, "hash": "murmurhash3_x86_128", "preshift_bits": 0, "minishard_bits": minishard_bits,
            "shard_bits": shard_bits, "minishard_index_encoding": "gzip", "data_encoding": "raw"}


def _hashed(keys: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """The hashed chunk id of each key: hash(key >> preshift_bits); murmurhash3_x86_128 of the shifted key's 8
    little-endian bytes, seed 0, its low 8 bytes as a little-endian uint64 (Neuroglancer's sharded.md)."""
    shifted = np.atleast_1d(np.asarray(keys, np.uint64)) >> np.uint64(spec.get("preshift_bits", 0))
    if spec.get("hash") == "identity":
        return shifted
    if spec.get("hash") != "murmurhash3_x86_128":
        raise ValueError(f"unknown sharding hash {spec.get('hash')!r}")
    import mmh3

    low = (1 << 64) - 1
    return np.fromiter((mmh3.hash128(int(k).to_bytes(8, "little"), 0, False, signed=False) & low for k in shifted),
                       np.uint64, len(shifted))


def shard_of(keys: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Shard number of each uint64 key: bits [minishard_bits, minishard_bits + shard_bits) of its hash."""
    mask = np.uint64((1 << spec["shard_bits"]) - 1)
    return (_hashed(keys, spec) >> np.uint64(spec["minishard_bits"])) & mask


def minishard_of(keys: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    return _hashed(keys, spec) & np.uint64((1 << spec["minishard_bits"]) - 1)


def shard_name(shard: int, spec: dict[str, Any]) -> str:
    """`<shard>.shard`: lowercase hex zero padded to ceil(shard_bits / 4) digits."""
    return f"{int(shard):0{-(-spec['shard_bits'] // 4)}x}.shard"


def encode_shard(entries: Iterable[tuple[int, bytes, bytes]], spec: dict[str, Any]) -> bytes:
    """One shard file from (key, prefix, value) entries of that shard: each prefix is stored immediately before its
    value and the minishard index points at the value (a mesh's fragment data, then its manifest)."""
    entries = list(entries)
    minishards = minishard_of(np.asarray([e[0] for e in entries], np.uint64), spec) if entries else []
    by_minishard: dict[int, list[tuple[int, bytes, bytes]]] = {}
    for m, (key, prefix, value) in zip(minishards, entries):
        by_minishard.setdefault(int(m), []).append((int(key), prefix, value))
    n_mini = 1 << spec["minishard_bits"]
    data, rows = bytearray(), {}
    for m in sorted(by_minishard):
        found = []
        for key, prefix, value in sorted(by_minishard[m], key=lambda e: e[0]):
            data += prefix
            found.append((key, len(data), len(value)))
            data += value
        rows[m] = np.asarray(found, np.uint64).reshape(-1, 3)
    index = np.zeros((n_mini, 2), "<u8")
    for m in range(n_mini):
        if m not in rows:
            index[m] = len(data)
            continue
        keys, starts, sizes = rows[m].T
        table = np.empty((3, len(keys)), "<u8")
        table[0] = np.diff(keys, prepend=np.uint64(0))
        table[1] = starts - np.concatenate([[np.uint64(0)], starts[:-1] + sizes[:-1]])
        table[2] = sizes
        encoded = table.tobytes()
        if spec.get("minishard_index_encoding", "raw") == "gzip":
            encoded = gzip.compress(encoded, mtime=0)
        index[m] = (len(data), len(data) + len(encoded))
        data += encoded
    return index.tobytes() + bytes(data)


def shard_entries(read: Callable[[int, int], bytes], spec: dict[str, Any]) -> dict[int, tuple[int, int]]:
    """{key: (start, stop) byte range of its value in the shard file} from `read(start, stop)` of that file."""
    n_mini = 1 << spec["minishard_bits"]
    end = 16 * n_mini
    index = np.frombuffer(read(0, end), "<u8").reshape(n_mini, 2)
    out: dict[int, tuple[int, int]] = {}
    for start, stop in index:
        if stop <= start:
            continue
        raw = read(end + int(start), end + int(stop))
        if spec.get("minishard_index_encoding", "raw") == "gzip":
            raw = gzip.decompress(raw)
        table = np.frombuffer(raw, "<u8").reshape(3, -1)
        keys = np.cumsum(table[0], dtype=np.uint64)
        sizes = table[2]
        starts = end + np.cumsum(table[1] + np.concatenate([[np.uint64(0)], sizes[:-1]]), dtype=np.uint64)
        for k, s, n in zip(keys, starts, sizes):
            out[int(k)] = (int(s), int(s + n))
    return out
