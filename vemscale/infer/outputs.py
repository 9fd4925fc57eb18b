"""Output layers of `vemscale infer`: create them once in the driver, open them by spec in each worker.

Layout of an OME-Zarr output (the default; local path, s3:// or gs://)::

    <output>/.zgroup, .zattrs        a zarr group; .zattrs["vemscale"] names the layers and classes
    <output>/probabilities/          OME-Zarr image c,z,y,x uint8: round(p * 255) per class (c = classes)
    <output>/labels/                 OME-Zarr image z,y,x: argmax class (uint8; uint32 past 256 classes)
    <output>/.vemscale-ledger/       the done-ledger (see vemscale.blocks.ledger)

Both images cover the whole input volume (same voxel size; an ROI run fills only its part), so they
overlay the input in any viewer. `precomputed://<output>` writes the same two layers as Neuroglancer
precomputed (an `image` layer with one channel per class, a raw `segmentation` layer).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from vemscale.blocks.ledger import LEDGER_DIR
from vemscale.errors import UserError
from vemscale.io.ome_zarr import create_ome_zarr, write_group_attrs
from vemscale.io.shards import Layout
from vemscale.io.urls import ParsedUrl, join_url, kvstore_url, parse_url
from vemscale.io.writable import check_writable

log = logging.getLogger(__name__)

LAYERS = ("probabilities", "labels")
Box = tuple[slice, slice, slice]


def layers_for(write: str) -> tuple[str, ...]:
    """Layer names written for `write` = labels | probabilities | both."""
    return LAYERS if write == "both" else (write,)


def labels_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8 if num_classes <= 256 else np.uint32)


def quantize_probabilities(probs: np.ndarray) -> np.ndarray:
    """float probabilities in [0, 1] -> uint8 round(p * 255) (round half to even, as numpy's rint)."""
    return np.rint(np.clip(probs, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def argmax_labels(probs: np.ndarray, dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """(K, z, y, x) probabilities -> (z, y, x) class index of the largest (first on ties)."""
    return np.argmax(probs, axis=0).astype(dtype)


@dataclass(frozen=True)
class OutputLayer:
    """One created layer: where it is and the tensorstore spec workers open it with."""

    name: str
    url: str
    shape: tuple[int, ...]
    dtype: str
    spec: dict[str, Any]


def _is_precomputed(parsed: ParsedUrl) -> bool:
    return parsed.driver == "neuroglancer_precomputed"


def check_output(url: str) -> ParsedUrl:
    """Refuse a bad output URL, a file, or a non-empty directory that is not a vemscale output (never deleted)."""
    parsed = parse_url(url)
    if parsed.dataset is not None or parsed.driver not in (None, "zarr", "neuroglancer_precomputed"):
        raise UserError(f"output {url!r} must be a directory/URL for OME-Zarr (default) or precomputed://...")
    if parsed.remote:
        return parsed
    path = parsed.location
    if os.path.isfile(path):
        raise UserError(f"output {url!r} is a file; the output is a directory holding {' and '.join(LAYERS)}")
    if os.path.isdir(path) and os.listdir(path):
        ours = {".zgroup", ".zattrs", "zarr.json", LEDGER_DIR, *LAYERS}
        if not ours & set(os.listdir(path)):
            raise UserError(f"output {url!r} is a non-empty directory that is not a vemscale output; choose another path")
    check_writable(path)
    return parsed


def prepare_outputs(
    output: str,
    volume_shape: tuple[int, int, int],
    voxel_size_xyz: Sequence[float] | None,
    classes: Sequence[str],
    layout: Layout,
    write: str,
    overwrite: bool,
    attrs: dict[str, Any] | None = None,
) -> dict[str, OutputLayer]:
    """Create (or reopen, to resume) the output layers; UserError on a mismatching existing output.

    OME-Zarr layers are zarr v2 unsharded and zarr v3 (NGFF 0.5, sharding codec) sharded; precomputed
    layers are an uint8 `image` (raw) and an uint32 `segmentation` (compressed_segmentation), sharded with
    `layout.shard_bits` when the layout has a shard.
    """
    from vemscale.export.precomputed import create_precomputed

    parsed = check_output(output)
    k = len(classes)
    layers: dict[str, OutputLayer] = {}
    for name in layers_for(write):
        shape = (k, *volume_shape) if name == "probabilities" else tuple(volume_shape)
        dtype = np.dtype(np.uint8) if name == "probabilities" else labels_dtype(k)
        if _is_precomputed(parsed):
            url = join_url(kvstore_url(parsed), name)
            store = create_precomputed(url, volume_shape, dtype, voxel_size_xyz,
                                       "image" if name == "probabilities" else "segmentation",
                                       num_channels=k if name == "probabilities" else 1, chunk=layout.chunk,
                                       sharded=layout.shard is not None, shard_bits=layout.shard_bits,
                                       overwrite=overwrite)
            if name == "probabilities" and k == 1:  # keep the c axis: workers write (K, z, y, x)
                store = store[ts.newaxis, ...]
            url = "precomputed://" + url
        else:
            url = join_url(parsed.location, name)
            lead = (k,) if name == "probabilities" else ()
            store = create_ome_zarr(url, shape, dtype, ((1,) if lead else ()) + layout.chunk, voxel_size_xyz,
                                    channel_names=list(classes) if name == "probabilities" else None,
                                    overwrite=overwrite, name=name,
                                    shard=(lead + layout.shard) if layout.shard else None)
        layers[name] = OutputLayer(name, url, shape, store.dtype.numpy_dtype.name, store.spec(minimal_spec=True).to_json())
    if not _is_precomputed(parsed):
        kv = ts.KvStore.open(kvstore_url(parsed)).result()
        meta = {"vemscale": {"layers": {n: n for n in layers}, "classes": list(classes), **(attrs or {})}}
        write_group_attrs(kv, meta, 3 if layout.shard else 2)
    return layers


def open_layers(specs: dict[str, dict[str, Any]]) -> dict[str, ts.TensorStore]:
    """Writable stores of the layers from their specs (in a worker)."""
    return {name: ts.open(spec, open=True, read=True, write=True).result() for name, spec in specs.items()}


def write_block(stores: dict[str, ts.TensorStore], box: Box, probs: np.ndarray) -> int:
    """Quantise a block's probabilities (K, z, y, x) and write the core to every layer; returns bytes written.

    Returns only after all writes completed, so a ledger mark after it is safe.
    """
    futures, nbytes = [], 0
    if "probabilities" in stores:
        q = quantize_probabilities(probs)
        futures.append(stores["probabilities"][(slice(None), *box)].write(q))
        nbytes += q.nbytes
    if "labels" in stores:
        store = stores["labels"]
        lab = argmax_labels(probs, store.dtype.numpy_dtype)
        futures.append(store[box].write(lab))
        nbytes += lab.nbytes
    for f in futures:
        f.result()
    return nbytes
