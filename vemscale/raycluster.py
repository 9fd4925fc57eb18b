"""Connect to the Ray cluster a stage runs on: the one in RAY_ADDRESS (or `ray job submit`'s), else a local one."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)

# Ray Train V2 holds a worker in `report` until its controller polls (every 2 s by default), which costs a
# fine-tuning step of ~1 s up to 2 s per report; polling every 0.2 s makes reports cheap.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def ensure_ray(num_cpus: int | None = None) -> dict:
    """Initialise Ray once per process; returns the cluster's resources."""
    if not ray.is_initialized():
        env_vars = {k: os.environ.get(k, v) for k, v in TRAIN_ENV.items()}
        os.environ.update(env_vars)  # a local instance's processes inherit the driver's environment
        kwargs: dict = {"logging_level": logging.WARNING, "configure_logging": True}
        if os.environ.get("RAY_ADDRESS"):
            # a cluster (or a `ray job submit` job): its runtime env is the job's; set TRAIN_ENV there
            ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        else:
            # a fresh local instance; export RAY_ADDRESS=auto to join a `ray start` cluster instead
            for attempt in range(2):
                try:
                    ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env_vars}, **kwargs)
                    break
                except Exception as err:  # Ray gives its raylet a fixed 30 s to register; a busy laptop can miss it
                    if attempt or "timed out during startup" not in str(err):
                        raise
                    log.warning("local Ray did not start in time (%s); starting it again", err)
                    ray.shutdown()
    return ray.cluster_resources()


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
