"""Unlabeled 2D patches for pre-training, streamed from folders of images and from volumes, mixed by weight.

- `FolderSource`: a folder (searched recursively) of 2D PNG/TIFF/JPEG images, e.g. CEM500K's 224x224
  patches. Only the sorted list of relative paths is held (as one compact bytes array); images are read
  when drawn. Each pass ("epoch") visits the files in a seeded permutation; rank r of N takes every N-th.
- `VolumeSource`: random 2D patches of any `open_volume` URL (zarr, OME-Zarr, n5, TIFF, ...) in the
  allowed planes; only the patch's box is read.
- `PatchStream`: what a Ray Train worker draws from. Global batch i is a pure function of (seed, i, the
  per-source counters), so every rank derives the same assignment and takes its strided share, and a
  resumed run continues the stream where the checkpoint left it.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import Field, field_validator

from vemscale.config import Strict
from vemscale.errors import UserError
from vemscale.train.data import dtype_scale, parse_range

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
PLANE_AXES = {"xy": 0, "xz": 1, "yz": 2}  # the axis (of z,y,x) a plane is perpendicular to


class SourceConfig(Strict):
    """One unlabeled source: a folder of 2D images, or a volume URL to sample 2D patches from."""

    path: str
    kind: Literal["auto", "folder", "volume"] = "auto"  # auto: zarr/n5/precomputed/files = volume, image dirs = folder
    weight: float = Field(1.0, gt=0)  # relative share of the patches drawn from this source
    planes: list[Literal["xy", "xz", "yz"]] = Field(default_factory=lambda: ["xy"])  # volumes only
    slices: str | None = None  # volumes only: z range "z0:z1" to sample from (all when omitted)
    scale: int | str | None = None  # volumes only: multiscale level (default the finest)

    @field_validator("planes", mode="before")
    @classmethod
    def _planes(cls, v: Any) -> Any:
        if isinstance(v, str):
            return ["xy", "xz", "yz"] if v == "all" else [p.strip() for p in v.split(",")]
        return v


def sources_from(value: Any) -> Any:
    """Accept `data=path`, `data=a,b` or a list of paths/dicts for the `data` key (pydantic 'before')."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


# --------------------------------------------------------------------------------------- reading images


def read_image_file(path: str) -> np.ndarray:
    """One 2D image file as (Y, X) or (Y, X, S)."""
    if path.lower().endswith((".tif", ".tiff")):
        import tifffile

        img = np.asarray(tifffile.imread(path))
        return img[0] if img.ndim == 3 and img.shape[0] == 1 else img
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("1", "P"):
            im = im.convert("L")
        return np.asarray(im)


def to_chw(img: np.ndarray, in_chans: int, where: str) -> np.ndarray:
    """(Y,X) or (Y,X,S) raw image -> float32 (C, Y, X) in [0, 1]; RGB becomes grey when in_chans is 1."""
    scale = dtype_scale(img.dtype)
    x = img.astype(np.float32) / scale
    if x.ndim == 2:
        x = x[None]
    elif x.ndim == 3 and x.shape[-1] in (3, 4):
        x = np.moveaxis(x[..., :3], -1, 0)
        if in_chans == 1:
            x = x.mean(0, keepdims=True)
    else:
        raise UserError(f"{where}: image of shape {img.shape} is not a 2D grey or RGB image")
    if x.shape[0] != in_chans:
        raise UserError(f"{where}: image has {x.shape[0]} channel(s) but in_chans is {in_chans}")
    return x


def fit_patch(x: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop x crop window of (C, Y, X), mirror-padding an image smaller than that."""
    _, h, w = x.shape
    if h < crop or w < crop:
        ph, pw = max(0, crop - h), max(0, crop - w)
        mode = "reflect" if min(h, w) > 1 and ph < h and pw < w else "symmetric" if min(h, w) > 1 else "edge"
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode=mode)
        if x.shape[1] < crop or x.shape[2] < crop:  # still short after one mirror: repeat edges
            x = np.pad(x, ((0, 0), (0, max(0, crop - x.shape[1])), (0, max(0, crop - x.shape[2]))), mode="edge")
        h, w = x.shape[1:]
    y0 = int(rng.integers(h - crop + 1))
    x0 = int(rng.integers(w - crop + 1))
    return np.ascontiguousarray(x[:, y0 : y0 + crop, x0 : x0 + crop])


# ------------------------------------------------------------------------------------------------ sources


def iter_image_files(root: str) -> Iterator[str]:
    """Image files under root (recursively, following links), as paths relative to root; not sorted."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                yield name if rel == "." else os.path.join(rel, name)


def is_volume_path(path: str) -> bool:
    """True for what `open_volume` reads as one volume; False for a plain folder of 2D images."""
    if "://" in path or os.path.isfile(path) or ":/" in path:
        return True
    markers = ("zarr.json", ".zarray", ".zattrs", ".zgroup", "attributes.json", "info")
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in markers)


class FolderSource:
    """2D images under a folder; index -> file through a seeded per-epoch permutation."""

    def __init__(self, root: str, in_chans: int) -> None:
        if not os.path.isdir(root):
            raise UserError(f"unlabeled folder {root!r} does not exist")
        self.root, self.in_chans = root, in_chans
        names = sorted(n.encode() for n in iter_image_files(root))
        if not names:
            raise UserError(f"unlabeled folder {root!r} holds no PNG/TIFF/JPEG images")
        self.paths = np.array(names)  # fixed-width bytes: ~1 byte per character, no per-object overhead
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def file(self, index: int) -> str:
        return os.path.join(self.root, self.paths[index].decode())

    def permuted(self, g: int, seed: int) -> int:
        """The file index of stream position g: epoch g // n visits the files in its own permutation."""
        n = len(self.paths)
        epoch = g // n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([seed, 1, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[g % n])

    def patch(self, g: int, seed: int, crop: int, rng: np.random.Generator) -> np.ndarray:
        path = self.file(self.permuted(g, seed))
        try:
            img = read_image_file(path)
        except Exception as err:  # noqa: BLE001 - any decoder error is the user's file
            raise UserError(f"cannot read unlabeled image {path!r}: {err}") from None
        return fit_patch(to_chw(img, self.in_chans, path), crop, rng)


class VolumeSource:
    """Random crop x crop patches of a volume in the allowed planes, reading only each patch's box."""

    def __init__(self, url: str, planes: list[str], slices: str | None, scale: Any, in_chans: int, crop: int) -> None:
        from vemscale.io.volume import open_volume

        self.vol = open_volume(url, scale=scale)
        self.url, self.crop = url, crop
        self.channels = self.vol.ndim == 4
        zyx = self.vol.shape[-3:] if self.vol.ndim >= 3 else (1,) + tuple(self.vol.shape)
        c = self.vol.shape[0] if self.channels else 1
        if c != in_chans:
            raise UserError(f"volume {url!r} has {c} channel(s) but in_chans is {in_chans}")
        self.scale = dtype_scale(self.vol.dtype)
        zs = parse_range(slices, zyx[0], "slices")
        self.lo = (zs.start, 0, 0)
        self.hi = (zs.stop, zyx[1], zyx[2])
        self.axes = sorted({PLANE_AXES[p] for p in planes})
        for a in self.axes:
            dims = [self.hi[i] - self.lo[i] for i in range(3) if i != a]
            if min(dims) < crop:
                plane = [k for k, v in PLANE_AXES.items() if v == a][0]
                raise UserError(
                    f"volume {url!r}: its {plane} planes are {dims[0]}x{dims[1]}, smaller than the crop {crop}; "
                    "lower train.crop or leave that plane out (planes: [xy] for anisotropic stacks)"
                )

    def patch(self, g: int, seed: int, crop: int, rng: np.random.Generator) -> np.ndarray:
        a = self.axes[int(rng.integers(len(self.axes)))]
        box: list[slice] = []
        for i in range(3):
            lo, hi = self.lo[i], self.hi[i]
            if i == a:
                k = int(rng.integers(lo, hi))
                box.append(slice(k, k + 1))
            else:
                s = int(rng.integers(lo, hi - crop + 1))
                box.append(slice(s, s + crop))
        raw = self.vol.read(((slice(None),) if self.channels else ()) + tuple(box))
        raw = raw if self.channels else raw[None]
        x = np.squeeze(raw, axis=1 + a).astype(np.float32) / self.scale  # (C, crop, crop)
        return np.ascontiguousarray(x)


def _corpus(src: SourceConfig) -> SourceConfig:
    """A `vemscale curate` corpus is read as the folder of its kept patches."""
    from vemscale.curate.run import corpus_patches

    patches = corpus_patches(src.path) if src.kind in ("auto", "folder") else None
    return src.model_copy(update={"path": patches, "kind": "folder"}) if patches else src


def open_source(src: SourceConfig, in_chans: int, crop: int) -> FolderSource | VolumeSource:
    src = _corpus(src)
    kind = src.kind
    if kind == "auto":
        kind = "volume" if is_volume_path(src.path) else "folder"
    if kind == "folder":
        return FolderSource(src.path, in_chans)
    return VolumeSource(src.path, src.planes, src.slices, src.scale, in_chans, crop)


def check_source(src: SourceConfig, in_chans: int, crop: int) -> dict[str, Any]:
    """Driver-side check that a source opens and yields a patch, without listing a whole folder.

    Returns {"kind", "what", "dtype"}; a UserError says what is wrong with the source.
    """
    src = _corpus(src)
    kind = src.kind if src.kind != "auto" else ("volume" if is_volume_path(src.path) else "folder")
    if kind == "volume":
        vs = open_source(src.model_copy(update={"kind": "volume"}), in_chans, crop)
        vs.patch(0, 0, crop, np.random.default_rng(0))
        return {"kind": kind, "what": f"volume {src.path} {vs.vol.shape} {vs.vol.dtype}", "dtype": str(vs.vol.dtype)}
    if not os.path.isdir(src.path):
        raise UserError(f"unlabeled source {src.path!r} does not exist")
    first = next(iter_image_files(src.path), None)
    if first is None:
        raise UserError(f"unlabeled folder {src.path!r} holds no PNG/TIFF/JPEG images (nor zarr/n5 metadata)")
    path = os.path.join(src.path, first)
    try:
        img = read_image_file(path)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot read unlabeled image {path!r}: {err}") from None
    to_chw(img, in_chans, path)
    return {"kind": kind, "what": f"folder {src.path} (e.g. {first}: {img.shape} {img.dtype})", "dtype": str(img.dtype)}


# ------------------------------------------------------------------------------------------------- stream


class PatchStream:
    """Batches of float32 (B/world, C, crop, crop) patches in [0, 1] for one rank of a data-parallel run.

    Global batch `it` assigns each of its B slots a source (seeded by (seed, it), weights as configured);
    slot j of source s takes that source's next stream position; rank r keeps slots r, r+world, ...
    `counters` (positions consumed per source) is all the state needed to resume.
    """

    def __init__(self, sources: list[SourceConfig], in_chans: int, crop: int, seed: int, rank: int, world: int,
                 counters: list[int] | None = None) -> None:
        self.sources = [open_source(s, in_chans, crop) for s in sources]
        w = np.array([s.weight for s in sources], np.float64)
        self.p = w / w.sum()
        self.in_chans, self.crop, self.seed, self.rank, self.world = in_chans, crop, seed, rank, world
        self.counters = list(counters) if counters and len(counters) == len(sources) else [0] * len(sources)

    def batch(self, it: int, global_batch: int) -> np.ndarray:
        """This rank's share of global batch `it`; advances the counters past the whole global batch."""
        assign = np.random.default_rng([self.seed, 7, it]).choice(len(self.sources), size=global_batch, p=self.p)
        local = global_batch // self.world
        out = np.empty((local, self.in_chans, self.crop, self.crop), np.float32)
        seen = [0] * len(self.sources)
        i = 0
        for j, s in enumerate(assign):
            g = self.counters[s] + seen[s]
            seen[s] += 1
            if j % self.world != self.rank:
                continue
            rng = np.random.default_rng([self.seed, 3, int(s), g])
            out[i] = self.sources[s].patch(g, self.seed, self.crop, rng)
            i += 1
        self.counters = [c + n for c, n in zip(self.counters, seen)]
        return out

    def epochs(self) -> float | None:
        """Passes made over the folder sources (their mean), or None when there are none."""
        e = [c / len(s) for c, s in zip(self.counters, self.sources) if isinstance(s, FolderSource)]
        return float(np.mean(e)) if e else None


class Prefetcher:
    """Reads the next batches in a background thread (decoding releases the GIL) while the model trains.

    Yields (iteration, batch, counters after that batch) so a checkpoint records exactly what was consumed.
    """

    def __init__(self, stream: PatchStream, start: int, stop: int, global_batch: int, depth: int = 2) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(stream, start, stop, global_batch), daemon=True)
        self.thread.start()

    def _run(self, stream: PatchStream, start: int, stop: int, global_batch: int) -> None:
        try:
            for it in range(start, stop):
                item = (it, stream.batch(it, global_batch), list(stream.counters), stream.epochs())
                while not self.stop.is_set():
                    try:
                        self.q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as err:  # surfaced in the training thread
            self.q.put(err)

    def get(self) -> tuple[int, np.ndarray, list[int], float | None]:
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
