"""Inference from and to S3: a real S3-compatible server (moto) on 127.0.0.1, tensorstore's s3 kvstore, the
endpoint taken from AWS_ENDPOINT_URL, a checkpoint read from s3://, and no credential in any log or output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_jobs import INFER_ARGS, SHAPE, VOXEL, free_ports, make_inputs, read_prediction, reference_prediction
from vemscale.checkpoint import META_FILE, WEIGHTS_FILE, load_checkpoint, local_checkpoint, read_meta
from vemscale.errors import UserError
from vemscale.infer.pipeline import InferConfig, run_infer
from vemscale.infer.run import load_infer_config
from vemscale.io.s3 import with_s3_endpoint
from vemscale.io.volume import create_ome_zarr, open_volume

BUCKET = "vem"
# dummy credentials, but treated as secrets: none of them may show up in logs or outputs
KEY_ID = "AKIAVEMSCALETESTKEY7"
SECRET = "vemscale-test-secret-2f6c9d0b8e1a47f3"


@pytest.fixture(scope="module")
def s3(ray_local, tmp_path_factory):
    """moto's S3 server on a free loopback port, one bucket, and the AWS_* environment pointing at it.

    `ray_local` first: the in-process Ray (used for the local reference run) starts before AWS_* are set.
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


# --- the endpoint hook -----------------------------------------------------------------------------------------


def test_endpoint_comes_from_the_environment_and_only_touches_s3(monkeypatch):
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    spec = {"driver": "zarr", "kvstore": "s3://bkt/x.zarr/"}
    assert with_s3_endpoint(spec) == spec and with_s3_endpoint("s3://bkt/x/") == "s3://bkt/x/"

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    s3kv = {"driver": "s3", "bucket": "bkt", "path": "x.zarr/", "endpoint": "http://minio:9000",
            "aws_region": "eu-west-1"}
    assert with_s3_endpoint(spec) == {"driver": "zarr", "kvstore": s3kv}
    assert with_s3_endpoint("s3://bkt/x.zarr/") == s3kv
    assert with_s3_endpoint("s3://bkt/x.zarr/|zarr2:")["kvstore"] == s3kv  # a tensorstore pipeline URL
    nested = {"driver": "neuroglancer_precomputed", "kvstore": {"driver": "ocdbt", "base": "s3://bkt/x.zarr/"}}
    assert with_s3_endpoint(nested)["kvstore"]["base"] == s3kv
    own = {"driver": "s3", "bucket": "bkt", "endpoint": "http://other:9000"}
    assert with_s3_endpoint(own) == own  # an explicit endpoint wins
    for other in ("file:///tmp/x/", "gs://b/x/", {"driver": "zarr", "kvstore": "memory://"}):
        assert with_s3_endpoint(other) == other
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:9000")  # the service-specific name wins
    assert with_s3_endpoint("s3://bkt/x/")["endpoint"] == "http://s3only:9000"


# --- checkpoints on S3 -----------------------------------------------------------------------------------------


def test_checkpoint_is_read_from_s3_into_a_revalidated_cache(s3, tmp_path):
    data = make_inputs(tmp_path)
    url = f"s3://{BUCKET}/models/cache-test"
    upload_dir(s3.client, data.ckpt, "models/cache-test")

    local = local_checkpoint(url)
    assert local.is_relative_to(os.environ["VEMSCALE_CHECKPOINT_CACHE"])
    for name in (META_FILE, WEIGHTS_FILE):
        assert (local / name).read_bytes() == (Path(data.ckpt) / name).read_bytes()
    model, meta = load_checkpoint(url)
    assert meta == read_meta(data.ckpt)
    ref, _ = load_checkpoint(data.ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))

    stamp = (local / WEIGHTS_FILE).stat().st_mtime_ns
    assert local_checkpoint(url) == local
    assert (local / WEIGHTS_FILE).stat().st_mtime_ns == stamp  # unchanged in the bucket: not downloaded again

    s3.client.put_object(Bucket=BUCKET, Key="models/cache-test/model.pt", Body=b"changed")
    assert (local_checkpoint(url) / WEIGHTS_FILE).read_bytes() == b"changed"  # a new generation is fetched again
    with pytest.raises(UserError, match="cannot load weights"):
        load_checkpoint(url)
    with pytest.raises(UserError, match="not a vemscale checkpoint"):
        local_checkpoint(f"s3://{BUCKET}/models/missing")


# --- inference from and to S3 ----------------------------------------------------------------------------------


def test_infer_reads_and_writes_s3_and_matches_a_local_run(s3, tmp_path):
    data = make_inputs(tmp_path)
    # the input written straight to S3 through tensorstore, the checkpoint uploaded as a directory of files
    create_ome_zarr(f"s3://{BUCKET}/em/vol.ome.zarr", SHAPE, np.uint8, (2, 64, 64), VOXEL).write(data.vol).result()
    upload_dir(s3.client, data.ckpt, "models/ckpt")
    assert np.array_equal(open_volume(f"s3://{BUCKET}/em/vol.ome.zarr").read(), data.vol)

    # `vemscale infer` as a job runs it: a fresh process with its own local Ray, credentials only in the environment
    ray_tmp = tempfile.mkdtemp(prefix="vss3-", dir="/tmp")  # Ray's logs for this run, scanned below
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(s3.env, RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    run_dir = tmp_path / "run-s3"
    urls = [f"input=s3://{BUCKET}/em/vol.ome.zarr", f"output=s3://{BUCKET}/pred",
            f"checkpoint=s3://{BUCKET}/models/ckpt"]
    args = [*urls, f"run_dir={run_dir}", *INFER_ARGS]
    try:
        proc = subprocess.run([sys.executable, "jobs/infer.py", "configs/infer.yaml", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        ray_logs = [p.read_bytes() for p in Path(ray_tmp).rglob("*") if p.is_file() and not p.is_symlink()]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["outputs"] == {"probabilities": f"s3://{BUCKET}/pred/probabilities",
                                 "labels": f"s3://{BUCKET}/pred/labels"}
    assert result["summary"]["computed"] == result["summary"]["blocks"] == 12

    # the bytes of one whole-volume sliding window over the local copy (what a local run writes, test_jobs.py)
    s3_probs, s3_labels = read_prediction(f"s3://{BUCKET}/pred")
    probs, labels = reference_prediction(data.ckpt, data.vol)
    assert np.array_equal(s3_probs, probs) and np.array_equal(s3_labels, labels)
    assert open_volume(f"s3://{BUCKET}/pred/labels").voxel_size_xyz == VOXEL

    # a rerun against the S3 ledger computes nothing (the driver alone reads the ledger; no actor starts)
    config_yaml = str(ROOT / "configs" / "infer.yaml")
    again = run_infer(load_infer_config([config_yaml, *urls, f"run_dir={tmp_path / 'run-again'}", *INFER_ARGS]))
    assert (again["summary"]["computed"], again["summary"]["skipped"]) == (0, 12)

    # no credential anywhere: process output, run files, Ray's logs, or any object written to the bucket
    objects = bucket_objects(s3.client)
    assert any(k.startswith("pred/.vemscale-ledger/") for k in objects)
    texts = {"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode(),
             **{f.name: f.read_bytes() for f in run_dir.iterdir()},
             **{f"ray log {i}": b for i, b in enumerate(ray_logs)},
             **{f"s3://{BUCKET}/{k}": v for k, v in objects.items()}}
    assert {"infer_summary.json", "infer_config.yaml"} <= set(texts)
    assert len(ray_logs) > 5
    for secret in (SECRET, KEY_ID):
        leaked = [name for name, blob in texts.items() if secret.encode() in blob]
        assert not leaked, f"credential found in {leaked}"


def test_a_missing_bucket_fails_before_any_output_with_a_clear_error(s3, tmp_path):
    cfg = InferConfig(input="s3://no-such-bucket/em/vol.ome.zarr", output=str(tmp_path / "out"),
                      checkpoint=str(tmp_path), progress=False, run_dir=str(tmp_path / "run"))
    with pytest.raises(UserError) as err:
        run_infer(cfg)
    assert "s3://no-such-bucket/em/vol.ome.zarr" in str(err.value)
    assert SECRET not in str(err.value) and KEY_ID not in str(err.value)
    assert not (tmp_path / "out").exists()
