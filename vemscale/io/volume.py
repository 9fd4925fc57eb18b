"""`open_volume(url)`: any supported volume as a lazy [c,]z,y,x array that reads only the box asked for.

Chunked formats (zarr v2/v3, OME-Zarr, n5, Neuroglancer precomputed; local, s3://, gs://) go through
tensorstore (`vemscale.io.stores`); formats it cannot read (TIFF, HDF5, MRC, PNG/JPEG slices) have small
readers in `vemscale.io.readers`. Whatever the source, callers see axes z,y,x (or c,z,y,x) starting at 0,
and a voxel size (x,y,z in nm) from the metadata or the caller, or None when unknown.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import numpy as np

from vemscale.errors import UserError
from vemscale.io.ome_zarr import create_ome_zarr
from vemscale.io.readers import (
    ArrayReader,
    H5Reader,
    MrcReader,
    Reader,
    SliceReader,
    TiffReader,
    clean_voxel_size,
    is_slice_folder,
    list_slices,
)
from vemscale.io.urls import (
    ACCEPTED_FORMATS,
    H5_SUFFIXES,
    IMAGE_SUFFIXES,
    MRC_SUFFIXES,
    TIFF_SUFFIXES,
    parse_url,
)

__all__ = ["Volume", "open_volume", "open_volume_cached", "array_volume", "create_ome_zarr", "parse_voxel_size", "ACCEPTED_FORMATS"]

BoxLike = Any  # a slice, an int, or a tuple of them (one per leading axis)


def parse_voxel_size(value: str | Sequence[float] | None) -> tuple[float, float, float] | None:
    """Parse a voxel size given as 'x,y,z' nanometres (or a 3-sequence); UserError when malformed."""
    if value is None:
        return None
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        vs = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise UserError(f"voxel size {value!r} must be three numbers x,y,z in nanometres, e.g. 4.6,4.6,50") from None
    out = clean_voxel_size(vs)
    if out is None:
        raise UserError(f"voxel size {value!r} must be three positive numbers x,y,z in nanometres, e.g. 4.6,4.6,50")
    return out


def normalize_box(box: BoxLike, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """Unit-step slices clipped to `shape` for every axis, plus the axes given as ints (to squeeze)."""
    if box is None:
        box = ()
    if not isinstance(box, tuple):
        box = (box,)
    if len(box) > len(shape):
        raise IndexError(f"box {box} has more axes than the volume shape {tuple(shape)}")
    slices: list[slice] = []
    squeeze: list[int] = []
    for axis, size in enumerate(shape):
        item = box[axis] if axis < len(box) else slice(None)
        if isinstance(item, (int, np.integer)):
            i = int(item) + (size if item < 0 else 0)
            if not 0 <= i < size:
                raise IndexError(f"index {item} out of range for axis {axis} of size {size}")
            slices.append(slice(i, i + 1))
            squeeze.append(axis)
        elif isinstance(item, slice):
            start, stop, step = item.indices(size)
            if step != 1:
                raise ValueError(f"box slices must have step 1, got {item}")
            slices.append(slice(start, max(start, stop)))
        else:
            raise TypeError(f"box entries must be slices or ints, got {item!r}")
    return tuple(slices), tuple(squeeze)


class Volume:
    """A lazily read volume: `.shape` is z,y,x or c,z,y,x; `.read(box)` decodes only what the box covers.

    Picklable (open handles are dropped and reopened), so a Volume or its `to_dask()` graph can be shipped
    to dask or Ray workers.
    """

    def __init__(self, url: str, reader: Reader, voxel_size_xyz: Sequence[float] | None = None,
                 scale: int | str | None = None) -> None:
        self.url = url
        self.scale = scale
        self._reader = reader
        self.voxel_size_xyz = clean_voxel_size(voxel_size_xyz) if voxel_size_xyz is not None else reader.voxel_size_xyz

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._reader.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._reader.dtype)

    @property
    def ndim(self) -> int:
        return len(self._reader.shape)

    @property
    def chunks(self) -> tuple[int, ...] | None:
        """Storage chunk (or page/slice) shape, when the format has one."""
        return self._reader.chunks

    @property
    def tensorstore(self) -> Any:
        """The [c,]z,y,x tensorstore view for chunked formats, else None."""
        return getattr(self._reader, "store", None)

    @property
    def kind(self) -> str:
        return getattr(self._reader, "kind", type(self._reader).__name__.replace("Reader", "").lower())

    def read(self, box: BoxLike = None, out: np.ndarray | None = None) -> np.ndarray:
        """The voxels inside `box` (slices/ints per leading axis; missing axes are whole) as a numpy array, or
        written into `out` (a C-contiguous array of the box's shape and the volume's dtype: a reused buffer)."""
        slices, squeeze = normalize_box(box, self.shape)
        if out is not None:
            shape = tuple(s.stop - s.start for s in slices)
            if out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous or squeeze:
                raise ValueError(f"read into an array of shape {out.shape} {out.dtype}: the box {slices} needs a "
                                 f"C-contiguous {shape} {self.dtype} (and slices only)")
            return self._reader.read_into(slices, out)
        out = self._reader.read(slices)
        return out.reshape([s for i, s in enumerate(out.shape) if i not in squeeze]) if squeeze else out

    def __getitem__(self, box: BoxLike) -> np.ndarray:
        return self.read(box)

    def __len__(self) -> int:
        return self.shape[0]

    def _token(self) -> str:
        from dask.base import tokenize

        extra = tokenize(self._reader.array) if isinstance(self._reader, ArrayReader) else ""
        return tokenize(self.url, self.scale, self.shape, str(self.dtype), self.kind, extra)

    def __dask_tokenize__(self) -> str:
        return self._token()

    def to_dask(self, chunks: Any = None) -> Any:
        """A lazy dask array over this volume; each dask chunk is one `read` of its box.

        Default chunks are whole multiples of the storage chunks near dask's target chunk size.
        """
        import dask.array as da

        if chunks is None:
            chunks = da.core.normalize_chunks("auto", self.shape, dtype=self.dtype, previous_chunks=self.chunks)
        return da.from_array(self, chunks=chunks, name=f"volume-{self._token()}", lock=False, asarray=True,
                             fancy=False, meta=np.empty((0,) * self.ndim, dtype=self.dtype))

    def __repr__(self) -> str:
        vs = "unknown" if self.voxel_size_xyz is None else ",".join(f"{v:g}" for v in self.voxel_size_xyz)
        return f"Volume({self.url!r}, shape={self.shape}, dtype={self.dtype}, voxel_size_xyz={vs} nm, kind={self.kind})"


def array_volume(array: np.ndarray, voxel_size_xyz: Sequence[float] | None = None, url: str = "<memory>") -> Volume:
    """Wrap an in-memory array (y,x / z,y,x / c,z,y,x) as a Volume (tests, small results)."""
    return Volume(url, ArrayReader(array, voxel_size_xyz))


def _open_local_file(path: str, dataset: str | None, original: str) -> Reader:
    suffix = os.path.splitext(path)[1].lower()
    if dataset is not None or suffix in H5_SUFFIXES:
        return H5Reader(path, dataset)
    if suffix in TIFF_SUFFIXES:
        return TiffReader(path)
    if suffix in MRC_SUFFIXES:
        return MrcReader(path)
    if suffix in IMAGE_SUFFIXES:
        return SliceReader([path], path)
    raise UserError(f"cannot open {original!r}: unknown file type {suffix or '(no suffix)'!r}; accepted: {ACCEPTED_FORMATS}")


def open_volume(url: str | os.PathLike[str] | Volume, scale: int | str | None = None,
                voxel_size_xyz: str | Sequence[float] | None = None) -> Volume:
    """Open `url` (see ACCEPTED_FORMATS) as a Volume.

    `scale` picks a level of a multiscale source (OME-Zarr index or path, precomputed index or key, N5
    `sN`); default the finest. `voxel_size_xyz` (x,y,z nm) overrides what the metadata says.
    """
    override = parse_voxel_size(voxel_size_xyz)
    if isinstance(url, Volume):
        return url if override is None else Volume(url.url, url._reader, override, url.scale)
    parsed = parse_url(url)
    if parsed.remote or parsed.driver is not None:
        from vemscale.io.stores import open_tensorstore

        if not parsed.remote and not os.path.exists(parsed.location):
            raise UserError(f"{parsed.original!r} does not exist; accepted: {ACCEPTED_FORMATS}")
        return Volume(parsed.original, open_tensorstore(parsed, scale), override, scale)
    path = parsed.location
    if not os.path.exists(path):
        raise UserError(f"{parsed.original!r} does not exist (looked for {path}); accepted: {ACCEPTED_FORMATS}")
    if os.path.isfile(path):
        reader = _open_local_file(path, parsed.dataset, parsed.original)
    elif any(os.path.exists(os.path.join(path, k)) for k in ("zarr.json", ".zarray", ".zattrs", ".zgroup",
                                                                 "attributes.json", "info")):
        from vemscale.io.stores import open_tensorstore

        return Volume(parsed.original, open_tensorstore(parsed, scale), override, scale)
    elif is_slice_folder(path):
        reader = SliceReader(list_slices(path), path)
    else:
        raise UserError(f"cannot open directory {parsed.original!r}: it holds no zarr/n5/precomputed metadata and "
                        f"no image slices; accepted: {ACCEPTED_FORMATS}")
    if scale not in (None, 0, "0"):
        raise UserError(f"{parsed.original!r} has a single scale; leave the scale out")
    return Volume(parsed.original, reader, override, scale)


@functools.lru_cache(maxsize=8)
def open_volume_cached(url: str, scale: int | str | None = None, run_id: str = "") -> Volume:
    """`open_volume` once per (url, scale, run) in a worker: block tasks reuse the handle, a new run reopens."""
    return open_volume(url, scale=scale)
