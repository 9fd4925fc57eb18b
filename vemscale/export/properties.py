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

__all__ = ["PROPERTIES_DIR", "segment_properties", "write_segment_properties", "count_labels"]

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
                             counts: Mapping[int, int] | None = None) -> dict[str, Any]:
    """Write `<url>/segment_properties/info` and reference it from the layer info; returns the properties."""
    info = read_info(url)
    if info is None or info.get("type") != "segmentation":
        raise UserError(f"{url!r} is not a precomputed segmentation layer")
    if counts is None:
        counts = count_labels(url)
    props = segment_properties(counts, info["scales"][0]["resolution"], classes)
    kv = ts.KvStore.open(layer_kvstore(url) + PROPERTIES_DIR + "/").result()
    kv.write("info", json.dumps(props).encode()).result()
    update_info(url, segment_properties=PROPERTIES_DIR)
    log.info("segment properties: %d segments", len(props["inline"]["ids"]))
    return props
