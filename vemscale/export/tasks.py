"""Run one Ray task per box with a bounded number in flight; fold results as they arrive.

Boxes are generated from their index, so the driver holds at most `max_in_flight` object refs, whatever the
volume size. A failed task raises here with the box it was working on.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

import tensorstore as ts

log = logging.getLogger(__name__)


def default_in_flight() -> int:
    import ray

    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


def run_tasks(submit: Callable[[int], Any], indices: Iterable[int], fold: Callable[[Any], None] | None = None,
              max_in_flight: int | None = None, desc: str = "tasks") -> int:
    """`submit(i)` returns an ObjectRef for task i; `fold(result)` consumes each result. Returns tasks run."""
    import ray

    limit = max_in_flight or default_in_flight()
    pending: dict[Any, int] = {}
    done, t0, last = 0, time.perf_counter(), time.perf_counter()

    def drain(n: int) -> None:
        nonlocal done, last
        ready, _ = ray.wait(list(pending), num_returns=n)
        for ref in ready:
            i = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:
                raise RuntimeError(f"{desc}: task {i} failed: {err}") from err
            if fold is not None:
                fold(result)
            done += 1
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            log.info("%s: %d tasks done (%.0f s)", desc, done, last - t0)

    for i in indices:
        if len(pending) >= limit:
            drain(1)
        pending[submit(i)] = i
    while pending:
        drain(1)
    log.debug("%s: %d tasks in %.1f s", desc, done, time.perf_counter() - t0)
    return done


def open_spec(spec: dict[str, Any], write: bool = False) -> ts.TensorStore:
    """Open a store from its JSON spec in a task (a fresh handle: a layer rewritten since is never seen stale)."""
    return ts.open(spec, open=True, read=True, write=write).result()
