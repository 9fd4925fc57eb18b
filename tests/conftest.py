"""Shared fixtures: the real vEM data beside the project, and one local Ray instance per test session."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest


def pytest_configure(config):
    """Each pytest worker's share of the cores as torch's thread count, set before any test module imports torch.

    The suite runs one pytest worker per core (-n 2 on 2 cores), each with its own local Ray and subprocesses:
    torch's default of one OpenMP thread per core, spinning while it waits, then makes every process fight the
    others for the cores (measured here: 10.9 CPU-s for 6.9 s of a tiny model's forward passes beside another
    busy process, 5.6-6.9 CPU-s with one thread). Inherited by the CLI subprocesses and Ray workers the tests
    start; explicit settings (threads_per_worker, a training worker's CPUs) still apply."""
    if hasattr(config, "workerinput"):  # a pytest-xdist worker
        workers = int(config.workerinput["workercount"])
    elif config.getoption("numprocesses", default=None):
        return  # the xdist controller runs no test: its environment would leak into the workers
    else:
        workers = 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VEMSCALE_DATA", ROOT.parent / "shared" / "data"))


def data_path(*parts: str) -> Path:
    """A file of ../shared/data; fails (not skips) when the data is missing, since CI always has it."""
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"real test data {p} is missing; set VEMSCALE_DATA to the shared data folder")
    return p


@pytest.fixture(scope="session")
def ray_local():
    """An in-process local Ray with the machine's CPUs, shared by the tests that need Ray."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=os.cpu_count() or 2, logging_level="WARNING")
    yield ray
    ray.shutdown()


def cli(*args: object) -> SimpleNamespace:
    """`vemscale <args>` through the command line's own entry point, in this process: exit code, stdout, stderr.

    For commands that end before any block or training step (bad input, --check): a fresh interpreter would only
    add ~7 CPU-s of importing torch and timm, which this test process already holds. Commands run from the
    repository root, as in the README."""
    from vemscale.cli import main

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in args])
    finally:
        os.chdir(cwd)
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (the run we started: driver, its local Ray, its actors).

    Ray puts each worker in a process group of its own, so killing the driver's group would leave the actors
    running for a while; they all stay in the session the test created."""
    from vemscale.bench.chaos import kill_session as kill

    kill(sid)


def kill_cli_when(args: list[str], condition: Callable[[], bool], timeout: float, poll: float = 0.02) -> None:
    """Run `vemscale <args>` in a session of its own (a local Ray of its own) and SIGKILL all of it once
    `condition()` holds; fails if the command exits first or the condition takes longer than `timeout` s."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "vemscale.cli", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"vemscale {args[0]}: the condition did not hold in {timeout} s"
            time.sleep(poll)
    finally:
        kill_session(proc.pid)
        proc.wait()
