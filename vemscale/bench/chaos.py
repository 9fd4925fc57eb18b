"""Chaos run: SIGKILL the driver or a random Ray worker of a stage at a random moment, rerun, and check the
outcome against a clean run.

Stages: `infer`, `instances` (with split=watershed), `export` (scale 0, pyramid, properties and meshes of an
instance segmentation), `finetune` and `pretrain`. Each trial starts the stage's command in a session of its
own (its own local Ray), waits for a random moment between the clean run's first and last finished unit of
work (ledger markers; logged iterations) and kills one of:
- the driver, with its whole session (as a crash of the machine running it would); the same command is
  then rerun and resumes through the stage's ledger or checkpoints;
- the stage's main actor (the model actor of infer, a Ray Train worker of the training stages);
- another Ray worker process: a running task of the stage (read, write, label...; the kill waits up to
  TASK_WAIT_S for one), else one of Ray's helpers (Ray Data's actors, the dashboard and runtime-env agents).
After a worker kill the run must finish by itself or, where Ray cannot recover it, exit non-zero so that
the rerun finishes it. The check then: for infer, instances and export every output file (ledger, scratch
and timing summaries excluded) equals the clean run's, byte for byte; for finetune and pretrain the final
checkpoint reaches the configured iteration count, loads, and metrics.csv has each logged iteration once.
Seeded: trial i of seed s always draws the same target and moment; `--only i` replays it.

    python -m vemscale.bench.chaos --stage all --trials 20      # ~1 h on 2 cores
    python -m vemscale.bench.chaos --stage export --trials 3 --only 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vemscale.bench import emit

KINDS = ("driver", "actor", "worker")
SKIP_PARTS = {".vemscale-ledger", ".vemscale-scratch"}  # bookkeeping: may differ after a kill by design
SKIP_FILES = {"summary.json"}  # timings
TASK_WAIT_S = 3.0  # a worker kill waits this long for a task of the stage to be running before it takes a helper


def _session_pids(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process of session `sid`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != sid:
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out.append((int(entry), cmd))
    return out


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid`, until none is left (Ray gives its workers process groups of their
    own, but they stay in the session)."""
    for _ in range(5):
        pids = [p for p, _ in _session_pids(sid)]
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)


@dataclass(frozen=True)
class Stage:
    """How to run one stage of the engine and judge a trial."""

    name: str
    command: Callable[[Path, Path], list[str]]  # (output, run_dir) -> argv
    actor: tuple[str, ...]  # substrings of the main actor's process title; () for stages of tasks only
    tasks: tuple[str, ...]  # substrings of the stage's task process titles
    check: Callable[[Path, Path, Any], str | None]  # (output, run_dir, clean reference) -> None if good, else why
    reference: Callable[[Path, Path], Any]  # (output, run_dir) of the clean run -> what check compares with
    recomputed: Callable[[Path, Path], Any]  # what the rerun recomputed (blocks or iterations), for the report
    progress: Callable[[Path, Path], int]  # (output, run_dir) -> units of work finished so far (markers, log rows)


def _workers(sid: int, kind: str, stage: Stage) -> list[tuple[int, str]]:
    """Ray worker processes of the run: the main actor ("actor"), or the others doing work ("worker")."""
    procs = [(p, c) for p, c in _session_pids(sid) if c.startswith("ray::") and "IDLE" not in c]
    is_actor = [any(a in c for a in stage.actor) for _, c in procs]
    if kind == "actor":
        return [pc for pc, a in zip(procs, is_actor) if a]
    others = [pc for pc, a in zip(procs, is_actor) if not a]
    tasks = [(p, c) for p, c in others if any(t in c for t in stage.tasks)]
    return tasks or others  # else Ray's own helper actors


def hashes(out: Path) -> dict[str, str]:
    """sha256 of every output file but the bookkeeping (ledger, scratch) and timing summaries."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and not SKIP_PARTS & set(p.relative_to(out).parts) and p.name not in SKIP_FILES}


def _same_bytes(out: Path, run_dir: Path, clean: dict[str, str]) -> str | None:
    got = hashes(out) if out.exists() else {}
    if got == clean:
        return None
    diff = sorted(k for k in set(got) | set(clean) if got.get(k) != clean.get(k))
    return f"{len(diff)} files differ, e.g. {diff[:3]}"


def _blocks_computed(summary_file: str) -> Callable[[Path, Path], Any]:
    def computed(out: Path, run_dir: Path) -> Any:
        try:
            doc = json.loads((run_dir / summary_file).read_text())
        except (OSError, ValueError):
            return None
        if "summary" in doc:  # infer
            return doc["summary"].get("computed")
        blocks = doc.get("blocks", {})
        return {k: v.get("computed") for k, v in blocks.items() if isinstance(v, dict)} or None
    return computed


def _training_check(iterations: int) -> Callable[[Path, Path, Any], str | None]:
    def check(out: Path, run_dir: Path, _: Any) -> str | None:
        from vemscale.checkpoint import load_checkpoint

        meta_file = run_dir / "checkpoint" / "vemscale.json"
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as err:
            return f"no final checkpoint: {err}"
        if meta.get("iteration") != iterations:
            return f"final checkpoint at iteration {meta.get('iteration')}, not {iterations}"
        try:
            load_checkpoint(run_dir / "checkpoint")
        except Exception as err:  # noqa: BLE001 - any failure to load is the finding
            return f"final checkpoint does not load: {err}"
        rows = [int(float(line.split(",")[0])) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
        if rows != sorted(set(rows)) or not rows or rows[-1] != iterations:
            return f"metrics.csv iterations not logged once each up to {iterations}: {rows[-5:]}"
        return None
    return check


def _resumed_from(out: Path, run_dir: Path) -> Any:
    try:
        rows = (run_dir / "metrics.csv").read_text().splitlines()
        head = rows[0].split(",")
        col = head.index("resumed_from")
        return max(int(float(r.split(",")[col] or 0)) for r in rows[1:])
    except (OSError, ValueError, IndexError):
        return None


def _blocks_done(out: Path, run_dir: Path) -> int:
    """Done markers of every pass (each file of the ledger but its ledger.json)."""
    ledger = out / ".vemscale-ledger"
    return sum(p.is_file() and p.name != "ledger.json" for p in ledger.rglob("*")) if ledger.is_dir() else 0


def _iterations_logged(out: Path, run_dir: Path) -> int:
    """Rows rank 0 has logged to metrics.csv."""
    try:
        return max(0, len((run_dir / "metrics.csv").read_text().splitlines()) - 1)
    except OSError:
        return 0


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vemscale.cli", *args]


def build_stages(root: Path, shape: tuple[int, int, int], iterations: int) -> dict[str, Callable[[], Stage]]:
    """Lazily built stages over one generated EM-like volume (image and mitochondria labels as OME-Zarr)."""
    from vemscale.bench.scale import tiny_checkpoint
    from vemscale.io.volume import create_ome_zarr
    from vemscale.synth import synthetic_em

    image, labels = synthetic_em(shape, seed=0)
    data = {}
    for name, arr in (("image", image), ("labels", labels)):
        data[name] = str(root / f"{name}.zarr")
        create_ome_zarr(data[name], arr.shape, arr.dtype, (2, 64, 64), (5.0, 5.0, 50.0), overwrite=True).write(arr).result()
    ckpt = tiny_checkpoint(root / "ckpt", tile=128, margin=16)
    blocks = ["progress=false", "blocks_per_batch=1"]
    n = shape[0]

    def infer() -> Stage:
        def cmd(out: Path, run_dir: Path) -> list[str]:
            return _cli("infer", f"input={data['image']}", f"output={out}", f"checkpoint={ckpt}",
                        "block_shape=2,64,64", "output_chunks=2,64,64", "workers=1", "threads_per_worker=1",
                        "batch_size=4", *blocks, f"run_dir={run_dir}")
        return Stage("infer", cmd, ("Predictor",), ("read_blocks", "write_blocks", "_mark_after"), _same_bytes,
                     lambda o, r: hashes(o), _blocks_computed("infer_summary.json"), _blocks_done)

    def instances() -> Stage:
        def cmd(out: Path, run_dir: Path) -> list[str]:
            return _cli("instances", f"source={data['labels']}", f"output={out}", "split=watershed",
                        "watershed.h_nm=10", "block_shape=2,64,64", "chunk=2,64,64", *blocks, f"run_dir={run_dir}")
        return Stage("instances", cmd, (), ("_fused",), _same_bytes, lambda o, r: hashes(o),
                     lambda o, r: _blocks_computed("summary.json")(o, o), _blocks_done)

    segmentation: dict[str, str] = {}

    def export() -> Stage:
        if not segmentation:  # the input: one clean instance segmentation of the labels
            r = subprocess.run(instances().command(root / "export-source", root / "export-source-run"), env=_env(),
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(r.stderr[-2000:])
            segmentation["url"] = str(root / "export-source" / "segmentation")

        def cmd(out: Path, run_dir: Path) -> list[str]:
            return _cli("export", segmentation["url"], f"precomputed://file://{out}", "task_voxels=32768",
                        "blocks_per_batch=1", "--pyramid", "--mesh", "--chunk", "2,64,64", f"--run-dir={run_dir}")
        return Stage("export", cmd, (), ("_fused",), _same_bytes, lambda o, r: hashes(o),
                     _blocks_computed("export_summary.json"), _blocks_done)

    def training(kind: str) -> Stage:
        cfg_file = root / f"{kind}.yaml"
        train = {"iterations": iterations, "batch_size": 2, "crop": 64, "log_every": 5,
                 "checkpoint_every": max(1, iterations // 4), "seed": 0}
        if kind == "finetune":
            pair = {"image": data["image"], "labels": data["labels"]}
            cfg = {"data": {"train": [{**pair, "slices": f"0:{n - 2}"}], "val": [{**pair, "slices": f"{n - 2}:{n}"}],
                            "classes": ["background", "mitochondria"]},
                   "model": {"name": "tiny"}, "train": {**train, "val_every": iterations, "workers": 1},
                   "tiles": {"tile": 64, "margin": 8, "batch_size": 4}}
        else:
            cfg = {"objective": "retina", "recipe": "none", "data": [{"path": data["image"], "planes": ["xy"]}],
                   "model": {"name": "tiny"}, "train": {**train, "preview_every": 0}, "workers": 1}
        cfg_file.write_text(json.dumps(cfg))  # JSON is YAML

        def cmd(out: Path, run_dir: Path) -> list[str]:
            return _cli(kind, str(cfg_file), f"run_dir={run_dir}")
        return Stage(kind, cmd, ("TrainWorker",), ("TrainWorker", "Controller"), _training_check(iterations),
                     lambda o, r: None, _resumed_from, _iterations_logged)

    return {"infer": infer, "instances": instances, "export": export,
            "finetune": lambda: training("finetune"), "pretrain": lambda: training("pretrain")}


def trial(stage: Stage, i: int, seed: int, root: Path, clean: Any, window: tuple[float, float]) -> dict[str, Any]:
    rng = random.Random(f"{stage.name}:{seed}:{i}")
    kinds = KINDS if stage.actor else ("driver", "worker")
    kind = kinds[rng.randrange(len(kinds))]
    at = rng.uniform(*window)  # between the clean run's first and last finished unit of work
    out, run_dir = root / f"{stage.name}-{i}", root / f"{stage.name}-{i}-run"
    cmd = stage.command(out, run_dir)
    log = open(root / f"{stage.name}-{i}.log", "w")  # a file, not a pipe: Ray's logs would fill a pipe and block
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=log)
    t0 = time.monotonic()
    killed, what, when = None, "", None
    while proc.poll() is None and killed is None:
        if time.monotonic() - t0 >= at:
            if kind == "driver":
                killed, what, when = proc.pid, "driver and its local Ray", time.monotonic() - t0
                kill_session(proc.pid)
            else:
                cands = _workers(proc.pid, kind, stage)
                waited = time.monotonic() - t0 - at
                if kind == "worker" and waited < TASK_WAIT_S and not any(t in c for _, c in cands for t in stage.tasks):
                    cands = []  # no task of the stage runs this instant: look again (Ray's helpers after a while)
                if cands:
                    pid, what = cands[rng.randrange(len(cands))]
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed, when = pid, time.monotonic() - t0
                    except OSError:
                        pass
        time.sleep(0.02)
    try:
        rc = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        rc = None  # hung after the kill: a finding, whatever the rerun does
    kill_session(proc.pid)  # anything the run left behind
    log.close()
    reran = rc != 0
    recomputed = None
    row: dict[str, Any] = {"stage": stage.name, "trial": i, "killed": kind if killed else "-", "what": what[:60],
                           "at_s": round(when, 2) if when is not None else round(at, 2), "first_rc": rc}
    if rc is None:
        return {**row, "outcome": "FAILED: hung for 600 s after the kill"}
    if reran:
        with open(root / f"{stage.name}-{i}-rerun.log", "w+") as rlog:
            r = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=rlog)
            try:
                rerun_rc = r.wait(timeout=900)
            except subprocess.TimeoutExpired:
                rerun_rc = None
            kill_session(r.pid)
            rlog.seek(0)
            tail = rlog.read()[-400:]
        if rerun_rc != 0:
            return {**row, "outcome": "rerun failed", "error": "the rerun hung for 900 s" if rerun_rc is None else tail}
        recomputed = stage.recomputed(out, run_dir)
    problem = stage.check(out, run_dir, clean)
    if problem:
        outcome = f"FAILED: {problem}"
    elif killed is None:
        outcome = "no kill (run ended first)"
    else:
        outcome = "identical" if stage.name in ("infer", "instances", "export") else "resumed to a good checkpoint"
    done_key = "resumed_from" if stage.name in ("finetune", "pretrain") else "recomputed"
    return {**row, "rerun": reran, done_key: recomputed, "outcome": outcome}


def run_stage(stage: Stage, root: Path, trials: int, seed: int, only: int | None) -> dict[str, Any]:
    out, run_dir = root / f"{stage.name}-clean", root / f"{stage.name}-clean-run"
    t = time.perf_counter()
    log_path = root / f"{stage.name}-clean.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(stage.command(out, run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=log)
    first_s = last_s = None  # when the first and the last unit of work finished
    done = 0
    while proc.poll() is None:
        now = stage.progress(out, run_dir)
        if now > done:
            done, last_s = now, time.perf_counter() - t
            first_s = last_s if first_s is None else first_s
        time.sleep(0.05)
    clean_s = time.perf_counter() - t
    log.close()
    if proc.returncode != 0:
        raise RuntimeError(f"clean {stage.name} run failed:\n{log_path.read_text()[-3000:]}")
    if first_s is None or last_s is None or last_s - first_s < 1.0:
        first_s, last_s = 0.4 * clean_s, 0.97 * clean_s
    window = (first_s, last_s)  # kills land while blocks (iterations) are being done
    problem = stage.check(out, run_dir, stage.reference(out, run_dir))
    if problem:
        raise RuntimeError(f"clean {stage.name} run fails its own check: {problem}")
    clean = stage.reference(out, run_dir)
    rows = []
    for i in ([only] if only is not None else range(trials)):
        rows.append(trial(stage, i, seed, root, clean, window))
        print(json.dumps(rows[-1]), flush=True)
    good = sum(not r["outcome"].startswith(("FAILED", "rerun failed")) for r in rows)
    return {"stage": stage.name, "clean_run_s": round(clean_s, 1), "kill_window_s": [round(w, 1) for w in window],
            "trials": len(rows), "passed": good,
            "killed": {k: sum(r.get("killed") == k for r in rows) for k in KINDS},
            "killed_after_start": sum(r.get("killed") != "-" for r in rows), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="infer", help="infer | instances | export | finetune | pretrain | all | a,b")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", type=int, default=None, help="replay this trial only")
    ap.add_argument("--shape", default="16,256,256")
    ap.add_argument("--iterations", type=int, default=100, help="fine-tune and pre-train iterations")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    shape = tuple(int(v) for v in a.shape.split(","))
    names = ["infer", "instances", "export", "finetune", "pretrain"] if a.stage == "all" else a.stage.split(",")
    results = []
    with tempfile.TemporaryDirectory(prefix="vemscale-bench-chaos-") as tmp:
        stages = build_stages(Path(tmp), shape, a.iterations)  # type: ignore[arg-type]
        unknown = [n for n in names if n not in stages]
        if unknown:
            ap.error(f"unknown stage(s) {unknown}; choose from {sorted(stages)} or all")
        for name in names:
            results.append(run_stage(stages[name](), Path(tmp), a.trials, a.seed, a.only))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "rows"}), flush=True)
    emit({"shape": list(shape), "seed": a.seed, "stages": results}, a.json)
    return 0 if all(r["passed"] == r["trials"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
