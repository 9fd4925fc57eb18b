"""Segment properties of a segmentation layer: a label per id (its class name) and its volume in um^3.

Written as `<layer>/segment_properties/info` (`"@type": "neuroglancer_segment_properties"`, inline ids and
properties) and referenced from the layer's info as `"segment_properties"`, so Neuroglancer lists the
segments by name and shows their volumes. Counts come from the export's scale-0 pass or, for a layer
written elsewhere (e.g. by `vemscale infer`), from a blockwise counting pass (the block runner).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Mapping, Sequence

import tensorstore as ts

from vemscale.blocks.grid import BlockGrid, Box
from vemscale.errors import UserError
from vemscale.export.precomputed import layer_kvstore, open_scale, read_info, update_info, view_spec, \
    read_chunk_shape
from vemscale.export.steps import open_spec, payloads, run_step
from vemscale.post.stats import decode_counts, encode_counts, label_counts, merge_counts, volumes_um3

__all__ = ["PROPERTIES_DIR", "segment_properties", "write_segment_properties", "count_labels", "instance_table",
           "table_properties"]

log = logging.getLogger(__name__)

PROPERTIES_DIR = "segment_properties"


def segment_properties(counts: Mapping[int, int], voxel_size_xyz: Sequence[float],
                       classes: Sequence[str] | None = None) -> dict[str, Any]:
    """The segment-properties info for the labels in `counts`: label = class name (or the id), volume_um3."""
    ids = sorted(int(k) for k in counts)
    vol = volumes_um3(counts, voxel_size_xyz)

    def name(i: int) -> str:
        return str(classes[i]) if classes is not None and i < len(classes) else str(i)

    return {
        "@type": "neuroglancer_segment_properties",
        "inline": {
            "ids": [str(i) for i in ids],
            "properties": [
                {"id": "label", "type": "label", "values": [name(i) for i in ids]},
                {"id": "volume_um3", "type": "number", "data_type": "float32",
                 "description": "object volume in cubic micrometres", "values": [float(f"{vol[i]:.6g}") for i in ids]},
            ],
        },
    }


def instance_table(source_url: str) -> str | None:
    """The object table of a `vemscale instances` output whose segmentation is `source_url`, if it is one."""
    import os

    from vemscale.io.urls import join_url, kvstore_url, parse_url

    parsed = parse_url(source_url)
    if parsed.dataset is not None or parsed.driver not in (None, "zarr", "neuroglancer_precomputed"):
        return None  # (instances writes its segmentation as OME-Zarr or, segmentation_format=precomputed, a layer)
    parent = kvstore_url(parsed).rstrip("/").rsplit("/", 1)[0] + "/"
    from vemscale.io.ome_zarr import read_group_attrs

    meta = read_group_attrs(ts.KvStore.open(parent).result()).get("vemscale") or {}
    if meta.get("kind") != "instances" or os.path.basename(source_url.rstrip("/")) != "segmentation":
        return None
    return join_url(parent, meta.get("table", "objects"))


def table_properties(table_url: str) -> dict[str, Any]:
    """Segment properties from an object table: label = class, and volume (um^3), surface (um^2), sphericity,
    voxels per id (Neuroglancer shows them in the segment list and for a selected object). Parts are read one at a
    time; the inline format itself lists every object."""
    import io

    import pyarrow.parquet as pq

    kv = ts.KvStore.open(table_url.rstrip("/") + "/").result()
    names = sorted(bytes(k).decode() for k in kv.list().result() if bytes(k).endswith(b".parquet"))
    ids: list[str] = []
    cols: dict[str, list[Any]] = {"class": [], "volume_um3": [], "surface_um2": [], "sphericity": [], "voxels": []}
    for name in names:
        t = pq.read_table(io.BytesIO(bytes(kv.read(name).result().value)),
                          columns=["id", "class", "volume_nm3", "surface_nm2", "sphericity", "voxels"]).to_pandas()
        ids += [str(int(i)) for i in t["id"]]
        cols["class"] += [str(c) for c in t["class"]]
        cols["volume_um3"] += [float(f"{v:.6g}") for v in t["volume_nm3"] * 1e-9]
        cols["surface_um2"] += [float(f"{v:.6g}") for v in t["surface_nm2"] * 1e-6]
        cols["sphericity"] += [float(f"{v:.4g}") if v == v else 0.0 for v in t["sphericity"]]
        cols["voxels"] += [int(v) for v in t["voxels"]]

    def number(key: str, dtype: str, what: str) -> dict[str, Any]:
        return {"id": key, "type": "number", "data_type": dtype, "description": what, "values": cols[key]}

    return {"@type": "neuroglancer_segment_properties", "inline": {"ids": ids, "properties": [
        {"id": "label", "type": "label", "values": [f"{c} {i}" for c, i in zip(cols["class"], ids)]},
        {"id": "class", "type": "string", "values": cols["class"]},
        number("volume_um3", "float32", "object volume in cubic micrometres"),
        number("surface_um2", "float32", "surface area of the object's mesh in square micrometres"),
        number("sphericity", "float32", "pi^(1/3) (6 V)^(2/3) / A"),
        number("voxels", "uint32", "voxels of the object"),
    ]}}


def count_block(box: Box, spec: dict[str, Any], run: str) -> bytes:
    """Voxels per non-zero label of one box, as a payload."""
    return encode_counts(label_counts(open_spec(spec, run=run)[tuple(box)].read().result()))


def count_labels(url: str, target_voxels: int = 2**24, max_in_flight: int | None = None) -> dict[int, int]:
    """Voxels per non-zero label of scale 0 of a segmentation layer, counted blockwise (resumable)."""
    from vemscale.raycluster import ensure_ray

    seg = open_scale(url, 0)
    grid = BlockGrid.aligned(seg.shape, read_chunk_shape(seg), target_voxels)  # read-only: any chunk multiple
    ensure_ray()
    spec = view_spec(seg)
    ledger, _ = run_step(url, "counts", {"step": "counts", "version": 1, "source": spec,
                                         "info": read_info(url)["scales"][0]}, grid, count_block,
                         {"spec": spec, "run": uuid.uuid4().hex}, bytes_per_voxel=8.0, max_in_flight=max_in_flight)
    total: dict[int, int] = {}
    for p in payloads(ledger, grid.num_blocks):
        merge_counts(total, decode_counts(p))
    return total


def write_segment_properties(url: str, classes: Sequence[str] | None = None,
                             counts: Mapping[int, int] | None = None, table_url: str | None = None) -> dict[str, Any]:
    """Write `<url>/segment_properties/info` and reference it from the layer info; returns the properties."""
    info = read_info(url)
    if info is None or info.get("type") != "segmentation":
        raise UserError(f"{url!r} is not a precomputed segmentation layer")
    if table_url is not None:
        props = table_properties(table_url)
    else:
        if counts is None:
            counts = count_labels(url)
        props = segment_properties(counts, info["scales"][0]["resolution"], classes)
    kv = ts.KvStore.open(layer_kvstore(url) + PROPERTIES_DIR + "/").result()
    kv.write("info", json.dumps(props).encode()).result()
    update_info(url, segment_properties=PROPERTIES_DIR)
    log.info("segment properties: %d segments", len(props["inline"]["ids"]))
    return props
