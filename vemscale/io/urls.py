"""Volume URLs: split a user's string into a format hint, a storage location and an in-file dataset.

Accepted forms (see ACCEPTED_FORMATS): local paths and file:// URLs, s3:// gs:// http(s):// URLs, and the
Neuroglancer-style driver prefixes precomputed:// zarr:// zarr2:// zarr3:// n5://. Credentials for remote
stores come from the environment (tensorstore reads them); nothing here prints or stores them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from vemscale.errors import UserError

__all__ = ["ACCEPTED_FORMATS", "ParsedUrl", "parse_url", "kvstore_url", "join_url"]

ACCEPTED_FORMATS = (
    "zarr v2/v3 arrays, OME-Zarr groups, n5, Neuroglancer precomputed "
    "(local path, file://, s3://, gs://, http(s)://, optionally prefixed zarr:// zarr2:// zarr3:// n5:// precomputed://), "
    "TIFF stacks (.tif/.tiff), HDF5 datasets (file.h5:/dataset or file.h5#dataset), MRC (.mrc/.rec/.map/.st), "
    "single PNG/JPEG images, and folders of PNG/TIFF slices"
)

DRIVER_PREFIXES = {
    "precomputed": "neuroglancer_precomputed",
    "zarr": "zarr",
    "zarr2": "zarr",
    "zarr3": "zarr3",
    "n5": "n5",
}
REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https")
H5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
TIFF_SUFFIXES = (".tif", ".tiff")
MRC_SUFFIXES = (".mrc", ".mrcs", ".rec", ".map", ".st", ".ali")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

_H5_RE = re.compile(r"^(?P<file>.*?\.(?:h5|hdf5|hdf|he5))(?:(?:#|:)(?P<dataset>.*))?$", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedUrl:
    """A URL taken apart. `location` is a local path (remote=False) or a kvstore URL without driver prefix."""

    original: str
    location: str
    remote: bool
    driver: str | None = None  # tensorstore driver named by a prefix, if any
    dataset: str | None = None  # HDF5 dataset inside the file

    @property
    def suffix(self) -> str:
        return Path(self.location.rstrip("/")).suffix.lower()


def parse_url(url: str | os.PathLike[str]) -> ParsedUrl:
    """Split `url` into driver prefix, local path or remote kvstore URL, and HDF5 dataset."""
    original = os.fspath(url)
    text = original.strip()
    if not text:
        raise UserError(f"empty volume URL; accepted: {ACCEPTED_FORMATS}")
    driver = None
    m = re.match(r"^([a-z0-9]+)://(.*)$", text, re.IGNORECASE)
    if m and m.group(1).lower() in DRIVER_PREFIXES:
        driver = DRIVER_PREFIXES[m.group(1).lower()]
        text = m.group(2)
        if not re.match(r"^[a-z0-9]+://", text, re.IGNORECASE):
            text = text if text.startswith("/") else os.path.abspath(text)
    scheme_match = re.match(r"^([a-z0-9+]+)://(.*)$", text, re.IGNORECASE)
    if scheme_match:
        scheme = scheme_match.group(1).lower()
        if scheme == "file":
            text = scheme_match.group(2)
        elif scheme in REMOTE_SCHEMES:
            return ParsedUrl(original, text.rstrip("/"), True, driver)
        else:
            raise UserError(f"unsupported URL scheme {scheme!r} in {original!r}; accepted: {ACCEPTED_FORMATS}")
    path = os.path.abspath(os.path.expanduser(text))
    dataset = None
    h5 = _H5_RE.match(text)
    if h5 and driver is None:
        path = os.path.abspath(os.path.expanduser(h5.group("file")))
        dataset = h5.group("dataset") or None
    return ParsedUrl(original, path, False, driver, dataset)


def kvstore_url(parsed: ParsedUrl) -> str:
    """The tensorstore kvstore URL of a location, with a trailing slash (a directory-like prefix)."""
    loc = parsed.location.rstrip("/")
    if parsed.remote:
        return loc + "/"
    return "file://" + loc + "/"


def join_url(base: str, *parts: str) -> str:
    """Join path components onto a kvstore URL or local path with '/'."""
    out = base.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}"
    return out
