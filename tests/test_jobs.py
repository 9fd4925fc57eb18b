"""`ray job submit` end to end: a real Ray head started with `ray start` (loopback, token auth on), the README's
submit command with `--working-dir .`, a real inference job from and to S3 (a local S3 server, the credentials in
the head's environment only) and a job with a bad config key.

The head gets its own --temp-dir, its own token file and free ports, and is stopped by killing exactly the
processes of that head (never `ray stop`, which would stop every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import tifffile
import torch

from conftest import BUCKET, KEY_ID, ROOT, SECRET, bucket_objects, data_path, free_ports, upload_dir
from vemscale.checkpoint import CheckpointMeta, save_checkpoint
from vemscale.io.volume import create_ome_zarr, open_volume
from vemscale.models import create_model

RAY = str(Path(sys.executable).with_name("ray"))
SHAPE = (4, 128, 160)
VOXEL = (4.6, 4.6, 45.0)
# small blocks and one single-threaded actor: 12 blocks, the same arguments for every run in these tests
INFER_ARGS = ["block_shape=2,64,64", "output_chunks=2,64,64", "workers=1", "threads_per_worker=1", "batch_size=4",
              "progress=false"]


# --- shared inputs (also used by test_s3.py) --------------------------------------------------------------------


def make_inputs(root: Path) -> SimpleNamespace:
    """A real ssTEM crop as OME-Zarr, its numpy copy, and a tiny random-init checkpoint (64 px tiles)."""
    vol = tifffile.imread(data_path("vnc_drosophila_sstem", "test_unlabeled", "image.tif"), key=range(SHAPE[0]))
    vol = np.ascontiguousarray(vol[:, : SHAPE[1], : SHAPE[2]])
    create_ome_zarr(root / "vol.ome.zarr", SHAPE, np.uint8, (2, 64, 64), VOXEL).write(vol).result()
    torch.manual_seed(0)
    model = create_model("tiny", in_chans=1, num_classes=2).eval()
    ckpt = save_checkpoint(root / "ckpt", model, CheckpointMeta(model=model.spec, tile=64, margin=8,
                                                                voxel_size_xyz=list(VOXEL)))
    return SimpleNamespace(vol=vol, input=str(root / "vol.ome.zarr"), ckpt=str(ckpt))


def read_prediction(out: str) -> tuple[np.ndarray, np.ndarray]:
    return open_volume(f"{out}/probabilities").read(), open_volume(f"{out}/labels").read()


def reference_prediction(ckpt: str, vol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantised probabilities and labels of one whole-volume sliding window, single-threaded like the actors."""
    from vemscale.checkpoint import load_checkpoint
    from vemscale.infer.outputs import argmax_labels, quantize_probabilities
    from vemscale.infer.predictor import grid_and_normalizer
    from vemscale.infer.tiling import predict_volume_xy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, meta = load_checkpoint(ckpt)
        grid, norm = grid_and_normalizer(meta)
        probs = predict_volume_xy(model, vol, grid, norm, batch_size=4)
    finally:
        torch.set_num_threads(threads)
    return quantize_probabilities(probs), argmax_labels(probs)


# --- a Ray head of our own ---------------------------------------------------------------------------------------


def head_processes(temp_dir: str) -> list[psutil.Process]:
    """Processes of the head rooted at `temp_dir` (their command lines name it) and all their descendants."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_head(temp_dir: str) -> None:
    """Terminate, then kill, only the processes of this head (`ray stop` would stop everyone's Ray)."""
    procs = head_processes(temp_dir)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=3)  # gcs_server/raylet may ignore SIGTERM for a while
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run(cmd: list[str], env: dict[str, str], timeout: float = 240, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a CLI; stdout/stderr without the colour codes Ray's CLI adds."""
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    out.stdout, out.stderr = ANSI.sub("", out.stdout), ANSI.sub("", out.stderr)
    return out


@pytest.fixture(scope="module")
def head(tmp_path_factory, s3):
    """`ray start --head` on loopback with token auth, 2 CPUs, a private temp dir, token file and ports; the S3
    credentials and endpoint in its environment (as on a cluster's nodes), so its jobs' processes inherit them."""
    temp_dir = tempfile.mkdtemp(prefix="vsray-", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    token = tmp_path_factory.mktemp("auth") / "token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(s3.env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))  # `python` = this venv's
    (gcs, dash, client, agent, agent_grpc, metrics, runtime_env, node_manager, object_manager) = free_ports(9)
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={node_manager}",
           f"--object-manager-port={object_manager}", "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats",
           f"--temp-dir={temp_dir}"]
    try:
        started = run(cmd, env, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 60
        while True:  # the job API can lag `ray start` by a moment
            listed = run([RAY, "job", "list", "--address", address], env, timeout=60)
            if listed.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        yield SimpleNamespace(address=address, env=env, temp_dir=temp_dir)
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("jobs"))


def submit(head, job_id: str, args: list[str], working_dir: bool = True) -> subprocess.CompletedProcess:
    """The README's blocking submit: `ray job submit --address ... --working-dir . -- python jobs/infer.py ...`."""
    cmd = [RAY, "job", "submit", "--address", head.address, "--submission-id", job_id]
    cmd += ["--working-dir", "."] if working_dir else []
    return run([*cmd, "--", "python", "jobs/infer.py", "configs/infer.yaml", *args], head.env)


def job_logs(head, job_id: str) -> str:
    out = run([RAY, "job", "logs", "--address", head.address, job_id], head.env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def job_status(head, job_id: str) -> str:
    """The state `ray job status` reports ("succeeded", "failed", ...); it exits 0 whatever the state."""
    out = run([RAY, "job", "status", "--address", head.address, job_id], head.env, timeout=60)
    assert out.returncode == 0, out.stderr
    states = re.findall(rf"Job '{re.escape(job_id)}' (\w+)", out.stdout)
    assert states, out.stdout
    return states[-1]


def test_infer_job_runs_on_the_head_from_and_to_s3_without_leaking_credentials(head, inputs, s3, tmp_path):
    # the input written straight to S3 through tensorstore, the checkpoint uploaded as a directory of files
    create_ome_zarr(f"s3://{BUCKET}/em/vol.ome.zarr", SHAPE, np.uint8, (2, 64, 64), VOXEL).write(inputs.vol).result()
    upload_dir(s3.client, inputs.ckpt, "models/ckpt")
    assert np.array_equal(open_volume(f"s3://{BUCKET}/em/vol.ome.zarr").read(), inputs.vol)

    job_id = f"vemscale-infer-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "run"
    urls = [f"input=s3://{BUCKET}/em/vol.ome.zarr", f"output=s3://{BUCKET}/pred", f"checkpoint=s3://{BUCKET}/models/ckpt"]
    done = submit(head, job_id, [*urls, f"run_dir={run_dir}", *INFER_ARGS])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"Job '{job_id}' succeeded" in done.stdout
    assert job_status(head, job_id) == "succeeded"

    # the job ran in the cluster: on the head's node, from the uploaded working dir, with the cluster's CPUs
    logs = job_logs(head, job_id)
    result = json.loads(re.findall(r"^\{.*\}$", logs, re.MULTILINE)[-1])
    assert result["outputs"] == {"probabilities": f"s3://{BUCKET}/pred/probabilities",
                                 "labels": f"s3://{BUCKET}/pred/labels"}
    assert result["summary"]["computed"] == result["summary"]["blocks"] == 12
    assert json.loads((run_dir / "infer_summary.json").read_text())["summary"]["computed"] == 12

    probs, labels = read_prediction(f"s3://{BUCKET}/pred")
    assert probs.shape == (2, *SHAPE) and probs.dtype == np.uint8 and labels.shape == SHAPE
    ref_probs, ref_labels = reference_prediction(inputs.ckpt, inputs.vol)  # the same bytes as one local pass
    assert np.array_equal(probs, ref_probs) and np.array_equal(labels, ref_labels)
    assert open_volume(f"s3://{BUCKET}/pred/labels").voxel_size_xyz == VOXEL

    # a rerun against the S3 ledger, here, computes nothing (the driver alone reads the ledger; no actor starts)
    from vemscale.infer.pipeline import run_infer
    from vemscale.infer.run import load_infer_config

    again = run_infer(load_infer_config([str(ROOT / "configs" / "infer.yaml"), *urls, f"run_dir={tmp_path / 'again'}",
                                         *INFER_ARGS]))
    assert (again["summary"]["computed"], again["summary"]["skipped"]) == (0, 12)

    # no credential anywhere: the submit's output, the job's logs, run files, the head's logs, or the bucket
    objects = bucket_objects(s3.client)
    assert any(k.startswith("pred/.vemscale-ledger/") for k in objects)
    # Ray's logs (session_<date>_..., not the session_latest link; not the uploaded working dir either: this
    # repository's tests hold the dummy secret)
    ray_logs = {str(p): p.read_bytes() for p in Path(head.temp_dir).glob("session_2*/logs/**/*")
                if p.is_file() and not p.is_symlink()}
    texts = {"stdout": done.stdout.encode(), "stderr": done.stderr.encode(), "job logs": logs.encode(),
             **{f.name: f.read_bytes() for f in run_dir.iterdir()}, **ray_logs,
             **{f"s3://{BUCKET}/{k}": v for k, v in objects.items()}}
    assert {"infer_summary.json", "infer_config.yaml"} <= set(texts)
    assert len(ray_logs) > 5
    for secret in (SECRET, KEY_ID):
        leaked = [name for name, blob in texts.items() if secret.encode() in blob]
        assert not leaked, f"credential found in {leaked}"


def test_job_with_a_bad_config_key_fails_with_the_config_error_in_its_logs(head, inputs, tmp_path):
    job_id = f"vemscale-bad-{uuid.uuid4().hex[:8]}"
    failed = submit(head, job_id, [f"input={inputs.input}", f"output={tmp_path / 'pred'}", f"checkpoint={inputs.ckpt}",
                                   "blokc_shape=2,64,64"], working_dir=False)
    assert failed.returncode != 0  # a blocking submit reports the failed job
    assert job_status(head, job_id) == "failed"
    logs = job_logs(head, job_id)
    assert "unknown config key 'blokc_shape'" in logs and "block_shape" in logs
    assert not (tmp_path / "pred").exists()  # rejected before any output was created


def test_the_job_api_refuses_a_client_without_the_token(head):
    env = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = tempfile.mkdtemp(prefix="vsnohome-")  # no ~/.ray/auth_token to fall back on
    try:
        listed = run([RAY, "job", "list", "--address", head.address], env, timeout=60)
    finally:
        shutil.rmtree(env["HOME"], ignore_errors=True)
    assert listed.returncode != 0
    assert "Missing authentication token" in listed.stderr


def test_stop_head_kills_only_this_head(head):
    """The teardown's process selection: every process found names this head's temp dir or descends from one."""
    procs = head_processes(head.temp_dir)
    names = " ".join(" ".join(p.cmdline()) for p in procs if p.is_running())
    assert "gcs_server" in names and "raylet" in names
    assert os.getpid() not in {p.pid for p in procs}
    others = [p for p in psutil.process_iter(["cmdline"]) if "gcs_server" in " ".join(p.info["cmdline"] or ())
              and head.temp_dir not in " ".join(p.info["cmdline"] or ())]
    assert all(p.pid not in {q.pid for q in procs} for p in others)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
