"""The curation plan: each source's planes, patch grid, draw probability and task range, checked in the driver.

A plan is small (a dict per source and plane, never a list of patches or tasks): task `t` maps to its source,
plane and slices by arithmetic over the per-source offsets, so a petavoxel source costs the driver nothing more
than a small one. Every check a user can fail happens here, before anything is written.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from vemscale.config import Strict
from vemscale.curate.patches import PLANES, draw_probability, patch_starts, plane_shape, slices_per_task, window
from vemscale.errors import UserError

ANISOTROPY = 0.25  # |x - z| / x above this: xy planes only (CEM500K patchify3d.py)
FILES_PER_TASK = 16  # images per task of a folder source


class CurateSource(Strict):
    """One source of a corpus: a volume (any URL the engine opens) or a folder of 2D images."""

    path: str
    kind: Literal["auto", "folder", "volume"] = "auto"  # auto: zarr/n5/precomputed/files = volume, image dirs = folder
    name: str | None = None  # folder of its patches in the corpus; default from the path
    planes: Literal["auto"] | list[Literal["xy", "xz", "yz"]] = "auto"  # auto: xy, or all three when near-isotropic
    slices: str | None = None  # volumes: z range "z0:z1" to sample (all when omitted)
    scale: int | str | None = None  # volumes: multiscale level (default the finest)
    voxel_size: tuple[float, float, float] | None = None  # x,y,z nm (folders: x,y of their pixels); default metadata
    density: float | None = Field(None, gt=0)  # patches per um^2 of section; default the config's `density`

    @field_validator("planes", mode="before")
    @classmethod
    def _planes(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "auto":
            return list(PLANES) if v == "all" else [p.strip() for p in v.split(",")]
        return v

    @field_validator("voxel_size", mode="before")
    @classmethod
    def _triple(cls, v: Any) -> Any:
        return [p for p in v.replace(" ", "").split(",")] if isinstance(v, str) else v


def sources_from(value: Any) -> Any:
    """`sources=a,b`, a path, or a list of paths/dicts (pydantic 'before')."""
    if isinstance(value, str):
        value = [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


def _name(src: CurateSource, index: int, taken: set[str]) -> str:
    base = src.name or os.path.basename(os.path.normpath(src.path.split("://")[-1])) or f"source{index}"
    for suffix in (".ome.zarr", ".zarr", ".n5", ".tiff", ".tif", ".h5", ".mrc"):
        if src.name is None and base.lower().endswith(suffix):
            base = base[: -len(suffix)]
    if src.name is None and base in ("image", "images", "raw", "0", "data"):  # ../shared/data/<set>/<split>/image.tif
        parts = [p for p in os.path.normpath(src.path.split("://")[-1]).split(os.sep) if p][-3:-1]
        base = "_".join(parts + [base]) if parts else base
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    if any(c in name for c in "/\\") or name.startswith("."):
        raise UserError(f"source name {name!r} must be a plain folder name")
    taken.add(name)
    return name


def _volume_plan(src: CurateSource, index: int, name: str, patch: int, target_nm: float | None,
                 density: float | None, target_patches: int) -> dict[str, Any]:
    from vemscale.io.volume import open_volume
    from vemscale.train.data import dtype_scale, parse_range

    vol = open_volume(src.path, scale=src.scale, voxel_size_xyz=src.voxel_size)
    if vol.ndim == 4 and vol.shape[0] != 1:
        raise UserError(f"source {src.path!r} has {vol.shape[0]} channels; curate takes grey volumes (one channel)")
    if vol.ndim not in (2, 3, 4):
        raise UserError(f"source {src.path!r} has shape {vol.shape}; curate takes z,y,x volumes or 2D images")
    if not (np.issubdtype(vol.dtype, np.integer) or np.issubdtype(vol.dtype, np.floating)):
        raise UserError(f"source {src.path!r} has dtype {vol.dtype}; curate takes integer or float grey values")
    zyx = tuple(int(s) for s in vol.shape[-3:]) if vol.ndim >= 3 else (1, *map(int, vol.shape))
    vs = vol.voxel_size_xyz
    if vs is not None and list(vs) == [1.0, 1.0, 1.0] and src.voxel_size is None:
        vs = None  # a placeholder for 'unknown'
    need = [k for k, v in (("density", density), ("pixel_size_nm", target_nm)) if v is not None]
    if need and vs is None:
        raise UserError(f"source {src.path!r} has no voxel size, needed for {' and '.join(need)}; give the source a "
                        "voxel_size: x,y,z (nm), e.g. sources='[{path: ..., voxel_size: [4.6, 4.6, 50]}]'")
    planes = src.planes
    if planes == "auto":
        iso = vs is not None and abs(vs[0] - vs[2]) / vs[0] <= ANISOTROPY and zyx[0] > 1
        planes = list(PLANES) if iso else ["xy"]
    zs = parse_range(src.slices, zyx[0], "slices")
    out = []
    for plane in planes:
        n, h, w = plane_shape(zyx, plane)
        k0, k1, r0, r1 = (zs.start, zs.stop, 0, h) if plane == "xy" else (0, n, zs.start, zs.stop)
        pixel = None
        if vs is not None:
            nm = {"x": vs[0], "y": vs[1], "z": vs[2]}
            rows, cols = {"xy": ("y", "x"), "xz": ("z", "x"), "yz": ("z", "y")}[plane]
            pixel = [float(nm[rows]), float(nm[cols])]
        win = window(patch, pixel, target_nm)
        if src.planes == "auto" and plane != "xy" and (r1 - r0 < win[0] or w < win[1]):
            continue  # auto planes: a thin near-isotropic stack is cut in xy only
        if r1 - r0 < win[0] or w < win[1]:
            raise UserError(f"source {src.path!r}: its {plane} planes are {r1 - r0}x{w} pixels, smaller than a patch "
                            f"({win[0]}x{win[1]} source pixels for {patch} px"
                            f"{f' at {target_nm} nm' if target_nm else ''}); lower `patch`, or leave the "
                            f"{plane} plane out (planes: [xy] for anisotropic stacks)")
        grid = len(patch_starts(r1 - r0, win[0])) * len(patch_starts(w, win[1]))
        spt = slices_per_task(grid, target_patches)
        out.append({"plane": plane, "k": [k0, k1], "rows": [r0, r1], "cols": [0, w], "window": list(win),
                    "pixel_nm": pixel, "p": draw_probability(density, win, pixel), "spt": spt,
                    "tasks": -(-(k1 - k0) // spt), "grid": grid})
    return {"index": index, "name": name, "kind": "volume", "url": vol.url, "scale": src.scale,
            "voxel_size": list(vs) if vs is not None else None, "dtype_scale": dtype_scale(vol.dtype),
            "ndim": vol.ndim, "planes": out, "tasks": sum(p["tasks"] for p in out)}


def _folder_plan(src: CurateSource, index: int, name: str, patch: int, target_nm: float | None,
                 density: float | None) -> dict[str, Any]:
    from vemscale.train.unlabeled import iter_image_files, read_image_file

    if not os.path.isdir(src.path):
        raise UserError(f"source {src.path!r} does not exist (a folder of 2D images, or a volume URL)")
    names = sorted(iter_image_files(src.path))
    if not names:
        raise UserError(f"source folder {src.path!r} holds no PNG/TIFF/JPEG images (nor zarr/n5 metadata)")
    first = os.path.join(src.path, names[0])
    try:
        img = read_image_file(first)
    except Exception as err:  # noqa: BLE001 - any decoder error is the user's file
        raise UserError(f"cannot read image {first!r}: {err}") from None
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] in (3, 4))):
        raise UserError(f"{first!r} has shape {img.shape}: not a 2D grey or RGB image; give an image stack as a "
                        "volume source (its path, not its folder)")
    pixel = [float(src.voxel_size[1]), float(src.voxel_size[0])] if src.voxel_size else None
    need = [k for k, v in (("density", density), ("pixel_size_nm", target_nm)) if v is not None]
    if need and pixel is None:
        raise UserError(f"source folder {src.path!r} has no pixel size, needed for {' and '.join(need)}; give it a "
                        "voxel_size: x,y,z (nm; z is ignored)")
    win = window(patch, pixel, target_nm)
    return {"index": index, "name": name, "kind": "folder", "url": os.path.abspath(src.path), "_names": names,
            "files": len(names), "voxel_size": list(src.voxel_size) if src.voxel_size else None,
            "planes": [{"plane": "xy", "window": list(win), "pixel_nm": pixel, "p": draw_probability(density, win, pixel),
                        "tasks": -(-len(names) // FILES_PER_TASK), "spt": FILES_PER_TASK}],
            "tasks": -(-len(names) // FILES_PER_TASK)}


def make_plan(sources: list[CurateSource], patch: int, target_nm: float | None, density: float | None,
              target_patches: int) -> list[dict[str, Any]]:
    """Per-source plans with task offsets (`task0`); UserError for a source that cannot be curated. A folder
    source's plan holds its sorted file names under `_names` (the caller stores them for the tasks)."""
    from vemscale.train.unlabeled import is_volume_path

    if not sources:
        raise UserError("sources is empty: give one or more volumes or image folders, e.g. sources=/data/a.zarr,/data/b")
    plans, taken, t0 = [], set(), 0
    for i, src in enumerate(sources):
        name = _name(src, i, taken)
        d = src.density if src.density is not None else density
        kind = src.kind if src.kind != "auto" else ("volume" if is_volume_path(src.path) else "folder")
        if kind == "volume":
            plan = _volume_plan(src, i, name, patch, target_nm, d, target_patches)
        else:
            plan = _folder_plan(src, i, name, patch, target_nm, d)
        plan["task0"] = t0
        t0 += plan["tasks"]
        plans.append(plan)
    return plans


def locate(plans: list[dict[str, Any]], task: int) -> tuple[dict[str, Any], int, dict[str, Any], int, int]:
    """Task id -> (source plan, plane index, plane plan, first slice, stop slice) (folders: file indices)."""
    for src in plans:
        if src["task0"] <= task < src["task0"] + src["tasks"]:
            t = task - src["task0"]
            for j, pl in enumerate(src["planes"]):
                if t < pl["tasks"]:
                    lo, hi = (pl["k"] if src["kind"] == "volume" else (0, src["files"]))
                    k0 = lo + t * pl["spt"]
                    return src, j, pl, k0, min(hi, k0 + pl["spt"])
                t -= pl["tasks"]
    raise IndexError(f"task {task} is outside the plan")
