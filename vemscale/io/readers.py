"""Readers behind `Volume`: one small class per storage kind, all presenting [c,]z,y,x and reading a box.

Every reader has `shape`, `dtype`, `chunks` (storage granularity or None), `voxel_size_xyz` (nm, from
the file's own metadata, or None) and `read(box)`, where `box` is a full tuple of unit-step slices already
clipped to `shape`. Readers open their file lazily and drop open handles when pickled, so a `Volume` can
travel to dask or Ray workers and reopen there. 2-D sources (y,x) are presented as one z-slice (1,y,x).
"""

from __future__ import annotations

import math
import os
import re
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vemscale.errors import UserError


Box = tuple[slice, ...]

# Length units to nanometres, as written in OME-Zarr / OME-TIFF / ImageJ / N5 metadata.
UNIT_TO_NM = {
    "angstrom": 0.1, "å": 0.1, "a": 0.1,
    "nanometer": 1.0, "nanometre": 1.0, "nm": 1.0,
    "micrometer": 1e3, "micrometre": 1e3, "micron": 1e3, "um": 1e3, "µm": 1e3, "\\u00b5m": 1e3,
    "millimeter": 1e6, "millimetre": 1e6, "mm": 1e6,
    "centimeter": 1e7, "cm": 1e7,
    "meter": 1e9, "metre": 1e9, "m": 1e9,
}


def unit_factor_nm(unit: str | None) -> float | None:
    """Nanometres per `unit`, or None for an unknown unit."""
    if unit is None:
        return None
    return UNIT_TO_NM.get(str(unit).strip().lower())


def clean_voxel_size(values: Sequence[float] | None) -> tuple[float, float, float] | None:
    """A voxel size (x,y,z nm) as three positive finite floats, or None when unknown or degenerate."""
    if values is None:
        return None
    try:
        vs = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
        return None
    return vs  # type: ignore[return-value]


class Reader:
    """Common base: shape/dtype/chunks/voxel size and a box reader; subclasses fill them in."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...] | None = None
    voxel_size_xyz: tuple[float, float, float] | None = None
    _handles: tuple[str, ...] = ()

    def read(self, box: Box) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def read_into(self, box: Box, out: np.ndarray) -> np.ndarray:
        """`read(box)` into the caller's array `out` (of the box's shape and this dtype); returns `out`."""
        np.copyto(out, self.read(box), casting="no")
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in self._handles:
            state[name] = None
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class ArrayReader(Reader):
    """An in-memory array (tests, small results): [c,]z,y,x or y,x."""

    def __init__(self, array: np.ndarray, voxel_size_xyz: Sequence[float] | None = None) -> None:
        arr = np.asarray(array)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim not in (3, 4):
            raise UserError(f"an in-memory volume must be 2-D (y,x), 3-D (z,y,x) or 4-D (c,z,y,x); got shape {arr.shape}")
        self.array = arr
        self.shape = arr.shape
        self.dtype = arr.dtype
        self.voxel_size_xyz = clean_voxel_size(voxel_size_xyz)
        self._lock = threading.Lock()

    def read(self, box: Box) -> np.ndarray:
        return np.array(self.array[box])


# ----------------------------------------------------------------------------------------------- TIFF


def _tiff_voxel_size(tf: Any, page: Any) -> tuple[float, float, float] | None:
    """Voxel size from OME-TIFF PhysicalSize* or ImageJ spacing/unit + resolution tags, when present."""
    try:
        if tf.is_ome and tf.ome_metadata:
            import tifffile

            pixels = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]
            pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
            out = []
            for ax in "XYZ":
                size = pixels.get(f"PhysicalSize{ax}")
                factor = unit_factor_nm(pixels.get(f"PhysicalSize{ax}Unit", "µm"))
                out.append(None if size is None or factor is None else float(size) * factor)
            if all(v is not None for v in out):
                return clean_voxel_size(out)  # type: ignore[arg-type]
        meta = tf.imagej_metadata or {}
        factor = unit_factor_nm(meta.get("unit"))
        if factor is not None and "spacing" in meta:
            xres, yres = page.resolution
            if xres and yres:
                return clean_voxel_size((factor / xres, factor / yres, factor * float(meta["spacing"])))
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError, IndexError):
        pass
    return None


class TiffReader(Reader):
    """A multi-page TIFF (tifffile), read page by page: only the z-range (and channels) of a box are decoded.

    Layouts: Y,X (one slice); one leading axis (pages = z); C with one other leading axis (pages in either
    order); samples (RGB, contiguous or planar) as channels. Other layouts raise UserError. Note that a
    page stored as planar RGB (3 or 4 samples) is channels, not z: write grey stacks as 'minisblack'.
    """

    _handles = ("_tf",)

    def __init__(self, path: str) -> None:
        import tifffile

        self.path = path
        self._tf = None
        self._lock = threading.Lock()
        try:
            tf = self._file()
            series = tf.series[0]
            keyframe = series.keyframe
        except (tifffile.TiffFileError, OSError, IndexError, ValueError) as err:
            raise UserError(f"cannot read TIFF {path!r}: {err}") from None
        page_shape = tuple(keyframe.shape)
        page_axes = keyframe.axes
        lead_shape = tuple(series.shape[: len(series.shape) - len(page_shape)])
        lead_axes = series.axes[: len(lead_shape)]
        if tuple(series.shape[len(lead_shape):]) != page_shape:
            raise UserError(f"TIFF {path!r}: unsupported layout {series.axes} {series.shape}")
        self.dtype = np.dtype(series.dtype)
        self.page_shape = page_shape
        if page_axes not in ("YX", "YXS", "SYX"):
            raise UserError(f"TIFF {path!r}: pages with axes {page_axes!r} are not supported (expected YX, YXS or SYX)")
        self.samples = len(page_shape) == 3
        self.samples_first = page_axes == "SYX"
        self.n_pages = len(series.pages)
        if self.n_pages != int(np.prod(lead_shape, dtype=np.int64)):
            raise UserError(f"TIFF {path!r}: {self.n_pages} pages do not match the series shape {series.shape}")
        # page index = zi * z_stride + ci * c_stride
        nz, nc, z_stride, c_stride = 1, 1, 0, 0
        if len(lead_shape) == 1:
            if lead_axes == "C":
                nc, c_stride = lead_shape[0], 1
            else:
                nz, z_stride = lead_shape[0], 1
        elif len(lead_shape) == 2 and "C" in lead_axes:
            ci = lead_axes.index("C")
            nc, nz = lead_shape[ci], lead_shape[1 - ci]
            c_stride, z_stride = (1, nc) if ci == 1 else (nz, 1)
        elif len(lead_shape) > 1:
            raise UserError(f"TIFF {path!r}: axes {series.axes} {series.shape} are not supported; "
                            "expected Y,X / Z,Y,X / Z,C,Y,X / C,Z,Y,X")
        if self.samples and nc > 1:
            raise UserError(f"TIFF {path!r}: both channel pages and RGB samples are not supported")
        self.nz, self.z_stride, self.c_stride = nz, z_stride, c_stride
        self.nc = (page_shape[0] if self.samples_first else page_shape[2]) if self.samples else nc
        self.channel_source = "samples" if self.samples else ("pages" if nc > 1 else None)
        yx = page_shape[1:] if self.samples_first else page_shape[:2]
        self.shape = ((self.nc,) if self.channel_source else ()) + (nz,) + yx
        self.chunks = ((1,) if self.channel_source == "pages" else (self.nc,) if self.samples else ()) + (1,) + yx
        self.voxel_size_xyz = _tiff_voxel_size(tf, keyframe)

    def _file(self) -> Any:
        if self._tf is None:
            import tifffile

            self._tf = tifffile.TiffFile(self.path)
        return self._tf

    def read(self, box: Box) -> np.ndarray:
        if self.channel_source:
            cbox, zbox, ybox, xbox = box
        else:
            cbox, (zbox, ybox, xbox) = slice(0, 1), box
        zs = range(zbox.start, zbox.stop)
        cs = range(cbox.start, cbox.stop) if self.channel_source == "pages" else range(1)
        out_c = len(range(cbox.start, cbox.stop)) if self.channel_source else 1
        out = np.empty((out_c, len(zs), ybox.stop - ybox.start, xbox.stop - xbox.start), self.dtype)
        if out.size:
            keys = [z * self.z_stride + c * self.c_stride for c in cs for z in zs]
            with self._lock:
                data = self._file().asarray(key=keys, series=0)
            data = data.reshape((len(cs), len(zs)) + self.page_shape)
            if self.samples_first:
                data = np.moveaxis(data[0], 1, 0)[cbox, :, ybox, xbox]  # (z,s,y,x) -> (s,z,y,x)
            elif self.samples:
                data = np.moveaxis(data[0], -1, 0)[cbox, :, ybox, xbox]  # (z,y,x,s) -> (s,z,y,x)
            else:
                data = data[:, :, ybox, xbox]
            out[...] = data
        return out if self.channel_source else out[0]


# ----------------------------------------------------------------------------------------------- HDF5


class H5Reader(Reader):
    """An HDF5 dataset (h5py), read by hyperslab. Voxel size from `resolution` (z,y,x nm, CREMI style) or
    `element_size_um` (z,y,x µm, ImageJ/ilastik style) attributes when present."""

    _handles = ("_file", "_ds")

    def __init__(self, path: str, dataset: str | None) -> None:
        import h5py

        self.path = path
        self._file = None
        self._ds = None
        self._lock = threading.Lock()
        try:
            f = h5py.File(path, "r")
        except OSError as err:
            raise UserError(f"cannot open HDF5 file {path!r}: {err}") from None
        names: list[str] = []
        f.visititems(lambda name, obj: names.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
        if dataset is None:
            if len(names) != 1:
                f.close()
                listed = ", ".join(names[:20]) or "none"
                raise UserError(f"HDF5 file {path!r} holds {len(names)} datasets ({listed}); name one as "
                                f"{path}:/dataset or {path}#dataset")
            dataset = names[0]
        if dataset.lstrip("/") not in f or not isinstance(f[dataset.lstrip("/")], h5py.Dataset):
            f.close()
            raise UserError(f"HDF5 file {path!r} has no dataset {dataset!r}; datasets: {', '.join(names[:20]) or 'none'}")
        self.dataset = dataset
        ds = f[dataset.lstrip("/")]
        if ds.ndim not in (2, 3, 4):
            f.close()
            raise UserError(f"HDF5 dataset {path}:{dataset} has shape {ds.shape}; expected y,x / z,y,x / c,z,y,x")
        self.expand = ds.ndim == 2
        self.shape = ((1,) if self.expand else ()) + tuple(ds.shape)
        self.dtype = np.dtype(ds.dtype)
        self.chunks = None if ds.chunks is None else ((1,) if self.expand else ()) + tuple(ds.chunks)
        self.voxel_size_xyz = self._voxel_size(ds)
        f.close()

    @staticmethod
    def _voxel_size(ds: Any) -> tuple[float, float, float] | None:
        for key, factor in (("resolution", 1.0), ("element_size_um", 1e3)):
            if key in ds.attrs:
                vals = np.asarray(ds.attrs[key], dtype=float).ravel()
                if vals.size == 3:
                    return clean_voxel_size([vals[2] * factor, vals[1] * factor, vals[0] * factor])
        return None

    def read(self, box: Box) -> np.ndarray:
        import h5py

        with self._lock:
            if self._ds is None:
                self._file = h5py.File(self.path, "r")
                self._ds = self._file[self.dataset.lstrip("/")]
            if self.expand:
                out = self._ds[box[1:]][None][box[0]]
            else:
                out = self._ds[box]
        return np.asarray(out)


# ----------------------------------------------------------------------------------------------- MRC


class MrcReader(Reader):
    """An MRC file, memory-mapped (mrcfile); voxel size from the header (Å -> nm; 0 means unknown)."""

    _handles = ("_mrc",)

    def __init__(self, path: str) -> None:
        self.path = path
        self._mrc = None
        self._lock = threading.Lock()
        try:
            mrc = self._open()
            data = mrc.data
        except (ValueError, OSError) as err:
            raise UserError(f"cannot read MRC file {path!r}: {err}") from None
        if data is None or data.ndim not in (2, 3):
            raise UserError(f"MRC file {path!r} holds no 2-D or 3-D data")
        self.expand = data.ndim == 2
        self.shape = ((1,) if self.expand else ()) + tuple(data.shape)
        self.dtype = np.dtype(data.dtype).newbyteorder("=")
        vs = mrc.voxel_size
        self.voxel_size_xyz = clean_voxel_size([float(vs.x) / 10, float(vs.y) / 10, float(vs.z) / 10])

    def _open(self) -> Any:
        if self._mrc is None:
            import mrcfile

            self._mrc = mrcfile.mmap(self.path, mode="r", permissive=False)
        return self._mrc

    def read(self, box: Box) -> np.ndarray:
        with self._lock:
            data = self._open().data
            out = data[box[1:]][None][box[0]] if self.expand else data[box]
            return np.array(out, dtype=self.dtype)


# ----------------------------------------------------------------------------------------------- slices


def natural_key(name: str) -> list[Any]:
    """Sort key that orders 'z2' before 'z10'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _read_image(path: str) -> np.ndarray:
    """One 2-D image as an array (PNG/JPEG via Pillow, TIFF via tifffile); 1-bit images become 0/255 uint8."""
    if path.lower().endswith((".tif", ".tiff")):
        import tifffile

        return np.asarray(tifffile.imread(path))
    from PIL import Image

    with Image.open(path) as img:
        if img.mode == "1":
            img = img.convert("L")
        elif img.mode == "P":
            img = img.convert("RGB")
        return np.asarray(img)


SLICE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


def list_slices(folder: str) -> list[str]:
    """Image files in `folder`, naturally sorted by name."""
    names = [n for n in os.listdir(folder) if n.lower().endswith(SLICE_SUFFIXES) and not n.startswith(".")]
    return [os.path.join(folder, n) for n in sorted(names, key=natural_key)]


class SliceReader(Reader):
    """A stack of 2-D image files (a folder of PNG/TIFF slices, or one image): file i is z-slice i.

    Shape and dtype come from the first file; a later file that differs raises UserError naming it.
    RGB images become channels (c,z,y,x).
    """

    def __init__(self, files: Sequence[str], where: str) -> None:
        if not files:
            raise UserError(f"{where!r} holds no PNG/TIFF/JPEG slices")
        self.files = list(files)
        self._lock = threading.Lock()
        first = self._load(0)
        if first.ndim == 3 and first.shape[-1] in (3, 4):
            self.rgb = True
        elif first.ndim == 2:
            self.rgb = False
        else:
            raise UserError(f"slice {self.files[0]!r} has shape {first.shape}; expected a 2-D grey or RGB image")
        self.slice_shape = first.shape
        self.dtype = first.dtype
        yx = first.shape[:2]
        self.shape = ((first.shape[2],) if self.rgb else ()) + (len(self.files),) + yx
        self.chunks = ((first.shape[2],) if self.rgb else ()) + (1,) + yx

    def _load(self, i: int) -> np.ndarray:
        try:
            img = _read_image(self.files[i])
        except Exception as err:  # noqa: BLE001 - any decoder error is the user's file
            raise UserError(f"cannot read slice {self.files[i]!r}: {err}") from None
        if hasattr(self, "slice_shape") and (img.shape != self.slice_shape or img.dtype != self.dtype):
            raise UserError(f"slice {self.files[i]!r} has shape {img.shape} {img.dtype}, but the first slice "
                            f"{self.files[0]!r} has {self.slice_shape} {self.dtype}; all slices must match")
        return img

    def read(self, box: Box) -> np.ndarray:
        cbox, zbox, ybox, xbox = box if self.rgb else (slice(None), *box)
        planes = [self._load(z)[ybox, xbox] for z in range(zbox.start, zbox.stop)]
        if self.rgb:
            stack = np.stack(planes, axis=0) if planes else np.empty((0, ybox.stop - ybox.start, xbox.stop - xbox.start, self.shape[0]), self.dtype)
            return np.ascontiguousarray(np.moveaxis(stack, -1, 0)[cbox])
        if not planes:
            return np.empty((0, ybox.stop - ybox.start, xbox.stop - xbox.start), self.dtype)
        return np.stack(planes, axis=0)


def is_slice_folder(path: str) -> bool:
    """True when `path` is a directory holding at least one image slice."""
    p = Path(path)
    return p.is_dir() and any(n.lower().endswith(SLICE_SUFFIXES) for n in os.listdir(p))
