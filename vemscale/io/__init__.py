"""Volume I/O: open any supported volume URL as a lazy z,y,x array, create OME-Zarr outputs, ingest files.

    from vemscale.io import open_volume, create_ome_zarr
    vol = open_volume("s3://bucket/em.ome.zarr", scale=1)   # or .tif, file.h5:/raw, .mrc, n5, precomputed://
    block = vol.read((slice(0, 16), slice(0, 512), slice(0, 512)))

    S3-compatible stores other than AWS: export AWS_ENDPOINT_URL=http://minio:9000 (see vemscale.io.s3).
"""

from vemscale.io import s3 as _s3

_s3.install()  # s3 kvstores use AWS_ENDPOINT_URL(_S3) when set (MinIO, Ceph, moto...)

from vemscale.io.volume import ACCEPTED_FORMATS, Volume, array_volume, create_ome_zarr, open_volume, parse_voxel_size

__all__ = ["ACCEPTED_FORMATS", "Volume", "array_volume", "create_ome_zarr", "open_volume", "parse_voxel_size"]
