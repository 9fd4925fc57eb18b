"""`vemscale curate`: a pre-training corpus from any number of volumes and image folders (CEM500K-style).

    vemscale curate configs/curate.yaml sources=/data/a.zarr,/data/b_tiffs output=runs/corpus
    vemscale pretrain configs/pretrain_retina.yaml data=runs/corpus

Patches are cut on each source's planes (the CEM500K grid), drawn by a density per um^2, converted to 8 bit
(and to `pixel_size_nm`), filtered (flat, saturated, low entropy, blurred; optionally a learned classifier),
near-duplicates removed (dHash, Hamming <= 12, greedy, within and across sources) and written as PNG files
with a Parquet manifest and a report. Every check runs before anything is written; every pass keeps a
ledger in `<output>/.vemscale-ledger/`, so a killed run resumes.

Layout of a corpus::

    <output>/corpus.json                 what it is (pretrain's data= reads it), the plan, the counts
    <output>/patches/<source>/<plane>_<slice>/<y>_<x>.png    the kept patches (uint8, patch x patch)
    <output>/manifest/part-*.parquet     one row per drawn patch: source, plane, slice, position, pixel size,
                                         statistics, dhash, kept, reason, path, duplicate_of
    <output>/report/summary.json, kept.png, dropped_<reason>.png
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from vemscale.config import StageConfig, absolute_url, dump_config, load_cli_config
from vemscale.curate.dedupe import MAX_DISTANCE
from vemscale.curate.patches import Filters
from vemscale.curate.plan import CurateSource, sources_from
from vemscale.errors import UserError
from vemscale.io.atomic import write_bytes

__all__ = ["CurateConfig", "run_curate", "add_arguments", "run_cli", "CORPUS_FILE", "corpus_patches"]

log = logging.getLogger(__name__)

CORPUS_FILE = "corpus.json"
_DEFAULT_FILTERS = Filters()


class CurateConfig(StageConfig):
    """`vemscale curate`: sample, filter and de-duplicate 2D patches of many sources into one corpus."""

    run_dir: Path = Path("runs/curate")
    sources: list[CurateSource] = Field(description="volumes (any URL) and folders of 2D images")
    output: str = Field(description="corpus directory/URL: patches/, manifest/, report/, corpus.json")
    patch: int = Field(224, ge=16)  # pixels per side (CEM500K patchify3d.py --crop_size default 224)
    pixel_size_nm: float | None = Field(None, gt=0)  # resample every source to this pixel size; None = native
    density: float | None = Field(None, gt=0)  # patches per um^2 of section (per source overridable); None = every one
    min_std: float = Field(_DEFAULT_FILTERS.min_std, ge=0)  # std of 4x4-pooled grey levels below this: flat (resin)
    max_saturated: float = Field(_DEFAULT_FILTERS.max_saturated, ge=0, le=1)  # fraction of 0/255 pixels above this
    min_entropy: float = Field(_DEFAULT_FILTERS.min_entropy, ge=0, le=8)  # bits; below: almost constant
    min_laplacian_var: float = Field(_DEFAULT_FILTERS.min_laplacian_var, ge=0)  # below: out of focus
    classifier: str | None = None  # CEM500K-style ResNet-34 patch classifier weights (.pth); None = statistics only
    classifier_threshold: float = Field(0.5, ge=0, le=1)  # keep patches scored above (CEM500K classify_patches.py)
    dedupe: Literal["across", "within", "none"] = "across"  # near-duplicates within each source, then across them
    max_distance: int = Field(MAX_DISTANCE, ge=0, le=64)  # Hamming bits of the 64-bit dHash that make a duplicate
    seed: int = Field(0, ge=0)  # the draw and the duplicate groups' exemplars
    patches_per_task: int = Field(256, ge=1)  # patches one Ray task cuts (slices per task follow)
    max_in_flight: int | None = Field(None, ge=1)  # Ray tasks at once; default 2 x the cluster's CPUs
    overwrite: bool = False
    progress: bool = True

    @field_validator("sources", mode="before")
    @classmethod
    def _sources(cls, v: Any) -> Any:
        return sources_from(v)


def corpus_patches(path: str) -> str | None:
    """The patch folder of a curated corpus at `path` (None when `path` is not one): pretrain's data= reads it."""
    if os.path.isfile(os.path.join(path, CORPUS_FILE)):
        return os.path.join(path, "patches")
    return None


def _check_output(output: str) -> None:
    from vemscale.io.urls import parse_url

    parsed = parse_url(output)
    if parsed.driver not in (None, "zarr") or parsed.dataset is not None:
        raise UserError(f"output {output!r} must be a directory or URL (the corpus folder)")
    if not parsed.remote:
        path = parsed.location
        if os.path.isfile(path):
            raise UserError(f"output {output!r} is a file; the output is a directory")
        if os.path.isdir(path) and os.listdir(path) and not {CORPUS_FILE, ".vemscale-ledger"} & set(os.listdir(path)):
            raise UserError(f"output {output!r} is a non-empty directory that is not a vemscale corpus")
        from vemscale.io.writable import check_writable

        check_writable(path)
        return
    import tensorstore as ts

    from vemscale.io.urls import kvstore_url

    kv = ts.KvStore.open(kvstore_url(parsed) + "/").result()  # an object-store prefix: ours, or empty
    if kv.read(CORPUS_FILE).result().state == "value" or kv.read(".vemscale-ledger/sample/ledger.json").result().state == "value":
        return
    if kv.list().result():
        raise UserError(f"output {output!r} is a non-empty prefix that is not a vemscale corpus; choose an empty one")


def _describe(cfg: CurateConfig, plans: list[dict[str, Any]]) -> dict[str, Any]:
    from vemscale.blocks.ledger import volume_identity
    from vemscale.io.volume import open_volume

    ids = []
    for p in plans:
        if p["kind"] == "volume":
            ids.append(volume_identity(open_volume(p["url"], scale=p["scale"])))
        else:
            ids.append({"folder": p["url"], "files": p["files"], "mtime": os.stat(p["url"]).st_mtime_ns})
    clf = None
    if cfg.classifier:
        st = os.stat(cfg.classifier)
        clf = {"path": os.path.abspath(cfg.classifier), "size": st.st_size, "mtime": st.st_mtime_ns}
    keys = ("patch", "pixel_size_nm", "density", "min_std", "max_saturated", "min_entropy", "min_laplacian_var",
            "classifier_threshold", "dedupe", "max_distance", "seed", "patches_per_task")
    return {"step": "sample", "plans": plans, "sources": ids, "classifier": clf, **{k: getattr(cfg, k) for k in keys}}


def run_curate(cfg: CurateConfig) -> dict[str, Any]:
    """Curate `cfg.sources` into the corpus at `cfg.output`; returns counts, paths and timings."""
    import tensorstore as ts

    from vemscale.blocks.ledger import Ledger, ledger_url
    from vemscale.blocks.runner import Stage, run_blocks
    from vemscale.curate import tasks as T
    from vemscale.curate.plan import make_plan
    from vemscale.curate.report import write_report
    from vemscale.io.urls import join_url, kvstore_url, parse_url
    from vemscale.raycluster import ensure_ray

    t_start = time.perf_counter()
    output = absolute_url(cfg.output)
    _check_output(output)
    from vemscale.io.writable import check_writable

    check_writable(cfg.run_dir, "run_dir")
    for s in cfg.sources:
        s.path = absolute_url(s.path)
    out_kv_url = kvstore_url(parse_url(output))
    plans = make_plan(cfg.sources, cfg.patch, cfg.pixel_size_nm, cfg.density, cfg.patches_per_task)
    if cfg.classifier is not None:
        T._classifier(os.path.abspath(cfg.classifier))  # UserError for a file that is not one
    filters = {k: getattr(cfg, k) for k in ("min_std", "max_saturated", "min_entropy", "min_laplacian_var")}
    total = sum(p["tasks"] for p in plans)
    # every check passed: write (folder sources' file lists first, then the passes)
    kv = ts.KvStore.open(out_kv_url + "/").result()
    for p in plans:
        names = p.pop("_names", None)
        if names is not None:
            local = parse_url(join_url(output, T.SCRATCH_DIR, f"files-{p['index']:05d}.npy"))
            if local.remote:
                raise UserError("folder sources need a local (or mounted) output: their file list is read by path")
            os.makedirs(os.path.dirname(local.location), exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, np.array([n.encode() for n in names]))
            write_bytes(local.location, buf.getvalue())
            p["list"] = local.location
    describe = _describe(cfg, plans)
    ledger = Ledger.open(ledger_url(out_kv_url, "sample"), describe, reset=cfg.overwrite)
    if ledger.fresh or ledger.count_done(total) == 0:  # a new corpus: nothing of an older one may stay
        kv.delete_range(ts.KvStore.KeyRange(f"{T.SCRATCH_DIR}/across_map.parquet",
                                            f"{T.SCRATCH_DIR}/across_map.parquet\0")).result()
        for prefix in ("patches/", "manifest/", "report/", f"{T.SCRATCH_DIR}/sample/", f"{T.SCRATCH_DIR}/within/",
                       f"{T.SCRATCH_DIR}/across/", f"{T.SCRATCH_DIR}/survivors/"):
            kv.delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + "0")).result()
        for step in ("within", "across", "finalize"):
            Ledger.invalidate(ledger_url(out_kv_url, step))
    ensure_ray()
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    inflight = cfg.max_in_flight or 2 * cpus
    run = ledger.generation
    timings: dict[str, Any] = {}
    stage = Stage("sample", T.sample_batch, {"plans": plans, "patch": cfg.patch, "filters": filters,
                                             "classifier": os.path.abspath(cfg.classifier) if cfg.classifier else None,
                                             "classifier_threshold": cfg.classifier_threshold, "seed": cfg.seed,
                                             "out_url": out_kv_url, "run": run}, num_cpus=1, concurrency=inflight)
    timings["sample"] = run_blocks("curate sample", total, ledger, [stage], batch_ids=1, progress=cfg.progress)

    after = ledger.generation
    within = Ledger.open(ledger_url(out_kv_url, "within"), {"step": "within", "after": after})
    stage = Stage("within", T.within_batch, {"plans": plans, "max_distance": cfg.max_distance, "seed": cfg.seed,
                                             "out_url": out_kv_url, "dedupe": cfg.dedupe != "none"},
                  num_cpus=1, concurrency=inflight)
    timings["within"] = run_blocks("curate duplicates (within)", len(plans), within, [stage], batch_ids=1,
                                   progress=False)
    dups = {"within": sum(json.loads(p)["duplicates"] for _, p in within.payloads(len(plans)) if p)}
    after = within.generation
    if cfg.dedupe == "across" and len(plans) > 1:
        across = Ledger.open(ledger_url(out_kv_url, "across"), {"step": "across", "after": after})
        stage = Stage("across", T.across_batch, {"sources": len(plans), "max_distance": cfg.max_distance,
                                                 "seed": cfg.seed, "out_url": out_kv_url}, num_cpus=1)
        timings["across"] = run_blocks("curate duplicates (across)", 1, across, [stage], batch_ids=1, progress=False)
        dups["across"] = sum(json.loads(p)["duplicates"] for _, p in across.payloads(1) if p)
        after = across.generation
    fin = Ledger.open(ledger_url(out_kv_url, "finalize"), {"step": "finalize", "after": after})
    stage = Stage("finalize", T.finalize_batch, {"plans": plans, "out_url": out_kv_url, "run": fin.generation},
                  num_cpus=1, concurrency=inflight)
    timings["finalize"] = run_blocks("curate manifest", total, fin, [stage], batch_ids=1, progress=False)
    counts: dict[str, dict[str, int]] = {p["name"]: {} for p in plans}
    for _, p in fin.payloads(total):
        d = json.loads(p)
        for k, v in d["counts"].items():
            counts[d["source"]][k] = counts[d["source"]].get(k, 0) + v
    summary = write_report(kv, plans, counts, cfg.seed)
    seconds = time.perf_counter() - t_start
    corpus = {"kind": "vemscale-corpus", "patch": cfg.patch, "pixel_size_nm": cfg.pixel_size_nm,
              "patches": "patches", "manifest": "manifest", "report": "report", "generation": ledger.generation,
              "sources": [{k: p[k] for k in ("name", "kind", "url", "voxel_size") if k in p} |
                          {"planes": [pl["plane"] for pl in p["planes"]], "p": [pl["p"] for pl in p["planes"]]}
                          for p in plans],
              "counts": summary["total"], "duplicates": dups}
    kv.write(CORPUS_FILE, json.dumps(corpus, indent=2, default=str).encode()).result()
    result = {"output": output, "patches": join_url(output, "patches"), "manifest": join_url(output, "manifest"),
              "report": join_url(output, "report"), "sources": len(plans), "tasks": total, **summary,
              "duplicates": dups, "seconds": round(seconds, 3),
              "patches_per_s": round(summary["drawn"] / seconds, 1) if seconds else 0.0,
              "timings": {k: v.get("seconds") for k, v in timings.items()},
              "passes": {k: {"computed": v["computed"], "skipped": v["skipped"]} for k, v in timings.items()},
              "pretrain": f"vemscale pretrain configs/pretrain_retina.yaml data={output}"}
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "curate_config.yaml")
    log.info("curate: %d of %d drawn patches kept (%s) in %.1f s", summary["kept"], summary["drawn"],
             summary["total"], seconds)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="[CONFIG.yaml] key=value",
                        help="an optional YAML config, then CurateConfig keys such as sources=a.zarr,b/ output=runs/corpus "
                             "density=0.5 pixel_size_nm=8")


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    return run_curate(load_cli_config(CurateConfig, args.items, verbatim=("output",)))
