"""S3 storage: a real S3-compatible server (moto) on 127.0.0.1, tensorstore's s3 kvstore, the endpoint taken from
AWS_ENDPOINT_URL, a checkpoint read from s3://, a missing bucket. A whole inference job from and to S3, with no
credential in any log or output, runs in test_jobs.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import BUCKET, KEY_ID, SECRET, upload_dir
from test_jobs import make_inputs
from vemscale.checkpoint import META_FILE, WEIGHTS_FILE, load_checkpoint, local_checkpoint, read_meta
from vemscale.errors import UserError
from vemscale.infer.pipeline import InferConfig, run_infer
from vemscale.io.s3 import with_s3_endpoint


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


# --- inference: a job on S3 runs in test_jobs.py (a Ray head whose environment holds the credentials) --------


def test_a_missing_bucket_fails_before_any_output_with_a_clear_error(s3, tmp_path):
    cfg = InferConfig(input="s3://no-such-bucket/em/vol.ome.zarr", output=str(tmp_path / "out"),
                      checkpoint=str(tmp_path), progress=False, run_dir=str(tmp_path / "run"))
    with pytest.raises(UserError) as err:
        run_infer(cfg)
    assert "s3://no-such-bucket/em/vol.ome.zarr" in str(err.value)
    assert SECRET not in str(err.value) and KEY_ID not in str(err.value)
    assert not (tmp_path / "out").exists()
