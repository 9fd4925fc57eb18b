"""Files written whole or not at all: to a temporary name beside the target, then renamed over it.

A kill (or a failed write) between the two leaves the previous file, never half of a new one, so a rerun
never reads a truncated summary, state or config. Object stores write whole objects anyway (tensorstore's
kvstores, the ledger and the tables go through them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["write_bytes", "write_text", "save_figure", "append_line", "read_json_lines"]


def write_bytes(path: str | Path, data: bytes) -> Path:
    """`data` into `path`, replacing it in one rename; the temporary file is removed if writing fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text into `path`, atomically (encoded first: an unencodable text leaves the old file)."""
    return write_bytes(path, text.encode("utf-8"))


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """A matplotlib figure as a PNG (or the format of `path`'s suffix), atomically."""
    import io

    buf = io.BytesIO()
    fmt = Path(path).suffix.lstrip(".") or "png"
    fig.savefig(buf, format=fmt, **kwargs)
    return write_bytes(path, buf.getvalue())


def append_line(path: str | Path, line: str) -> None:
    """One line appended to an append-only log. A line cut by an earlier kill is closed first, so it spoils
    only itself; `read_json_lines` skips it."""
    path = Path(path)
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.rstrip("\n").encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())


def read_json_lines(path: str | Path) -> list[Any]:
    """The JSON records of an append-only log, without the lines a kill cut short."""
    import json

    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
