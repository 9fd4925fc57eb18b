"""S3-compatible object stores (MinIO, Ceph RGW, Wasabi, moto...): the endpoint comes from the environment.

tensorstore's `s3` kvstore takes a custom endpoint only as the `endpoint` member of a JSON spec; an
`s3://bucket/path` URL always means AWS itself (and hangs where AWS cannot be reached). vemscale passes
URLs around as strings, so instead of threading a spec through every call, `install()` wraps
`tensorstore.open` and `tensorstore.KvStore.open`: when `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (the
AWS SDK/CLI names) is set, every s3 kvstore opened without an explicit endpoint gets that endpoint, and
`AWS_REGION` / `AWS_DEFAULT_REGION` as its region when set. Nothing changes when neither is set, for
other drivers, or for specs that name their own endpoint. Opened stores carry the endpoint in their
spec, so a store pickled to a Ray worker reopens against the same server.

Credentials are never part of a spec: tensorstore reads them itself (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws, or the instance/pod role).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import tensorstore as ts

__all__ = ["ENDPOINT_VARS", "s3_endpoint", "with_s3_endpoint", "install"]

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")


def _first_env(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment (AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL), or None."""
    return _first_env(ENDPOINT_VARS)


def _kvstore(value: Any, endpoint: str, region: str | None) -> Any:
    """An s3 kvstore URL or spec with the endpoint filled in; anything else unchanged."""
    if isinstance(value, str) and value.startswith("s3://") and "|" not in value:
        try:
            value = ts.KvStore.Spec(value).to_json()
        except ValueError:  # not a valid s3 URL: leave it for tensorstore's own error
            return value
    if isinstance(value, dict):
        value = {k: _kvstore(v, endpoint, region) if k in ("kvstore", "base") else v for k, v in value.items()}
        if value.get("driver") == "s3" and "endpoint" not in value:
            value["endpoint"] = endpoint
            if region and "aws_region" not in value:
                value["aws_region"] = region
    return value


def with_s3_endpoint(spec: Any) -> Any:
    """`spec` (kvstore URL, kvstore spec, or TensorStore spec dict) with the environment's S3 endpoint added."""
    endpoint = s3_endpoint()
    if endpoint is None:
        return spec
    if isinstance(spec, str) and spec.startswith("s3://") and "|" in spec:  # a pipeline URL: s3://b/p/|zarr3:
        try:
            spec = ts.Spec(spec).to_json()
        except ValueError:
            return spec
    return _kvstore(spec, endpoint, _first_env(REGION_VARS))


def install() -> None:
    """Wrap tensorstore.open and tensorstore.KvStore.open once per process (idempotent)."""
    if getattr(ts.open, "_vemscale_s3", False):
        return
    open_store, open_kv = ts.open, ts.KvStore.open

    @functools.wraps(open_store)
    def open_with_endpoint(spec: Any, *args: Any, **kwargs: Any) -> Any:
        return open_store(with_s3_endpoint(spec), *args, **kwargs)

    @functools.wraps(open_kv)
    def open_kv_with_endpoint(spec: Any, *args: Any, **kwargs: Any) -> Any:
        return open_kv(with_s3_endpoint(spec), *args, **kwargs)

    open_with_endpoint._vemscale_s3 = True  # type: ignore[attr-defined]
    ts.open = open_with_endpoint
    ts.KvStore.open = staticmethod(open_kv_with_endpoint)
