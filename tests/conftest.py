"""Shared fixtures: the real vEM data beside the project, and one local Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
