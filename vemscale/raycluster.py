"""Connect to the Ray cluster a stage runs on: the one in RAY_ADDRESS (or `ray job submit`'s), else a local one."""

from __future__ import annotations

import logging
import os

import ray


def ensure_ray(num_cpus: int | None = None) -> dict:
    """Initialise Ray once per process; returns the cluster's resources."""
    if not ray.is_initialized():
        kwargs: dict = {"logging_level": logging.WARNING, "configure_logging": True}
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        else:
            # a fresh local instance; export RAY_ADDRESS=auto to join a `ray start` cluster instead
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
    return ray.cluster_resources()


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
