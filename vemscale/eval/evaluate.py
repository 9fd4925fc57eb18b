"""Stage `evaluate`: score a prediction against ground truth blockwise (IoU, F1, precision, recall, MFD).

The evaluated region (the whole volume, or the slices in `z_range`) is cut into blocks of `block_shape`
(a `BlockGrid` over the region). Each block reads the prediction and truth of its box (plus a halo for
surface distances) straight from storage and returns a small vector of sums: the K x K confusion matrix
and, per foreground class, the surface-distance sums of `metrics.distance_sums`. The block runner runs
them (in this process for small plans, else on Ray) and the driver adds the vectors in block order, so it
holds O(classes^2) numbers and a worker O(block + halo) voxels. With `run_dir`, each block's vector is kept
in a ledger there: an interrupted evaluation resumes and recomputes only the missing blocks.

Surface distances are capped at `mfd_halo_nm` in every decomposition, and each block reads a halo of at
least that many nanometres on every side. Any surface voxel within the cap of a core voxel therefore lies
inside the block's read, so the blockwise MFD equals the whole-volume MFD computed with the same cap,
whatever the block size (up to float summation order). The cap bounds what one far-off false object can
cost: it counts `mfd_halo_nm` per surface voxel, not its true distance. `mfd_halo_nm=None` means
uncapped, exact distances; then the whole region is evaluated as a single block and must fit in memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vemscale.blocks.grid import BlockGrid
from vemscale.blocks.ledger import LEDGER_DIR, volume_identity
from vemscale.errors import UserError
from vemscale.eval import metrics
from vemscale.io.volume import Volume, open_volume, parse_voxel_size

__all__ = ["evaluate", "add_arguments", "run_cli", "format_table", "parse_z_range", "DEFAULT_BLOCK_SHAPE"]

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SHAPE = (32, 512, 512)
DEFAULT_MFD_HALO_NM = 500.0
MAX_INFERRED_CLASSES = 256


def parse_z_range(z_range: Any, nz: int) -> tuple[int, int] | None:
    """`slice(16, 20)`, `(16, 20)` or `'16:20'` -> (16, 20) within 0..nz; None -> None (all slices)."""
    if z_range is None:
        return None
    if isinstance(z_range, str):
        parts = z_range.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            z_range = slice(int(parts[0]) if parts[0].strip() else None, int(parts[1]) if parts[1].strip() else None)
        except ValueError:
            raise UserError(f"slices {z_range!r} must be START:STOP (e.g. 16:20)") from None
    elif isinstance(z_range, (tuple, list)) and len(z_range) == 2:
        z_range = slice(*z_range)
    if not isinstance(z_range, slice) or z_range.step not in (None, 1):
        raise UserError(f"z range {z_range!r} must be a slice START:STOP")
    start, stop, _ = z_range.indices(nz)
    if stop <= start:
        raise UserError(f"z range {z_range.start}:{z_range.stop} selects no slices of a volume with {nz} slices")
    return start, stop


LOCAL_MAX_BLOCKS = 16  # plans up to this size run in this process; larger ones on Ray (started if needed)


def _executor(num_blocks: int) -> str:
    """Ray tasks when a Ray runtime is up in this process or the plan is large, else in-process."""
    import ray

    if ray.is_initialized():
        return "tasks"
    if num_blocks <= LOCAL_MAX_BLOCKS:
        return "local"
    from vemscale.raycluster import ensure_ray

    ensure_ray()
    return "tasks"


def _spatial(vol: Volume) -> tuple[int, int, int]:
    return tuple(vol.shape[-3:])  # type: ignore[return-value]


@dataclass
class _Labels:
    """How to turn a read block of a volume into class ids: as is, argmax over channels, or a threshold."""

    volume: Volume
    threshold: float | None = None
    argmax: bool = False

    def read(self, box: tuple[slice, ...]) -> np.ndarray:
        lead = (slice(None),) if self.volume.ndim == 4 else ()
        data = self.volume.read(lead + box)
        if self.volume.ndim == 4:
            data = np.argmax(data, axis=0) if self.argmax else data[0]
        if self.threshold is not None:
            t = self.threshold
            if np.issubdtype(data.dtype, np.integer):
                t = t * np.iinfo(data.dtype).max
            return (data >= t).astype(np.uint8)
        if data.dtype == np.bool_:
            return data.astype(np.uint8)
        return data


@dataclass
class _BlockJob:
    """Computes the sums vector of one block; picklable, so it runs in this process or on Ray workers."""

    pred: _Labels
    truth: _Labels
    grid: BlockGrid  # blocks over the evaluated region (the grid's ROI)
    num_classes: int
    sampling: tuple[float, float, float] | None  # z,y,x nm; None: no MFD
    cap_nm: float | None
    halo: tuple[int, int, int]
    per_slice: bool

    @property
    def size(self) -> int:
        k = self.num_classes
        return k * k + 4 * (k - 1) + 2

    def compute(self, index: int) -> np.ndarray:
        k = self.num_classes
        out = np.zeros(self.size, dtype=np.float64)
        core = self.grid.box(index)
        read_box = self.grid.context(index, self.halo, within_roi=True) if self.sampling is not None else core
        pred, truth = self.pred.read(read_box), self.truth.read(read_box)
        inner = tuple(slice(c.start - o.start, c.stop - o.start) for c, o in zip(core, read_box))
        bad_t = _out_of_range(truth[inner], k)
        bad_p = _out_of_range(pred[inner], k)
        out[-2:] = bad_t, bad_p
        if bad_t or bad_p:
            return out
        out[: k * k] = metrics.confusion_matrix(pred[inner], truth[inner], k).ravel()
        if self.sampling is not None:
            for c in range(1, k):
                sums = metrics.distance_sums(pred == c, truth == c, self.sampling, self.per_slice, self.cap_nm, inner)
                out[k * k + 4 * (c - 1): k * k + 4 * c] = sums
        return out


def _sum_blocks(batch: dict[str, Any], job: _BlockJob) -> dict[str, Any]:
    """The evaluate stage: each block's sums vector, as its payload."""
    ids = np.asarray(batch["id"], np.int64)
    return {"id": ids, "payload": [job.compute(int(i)).tobytes() for i in ids]}


def _max_block(batch: dict[str, Any], labels: _Labels, grid: BlockGrid) -> dict[str, Any]:
    ids = np.asarray(batch["id"], np.int64)
    return {"id": ids, "max": np.asarray([int(labels.read(grid.box(int(i))).max(initial=0)) for i in ids], np.int64)}


def _out_of_range(labels: np.ndarray, k: int) -> int:
    if labels.size == 0:
        return 0
    if labels.dtype.kind == "f":
        bad = (labels < 0) | (labels >= k) | (labels != np.floor(labels))
        return int(np.count_nonzero(bad))
    if labels.max() < k and (labels.dtype.kind == "u" or labels.min() >= 0):
        return 0
    return int(np.count_nonzero((labels < 0) | (labels >= k)))


def _max_label(labels: _Labels, grid: BlockGrid) -> int:
    """The largest value in `labels` over the grid's region (blockwise)."""
    from vemscale.blocks.runner import Stage, run_blocks

    top = [0]
    run_blocks("max label", grid.num_blocks, None, [Stage("max", _max_block, {"labels": labels, "grid": grid})],
               batch_ids=max(1, -(-grid.num_blocks // 8)), executor=_executor(grid.num_blocks), progress=False,
               on_batch=lambda b: top.__setitem__(0, max(top[0], int(np.max(b["max"])))))
    return top[0]


def _class_names(class_names: Sequence[str] | str | None, num_classes: int | None) -> tuple[list[str] | None, int | None]:
    if isinstance(class_names, str):
        class_names = [c.strip() for c in class_names.split(",") if c.strip()]
    if class_names is not None:
        class_names = list(class_names)
        if len(class_names) < 2:
            raise UserError(f"give at least two class names (background first), got {class_names}")
        if len(set(class_names)) != len(class_names):
            raise UserError(f"class names must be unique, got {class_names}")
        if num_classes is not None and num_classes != len(class_names):
            raise UserError(f"{len(class_names)} class names {class_names} but num_classes={num_classes}")
        return class_names, len(class_names)
    if num_classes is not None and num_classes < 2:
        raise UserError(f"num_classes must be at least 2 (background and one class), got {num_classes}")
    return None, num_classes


def _clean(value: float) -> float | None:
    """NaN/inf -> None, so results are plain JSON."""
    return None if value is None or not math.isfinite(value) else float(value)


def evaluate(
    pred: str | Volume,
    truth: str | Volume,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | str | None = None,
    z_range: slice | tuple[int, int] | str | None = None,
    voxel_size_xyz: str | Sequence[float] | None = None,
    block_shape: Sequence[int] = DEFAULT_BLOCK_SHAPE,
    mfd: bool = True,
    mfd_halo_nm: float | None = DEFAULT_MFD_HALO_NM,
    mfd_per_slice: bool = False,
    threshold: float | None = None,
    run_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score `pred` against `truth` (URLs or Volumes, z,y,x class ids) over the region, blockwise.

    - `num_classes`/`class_names`: classes 0..K-1 (0 = background). Inferred from the largest label in
      either volume when neither is given (at most 256 classes).
    - `pred` may be a single-channel probability map with `threshold` in [0, 1] (integer maps are scaled
      by their dtype's maximum, e.g. 255 for uint8), or a c,z,y,x map of per-class scores (argmax).
    - `voxel_size_xyz` (x,y,z nm) overrides the truth's (then the prediction's) metadata; it is needed
      for MFD (`mfd=False` skips MFD).
    - MFD: 3-D surfaces and distances with anisotropic sampling by default, per z-slice with
      `mfd_per_slice`; capped at `mfd_halo_nm` (module doc).
    - `run_dir`: keep a ledger of finished blocks there, so an interrupted evaluation resumes.
    Returns per-class scores, means over foreground classes, and what was evaluated; undefined values
    (e.g. MFD of a class that only one side has) are None.
    """
    t0 = time.monotonic()
    pv, tv = open_volume(pred), open_volume(truth)
    if tuple(_spatial(pv)) != tuple(_spatial(tv)):
        raise UserError(f"prediction {pv.url!r} has shape {pv.shape} but truth {tv.url!r} has shape {tv.shape}; "
                        "their z,y,x shapes must match")
    if tv.ndim == 4 and tv.shape[0] != 1:
        raise UserError(f"truth {tv.url!r} has {tv.shape[0]} channels; it must be one label volume (z,y,x)")
    multi = pv.ndim == 4 and pv.shape[0] > 1
    if threshold is not None:
        if multi:
            raise UserError(f"--threshold needs a single-channel probability map; {pv.url!r} has {pv.shape[0]} channels")
        if not 0.0 <= float(threshold) <= 1.0:
            raise UserError(f"threshold {threshold} must be between 0 and 1")
    pred_labels = _Labels(pv, None if threshold is None else float(threshold), argmax=multi)
    truth_labels = _Labels(tv)
    shape = _spatial(tv)
    zr = parse_z_range(z_range, shape[0])
    region = ((zr or (0, shape[0])), (0, shape[1]), (0, shape[2]))
    region_shape = tuple(hi - lo for lo, hi in region)
    names, k = _class_names(class_names, num_classes)
    if multi and k is None:
        k = pv.shape[0]
    if len(block_shape) != 3 or min(int(b) for b in block_shape) < 1:
        raise UserError(f"block shape {tuple(block_shape)} must be three positive integers z,y,x")
    blocks = tuple(min(int(b), s) for b, s in zip(block_shape, region_shape))
    if mfd and mfd_halo_nm is None:
        blocks = region_shape  # exact, uncapped distances: one block
    grid = BlockGrid.create(shape, None, blocks, region)
    if k is None:
        k = max(_max_label(truth_labels, grid), 1) + 1
        if threshold is None and not multi:
            k = max(k, _max_label(pred_labels, grid) + 1)
        if k > MAX_INFERRED_CLASSES:
            raise UserError(f"labels go up to {k - 1}; that looks like instance ids, not classes. Pass num_classes "
                            "(--classes) if they really are classes")
    if names is None:
        names = ["background", "foreground"] if k == 2 else ["background"] + [f"class{i}" for i in range(1, k)]
    voxel = parse_voxel_size(voxel_size_xyz) or tv.voxel_size_xyz or pv.voxel_size_xyz
    sampling, halo, cap = None, (0, 0, 0), None
    if mfd:
        if voxel is None:
            raise UserError("no voxel size in the truth or prediction metadata; pass --voxel-size X,Y,Z in nm "
                            "(e.g. 4.6,4.6,50) for the mean false distance, or --no-mfd")
        sampling = metrics.sampling_zyx(voxel)
        if mfd_halo_nm is not None:
            if mfd_halo_nm <= 0:
                raise UserError(f"mfd_halo_nm must be positive, got {mfd_halo_nm}")
            cap = float(mfd_halo_nm)
            halo = tuple(max(1, math.ceil(cap / s)) for s in sampling)  # type: ignore[assignment]
            if mfd_per_slice:
                halo = (0, halo[1], halo[2])

    job = _BlockJob(pred_labels, truth_labels, grid, k, sampling, cap, halo, mfd_per_slice)
    log.info("evaluating %s vs %s: region %s in %d blocks of %s", pv.url, tv.url, region_shape, grid.num_blocks, blocks)
    describe = {"version": 1, "pred": volume_identity(pv), "truth": volume_identity(tv), "grid": grid.to_dict(), "k": k,
                "sampling": sampling, "cap": cap, "halo": halo, "per_slice": mfd_per_slice, "threshold": threshold,
                "argmax": multi}
    sums, run = _run(job, describe, run_dir)
    bad_t, bad_p = int(sums[-2]), int(sums[-1])
    if bad_t:
        raise UserError(f"truth {tv.url!r} has {bad_t} voxels with values outside 0..{k - 1} (num_classes={k}); "
                        "pass the right class names/num_classes, or a semantic label volume")
    if bad_p:
        raise UserError(f"prediction {pv.url!r} has {bad_p} voxels with values outside 0..{k - 1} (num_classes={k}); "
                        "pass the right class names/num_classes, or --threshold for a probability map")
    cm = sums[: k * k].round().astype(np.int64).reshape(k, k)
    counts = metrics.counts_from_confusion(cm)
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(names):
        tp, fp, fn = (int(counts[key][c]) for key in ("tp", "fp", "fn"))
        scores = metrics.class_scores(tp, fp, fn)
        mfd_nm = None
        if mfd and c > 0:
            mfd_nm = _clean(metrics.mfd_from_sums(sums[k * k + 4 * (c - 1): k * k + 4 * c]))
        per_class[name] = {**scores, "mfd_nm": mfd_nm, "voxels_truth": tp + fn, "voxels_pred": tp + fp,
                           "tp": tp, "fp": fp, "fn": fn}
    fg = [per_class[n] for n in names[1:]]
    mfds = [c["mfd_nm"] for c in fg if c["mfd_nm"] is not None]
    result = {
        "per_class": per_class,
        "mean_iou": float(np.mean([c["iou"] for c in fg])),
        "mean_f1": float(np.mean([c["f1"] for c in fg])),
        "mfd_nm": float(np.mean(mfds)) if mfds else None,
        "pred": pv.url,
        "truth": tv.url,
        "z_range": list(zr) if zr is not None else None,
        "shape": list(region_shape),
        "num_classes": k,
        "voxel_size_xyz": list(voxel) if voxel is not None else None,
        "block_shape": list(blocks),
        "blocks": grid.num_blocks,
        "computed": run["computed"],
        "skipped": run["skipped"],
        "mfd_halo_nm": cap,
        "mfd_mode": None if not mfd else ("per_slice" if mfd_per_slice else "3d"),
        "threshold": threshold,
        "seconds": round(time.monotonic() - t0, 3),
    }
    return result


def _run(job: _BlockJob, describe: dict[str, Any], run_dir: str | Path | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Sum the blocks' vectors: through a ledger in `run_dir` (an interrupted evaluation resumes) or in memory."""
    from vemscale.blocks.ledger import Ledger
    from vemscale.blocks.runner import Stage, run_blocks

    n = job.grid.num_blocks
    ledger = None
    if run_dir is not None:
        url = str(Path(run_dir).resolve() / LEDGER_DIR / "evaluate") + "/"
        ledger = Ledger.open("file://" + url, describe)
    parts: dict[int, np.ndarray] = {}  # first block id of a batch -> its sums (added in block order at the end)

    def fold(batch: dict[str, Any]) -> None:
        part = np.zeros(job.size, np.float64)
        for i in np.argsort(batch["id"], kind="stable"):
            part += np.frombuffer(bytes(batch["payload"][i]), np.float64)
        parts[int(np.min(batch["id"]))] = part

    run = run_blocks("evaluate", n, ledger, [Stage("evaluate", _sum_blocks, {"job": job})],
               batch_ids=max(1, min(64, -(-n // 8))), executor=_executor(n), progress=False,
               on_batch=None if ledger is not None else fold, keep_payload=ledger is None)
    total = np.zeros(job.size, np.float64)
    if ledger is not None:
        for _, p in ledger.payloads(n):
            total += np.frombuffer(p, np.float64)
    for first in sorted(parts):
        total += parts[first]
    return total, run


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """The result as a plain-text table: one row per class, then the foreground means."""
    header = f"{'class':<16}{'IoU':>8}{'F1':>8}{'precision':>11}{'recall':>8}{'MFD nm':>10}{'voxels truth':>14}{'voxels pred':>13}"
    lines = [header, "-" * len(header)]
    for name, c in result["per_class"].items():
        lines.append(f"{name[:15]:<16}{_fmt(c['iou']):>8}{_fmt(c['f1']):>8}{_fmt(c['precision']):>11}"
                     f"{_fmt(c['recall']):>8}{_fmt(c['mfd_nm'], 2):>10}{c['voxels_truth']:>14}{c['voxels_pred']:>13}")
    lines.append("-" * len(header))
    lines.append(f"{'mean (fg)':<16}{_fmt(result['mean_iou']):>8}{_fmt(result['mean_f1']):>8}{'':>11}{'':>8}"
                 f"{_fmt(result['mfd_nm'], 2):>10}")
    where = f"slices {result['z_range'][0]}:{result['z_range'][1]}" if result["z_range"] else "all slices"
    vs = result["voxel_size_xyz"]
    lines.append(f"{result['pred']} vs {result['truth']} ({where}, shape {tuple(result['shape'])}, "
                 f"voxel size {','.join(f'{v:g}' for v in vs) + ' nm' if vs else 'unknown'}, {result['blocks']} blocks)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`vemscale evaluate --pred P --truth T [--slices 16:20] [--classes a,b] [--voxel-size X,Y,Z] ...`."""
    parser.add_argument("--pred", required=True, help="prediction volume URL (class ids, or probabilities with --threshold)")
    parser.add_argument("--truth", required=True, help="ground-truth volume URL (class ids 0..K-1, 0 = background)")
    parser.add_argument("--slices", default=None, metavar="START:STOP", help="evaluate only these z-slices (e.g. 16:20)")
    parser.add_argument("--classes", default=None, metavar="NAMES",
                        help="class names in id order, background first (e.g. background,mito); default: inferred")
    parser.add_argument("--num-classes", type=int, default=None, help="number of classes when names are not given")
    parser.add_argument("--voxel-size", default=None, metavar="X,Y,Z", help="voxel size in nm, x,y,z (default: metadata)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="binarise a single-channel probability map at this value in [0,1] (uint8 maps: x255)")
    parser.add_argument("--block-shape", default=",".join(map(str, DEFAULT_BLOCK_SHAPE)), metavar="Z,Y,X",
                        help="block shape z,y,x (default %(default)s)")
    parser.add_argument("--mfd-halo-nm", default=str(DEFAULT_MFD_HALO_NM),
                        help="cap on surface distances and halo each block reads, nm (default %(default)s); "
                             "'none' = exact, whole region as one block")
    parser.add_argument("--mfd-per-slice", action="store_true", help="surface distances within each z-slice (2-D); suits strongly anisotropic data")
    parser.add_argument("--no-mfd", action="store_true", help="skip the mean false distance")
    parser.add_argument("--instances", action="store_true",
                        help="object metrics instead: both volumes hold object ids (F1 at IoU 0.5/0.75, AP 0.5:0.95, "
                             "PQ, splits and merges; see vemscale.eval.instances)")
    parser.add_argument("overrides", nargs="*", metavar="run_dir=DIR",
                        help="also write evaluation.json into DIR and keep a ledger there (a rerun resumes)")


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    from vemscale.io.ingest import parse_ints

    from vemscale.config import parse_overrides

    extra = parse_overrides(args.overrides)
    if set(extra) - {"run_dir"}:
        raise UserError(f"unknown argument(s) {sorted(set(extra) - {'run_dir'})}; evaluate takes run_dir=DIR")
    text = str(args.mfd_halo_nm).strip().lower()
    try:
        halo = None if text in ("none", "null", "") else float(text)
    except ValueError:
        raise UserError(f"--mfd-halo-nm {args.mfd_halo_nm!r} must be a number of nanometres or 'none'") from None
    if args.instances:
        from vemscale.eval.instances import evaluate_instances, format_instances

        result = evaluate_instances(args.pred, args.truth, z_range=args.slices,
                                    block_shape=parse_ints(args.block_shape, 3, "block shape"), run_dir=extra.get("run_dir"))
        print(format_instances(result))
        return _save(result, extra)
    result = evaluate(args.pred, args.truth, num_classes=args.num_classes, class_names=args.classes,
                      z_range=args.slices, voxel_size_xyz=args.voxel_size,
                      block_shape=parse_ints(args.block_shape, 3, "block shape"), mfd=not args.no_mfd,
                      mfd_halo_nm=halo, mfd_per_slice=args.mfd_per_slice, threshold=args.threshold,
                      run_dir=extra.get("run_dir"))
    print(format_table(result))
    return _save(result, extra)


def _save(result: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    if "run_dir" in extra:
        out = Path(str(extra["run_dir"]))
        out.mkdir(parents=True, exist_ok=True)
        from vemscale.io.atomic import write_text

        write_text(out / "evaluation.json", json.dumps(result, indent=2, default=str))
        result = {**result, "report": str(out / "evaluation.json")}
    return result
