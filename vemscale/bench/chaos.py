"""Chaos run for `vemscale infer`: SIGKILL the driver or a random Ray worker at a random moment, rerun, and
compare the output bytes with a clean run.

Each trial starts `vemscale infer` in a session of its own (its own local Ray), waits a random share of the
clean run's time, and kills one of: the driver (the whole session, as a crash of the machine running it
would), the model actor, or any other Ray worker process (read and write tasks). A killed driver is followed
by a rerun of the same command (the ledger skips the done blocks); after a worker kill the run must finish
by itself (Ray restarts the actor and retries the tasks), and is rerun only if it failed. Every file of the
output (ledger excluded) must then equal the clean run's, byte for byte. Seeded: trial i of seed s always
draws the same target and moment, `--only i` replays it.

    python -m vemscale.bench.chaos --trials 20            # ~10 min on 2 cores
    python -m vemscale.bench.chaos --trials 3 --only 2    # replay trial 2 of seed 0
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
from pathlib import Path
from typing import Any

from vemscale.bench import emit
from vemscale.bench.scale import generated_volume, tiny_checkpoint

KINDS = ("driver", "actor", "worker")
LEDGER = ".vemscale-ledger"


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


def _workers(sid: int, kind: str) -> list[tuple[int, str]]:
    """Ray worker processes of the run: the model actor ("actor"), or the others doing work ("worker")."""
    procs = [(p, c) for p, c in _session_pids(sid) if c.startswith("ray::") and "IDLE" not in c]
    if kind == "actor":
        return [(p, c) for p, c in procs if "Predictor" in c]
    others = [(p, c) for p, c in procs if "Predictor" not in c]
    tasks = [(p, c) for p, c in others if "read_blocks" in c or "write_blocks" in c]  # a read or write task
    return tasks or others  # else Ray Data's own helper actors


def _hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and LEDGER not in p.parts}


def _command(src: str, ckpt: str, out: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "vemscale.cli", "infer", f"input={src}", f"output={out}", f"checkpoint={ckpt}",
            "block_shape=2,64,64", "output_chunks=2,64,64", "workers=1", "threads_per_worker=1", "batch_size=4",
            "blocks_per_batch=1", "progress=false", f"run_dir={run_dir}"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _computed(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / "infer_summary.json").read_text())["summary"]["computed"])
    except (OSError, ValueError, KeyError):
        return None


def trial(i: int, seed: int, src: str, ckpt: str, root: Path, clean: dict[str, str], clean_s: float) -> dict[str, Any]:
    rng = random.Random(seed * 100_003 + i)
    kind = KINDS[rng.randrange(len(KINDS))]
    at = rng.uniform(0.55, 0.98) * clean_s  # Ray and the actor start in the first half; blocks run after
    out, run_dir = root / f"trial-{i}", root / f"trial-{i}-run"
    cmd = _command(src, ckpt, out, run_dir)
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    killed, what = None, ""
    while proc.poll() is None and killed is None:
        if time.monotonic() - t0 >= at:
            if kind == "driver":
                killed, what = proc.pid, "driver and its local Ray"
            else:
                cands = _workers(proc.pid, kind)
                if cands:
                    pid, what = cands[rng.randrange(len(cands))]
                    killed = pid
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        killed = None
            if kind == "driver":
                kill_session(proc.pid)
        time.sleep(0.02)
    rc = proc.wait()
    if kind != "driver":
        kill_session(proc.pid)  # anything the run left behind
    reran = rc != 0
    recomputed = None
    if reran:
        r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
        if r.returncode != 0:
            return {"trial": i, "killed": kind, "what": what[:60], "at_s": round(at, 2), "outcome": "rerun failed",
                    "error": r.stderr[-300:]}
        recomputed = _computed(run_dir)
    got = _hashes(out) if out.exists() else {}
    if got != clean:
        outcome = "DIFFERS"
    elif killed is None:
        outcome = "no kill (run ended first)"
    else:
        outcome = "identical"
    return {"trial": i, "killed": kind if killed else "-", "what": what[:60], "at_s": round(at, 2), "rerun": reran,
            "blocks_recomputed": recomputed, "outcome": outcome}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", type=int, default=None, help="replay this trial only")
    ap.add_argument("--shape", default="8,256,256")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    shape = tuple(int(v) for v in a.shape.split(","))
    with tempfile.TemporaryDirectory(prefix="vemscale-bench-chaos-") as tmp:
        root = Path(tmp)
        src = generated_volume(root / "vol.zarr", shape, (2, 64, 64))
        ckpt = tiny_checkpoint(root / "ckpt", tile=128, margin=16)
        t = time.perf_counter()
        r = subprocess.run(_command(src, ckpt, root / "clean", root / "clean-run"), env=_env(), capture_output=True,
                           text=True)
        clean_s = time.perf_counter() - t
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        clean = _hashes(root / "clean")
        rows = []
        for i in ([a.only] if a.only is not None else range(a.trials)):
            rows.append(trial(i, a.seed, src, ckpt, root, clean, clean_s))
            print(json.dumps(rows[-1]), flush=True)
    passed = sum(r["outcome"] in ("identical", "no kill (run ended first)") for r in rows)
    result = {"stage": "infer", "shape": list(shape), "clean_run_s": round(clean_s, 1), "trials": len(rows),
              "passed": passed, "killed": {k: sum(r.get("killed") == k for r in rows) for k in KINDS},
              "rows": rows}
    emit(result, a.json)
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
