"""Self-describing checkpoints: a directory with weights and everything inference needs to use them.

    <dir>/vemscale.json   model spec, classes, input normalisation, tile grid, voxel size, training config
    <dir>/model.pt        model state_dict
    <dir>/train_state.pt  optimizer/scheduler/RNG state for resuming (optional)

A checkpoint can also be read from object storage (s3://, gs://, http(s)://): `local_checkpoint` copies
its vemscale.json and model.pt into a per-URL cache directory (VEMSCALE_CHECKPOINT_CACHE, default
~/.cache/vemscale/checkpoints) once per node and revalidates them by storage generation on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vemscale.errors import UserError

META_FILE = "vemscale.json"
WEIGHTS_FILE = "model.pt"
STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1
CACHE_ENV = "VEMSCALE_CHECKPOINT_CACHE"
_REMOTE = re.compile(r"^(s3|gs|gcs|http|https)://", re.IGNORECASE)


class CheckpointMeta(BaseModel):
    """What a checkpoint says about itself."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    kind: str = "segmentation"  # "segmentation" | "pretrain"
    model: dict[str, Any]  # create_model(**model) rebuilds the architecture
    classes: list[str] = Field(default_factory=lambda: ["background", "foreground"])
    normalization: dict[str, Any] = Field(default_factory=lambda: {"scale": 255.0, "mean": [0.5], "std": [0.25]})
    tile: int = 256
    margin: int = 32
    tta: int = 1  # views averaged per tile (vemscale.infer.tta); inference uses it unless told otherwise
    voxel_size_xyz: list[float] | None = None
    planes: str = "xy"
    iteration: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict)
    train_config: dict[str, Any] = Field(default_factory=dict)
    # grey-value histogram of the training images (io.histogram.Histogram.to_dict), for infer match_histogram=checkpoint
    input_histogram: dict[str, Any] | None = None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: CheckpointMeta, train_state: dict | None = None) -> Path:
    """Write a checkpoint directory atomically (written aside, then renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        torch.save(_unwrap(model).state_dict(), tmp / WEIGHTS_FILE)
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta.model_dump(mode="json"), indent=2))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_remote_checkpoint(path: str | Path) -> bool:
    """True for s3:// gs:// http(s):// checkpoint URLs."""
    return bool(_REMOTE.match(os.fspath(path)))


def checkpoint_location(path: str | Path) -> str:
    """How to name a checkpoint to another process or node: a remote URL as given, a local path made absolute."""
    return os.fspath(path) if is_remote_checkpoint(path) else str(Path(path).resolve())


def local_checkpoint(path: str | Path) -> Path:
    """A local directory holding the checkpoint: `path` itself, or a cached copy of a remote one.

    Remote checkpoints (s3://, gs://, http(s)://; credentials and AWS_ENDPOINT_URL from the environment)
    are read with tensorstore. Only vemscale.json and model.pt are fetched (not train_state.pt: resuming
    training needs a local checkpoint). A file is downloaded again only when its storage generation
    changed; each file is written aside and renamed, so concurrent workers on a node never see half a file.
    """
    if not is_remote_checkpoint(path):
        return Path(path)
    import tensorstore as ts

    import vemscale.io  # noqa: F401  (S3-compatible endpoints from the environment)

    url = os.fspath(path).rstrip("/") + "/"
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vemscale" / "checkpoints")
    cache = root / hashlib.sha256(url.encode()).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    try:
        kv = ts.KvStore.open(url).result()
    except ValueError as err:
        raise UserError(f"checkpoint {url!r} cannot be opened: {err}") from None
    for name in (META_FILE, WEIGHTS_FILE):
        target, stamp = cache / name, cache / f".{name}.generation"
        cached = stamp.read_bytes() if target.is_file() and stamp.is_file() else None
        try:
            res = kv.read(name, if_not_equal=cached).result()
        except ValueError as err:
            raise UserError(f"checkpoint {url!r}: cannot read {name}: {err}") from None
        if res.state == "missing":
            raise UserError(f"checkpoint {url!r} is not a vemscale checkpoint: expected {META_FILE} and "
                            f"{WEIGHTS_FILE} under it")
        if res.state == "value":
            from vemscale.io.atomic import write_bytes

            for dest, data in ((target, bytes(res.value)), (stamp, bytes(res.stamp.generation))):
                write_bytes(dest, data)
    return cache


def export_final(ray_checkpoint, final: Path) -> Path:
    """Copy Ray Train's newest checkpoint to `final` (run_dir/checkpoint), replacing it in one rename."""
    with ray_checkpoint.as_directory() as d:
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(d, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return final


def read_meta(path: str | Path) -> CheckpointMeta:
    """The checkpoint's metadata; a clear UserError when the directory is not a vemscale checkpoint."""
    path = local_checkpoint(path)
    meta_file = path / META_FILE
    if not path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} does not exist or is not a directory")
    if not meta_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UserError(
            f"checkpoint {str(path)!r} is not a vemscale checkpoint: expected {META_FILE} and {WEIGHTS_FILE} in it"
        )
    try:
        meta = CheckpointMeta.model_validate(json.loads(meta_file.read_text()))
    except (json.JSONDecodeError, ValidationError) as err:
        raise UserError(f"checkpoint {str(path)!r} has an unreadable {META_FILE}: {err}") from None
    if meta.format_version > FORMAT_VERSION:
        raise UserError(f"checkpoint {str(path)!r} has format {meta.format_version}; this vemscale reads up to {FORMAT_VERSION}")
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, CheckpointMeta]:
    """Rebuild the model from the checkpoint alone and load its weights (eval mode)."""
    from vemscale.models import create_model

    path = local_checkpoint(path)
    meta = read_meta(path)
    model = create_model(**meta.model)
    try:
        state = torch.load(Path(path) / WEIGHTS_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except Exception as err:  # corrupt file or architecture mismatch
        raise UserError(f"checkpoint {str(path)!r}: cannot load weights into {meta.model.get('name')}: {err}") from None
    return model.to(device).eval(), meta


def load_train_state(path: str | Path) -> dict | None:
    """Optimizer/scheduler/RNG state saved for resuming, if the checkpoint has it."""
    f = Path(path) / STATE_FILE
    if not f.is_file():
        return None
    try:  # tensors, numbers and lists only: never unpickle code from a checkpoint
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file is the user's to remove
        raise UserError(f"checkpoint {str(path)!r}: cannot read its resume state {STATE_FILE}: {str(err)[:200]}; "
                        "delete that checkpoint (or the run_dir) to start afresh") from None


def newest_resumable(root: str | Path) -> Path | None:
    """The newest complete training checkpoint (weights, train state, meta all readable) under `root`.

    A run killed while Ray Train was still recording a checkpoint leaves it on disk but not in Ray's own
    state; resuming from the newest *complete* directory on disk loses the least work.
    """
    found = []
    for meta in Path(root).glob("**/checkpoint_*/" + META_FILE):
        try:
            found.append((int(json.loads(meta.read_text())["iteration"]), meta.parent))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    for _, d in sorted(found, key=lambda t: t[0], reverse=True):
        try:
            torch.load(d / WEIGHTS_FILE, map_location="cpu", weights_only=True)
            if load_train_state(d) is not None:
                return d
        except Exception:  # partially copied: fall back to an older one
            continue
    return None
