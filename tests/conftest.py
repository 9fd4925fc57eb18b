"""Shared fixtures: the real vEM data beside the project, and one local Ray instance per test session."""

from __future__ import annotations

import contextlib
import io
import os
import socket
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
    """An in-process local Ray with the machine's CPUs, shared by the tests that need Ray: started as every stage
    starts one (`ensure_ray`, with the environment it gives Ray Train)."""
    import ray

    from vemscale.raycluster import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(num_cpus=os.cpu_count() or 2)
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


def free_ports(n: int) -> list[int]:
    """n free TCP ports on the loopback interface."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --- a local S3 server ---------------------------------------------------------------------------------------------

BUCKET = "vem"
# dummy credentials, but treated as secrets: none of them may show up in logs or outputs
KEY_ID = "AKIAVEMSCALETESTKEY7"
SECRET = "vemscale-test-secret-2f6c9d0b8e1a47f3"


@pytest.fixture(scope="module")
def s3(ray_local, tmp_path_factory):
    """moto's S3 server on a free loopback port, one bucket, and the AWS_* environment pointing at it.

    `ray_local` first: the in-process Ray starts before AWS_* are set, so its workers never hold the credentials.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": endpoint,
           "AWS_REGION": "us-east-1"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION"):
                mp.delenv(k, raising=False)
            for k, v in env.items():
                mp.setenv(k, v)
            mp.setenv("VEMSCALE_CHECKPOINT_CACHE", str(tmp_path_factory.mktemp("ckpt-cache")))
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            yield SimpleNamespace(endpoint=endpoint, env=env, client=client)
    finally:
        server.stop()


def upload_dir(client, local: str | Path, prefix: str) -> None:
    """What `aws s3 cp --recursive local s3://bucket/prefix` does."""
    for f in sorted(Path(local).rglob("*")):
        if f.is_file():
            client.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(local).as_posix()}")


def bucket_objects(client) -> dict[str, bytes]:
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}
