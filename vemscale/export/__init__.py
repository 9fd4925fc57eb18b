"""Neuroglancer output: precomputed layers (image, probabilities, segmentation), pyramids, meshes, segment
properties, and a local viewer.

    from vemscale.export import create_precomputed, write_chunk_aligned_block, write_chunk_shape
    store = create_precomputed("precomputed://file:///data/pred", (z, y, x), "uint8", (4.6, 4.6, 50), "image",
                               num_channels=2, chunk=(16, 128, 128), sharded=True)
    write_chunk_aligned_block(store, box, block)        # box: whole write chunks (shards), [c,]z,y,x
    build_pyramid(url); write_meshes(url); write_segment_properties(url, classes)

`vemscale export` (run.py) and `vemscale view` (view.py) are the command lines.
"""

from vemscale.export.precomputed import (
    add_scale,
    check_aligned,
    create_precomputed,
    open_scale,
    read_info,
    update_info,
    write_chunk_aligned_block,
    write_chunk_shape,
)

__all__ = [
    "add_scale", "check_aligned", "create_precomputed", "open_scale", "read_info", "update_info",
    "write_chunk_aligned_block", "write_chunk_shape", "build_pyramid", "write_meshes", "write_segment_properties",
]


def __getattr__(name: str):  # Ray-using parts load on first use, so `import vemscale.export` stays light
    if name == "build_pyramid":
        from vemscale.export.pyramid import build_pyramid

        return build_pyramid
    if name == "write_meshes":
        from vemscale.export.meshes import write_meshes

        return write_meshes
    if name == "write_segment_properties":
        from vemscale.export.properties import write_segment_properties

        return write_segment_properties
    raise AttributeError(name)
