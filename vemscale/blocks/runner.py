"""The one block runner: pending block ids -> stages (Ray tasks or actor pools) -> marked done in the ledger.

    ids (lazy, from the ledger, a batch of contiguous ids per Ray Data block)
      -> stage 1 (tasks: e.g. read block + halo)  -> stage 2 (actor pool: e.g. predict) -> ...
      -> last stage (tasks: e.g. write) then `Ledger.mark_done(ids, payloads)` in the same task
      -> the driver folds each batch's small stats (progress bar, summary)

A stage is a plain function of a batch `{"id": int64[n], ...} -> {"id": ..., ...}` (or a class whose
instances are such functions, run as an actor pool: one model per actor). Ray Data streams the batches with
bounded memory (its backpressure); `max_tasks_in_flight_per_actor` lets an actor's next input arrive while it
computes. The last stage's output may carry a `payload` column (bytes per block) that the ledger stores, so a
reduction over all blocks (label counts, metric sums) survives a resume; every other column is small
per-block stats that reach the driver. Batches of many block ids keep Ray Data's blocks large (its guidance:
>= 1 MB) and the per-block overhead far below a millisecond.

Executors: "ray" (Ray Data streaming, needed for actor pools), "tasks" (stages without actors fused into one
plain Ray task per batch, a bounded number in flight: starts in milliseconds), "local" (this process, batch
by batch: small jobs, no Ray); "auto" picks "ray" when a stage is an actor pool, else "tasks".
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import numpy as np

from vemscale.blocks.ledger import Ledger

log = logging.getLogger(__name__)

Batch = dict[str, Any]
SEGMENT_BATCHES = 4096  # id batches per Ray Data execution: what the driver holds of a plan at once
TARGET_BATCH_BYTES = 16 << 20  # data per Ray Data block between stages (>= 1 MB as Ray Data advises; small enough
# that big blocks go one per batch and the actors stay balanced)
MAX_IDS_PER_BATCH = 1024


@dataclass(frozen=True)
class Stage:
    """One step of a block pipeline: a batch function, or a class run as an actor pool of `actors` actors."""

    name: str
    fn: Callable[..., Batch] | type
    kwargs: dict[str, Any] = field(default_factory=dict)  # fn kwargs, or the class's constructor kwargs
    actors: int = 0  # > 0: an actor pool of this size (fn must be a class)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    concurrency: int | None = None  # task stages: at most this many tasks at once
    prefetch: int = 2  # actor stages: inputs in flight per actor (the next one arrives while it computes)


def ids_per_batch(block_bytes: int, pending: int, workers: int, target_bytes: int = TARGET_BATCH_BYTES,
                  max_ids: int = MAX_IDS_PER_BATCH) -> int:
    """Block ids per Ray Data block: ~target_bytes of data, yet >= 4 batches per worker to keep them balanced."""
    by_size = max(1, target_bytes // max(1, int(block_bytes)))
    balance = max(1, math.ceil(pending / (4 * max(1, workers))))
    return int(max(1, min(max_ids, by_size, balance)))


def contiguous_batches(ids: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Split sorted ids into batches of at most `size` contiguous ids (one ledger key each)."""
    if ids.size == 0:
        return
    cuts = np.flatnonzero(np.diff(ids) != 1) + 1
    for run in np.split(ids, cuts):
        for lo in range(0, run.size, size):
            yield run[lo : lo + size]


def pending_batches(num_blocks: int, ledger: Ledger | None, size: int, start: int = 0,
                    stop: int | None = None) -> Iterator[np.ndarray]:
    """Batches of pending ids in [start, stop), listing the ledger one shard at a time."""
    stop = num_blocks if stop is None else stop
    if ledger is None:
        for lo in range(start, stop, size):
            yield np.arange(lo, min(lo + size, stop), dtype=np.int64)
        return
    for ids in ledger.pending(start, stop):
        yield from contiguous_batches(ids, size)


def _mark_after(batch: Batch, fn: Callable[..., Batch], ledger: Ledger | None, kwargs: dict[str, Any],
                keep_payload: bool) -> Batch:
    """The last stage: run `fn`, then mark its blocks done (outputs are written when `fn` returns)."""
    out = fn(batch, **kwargs)
    payloads = out.pop("payload", None)
    if ledger is not None:
        ledger.mark_done(out["id"], None if payloads is None else [bytes(p) for p in payloads])
    if keep_payload and payloads is not None:
        out["payload"] = np.asarray([bytes(p) for p in payloads], dtype=object)
    return out


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[Any]:
    """No Ray Data progress bars or execution banners during a run (ours is one bar over blocks)."""
    import ray.data

    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start)
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    for name, level in (("ray.data", logging.WARNING), ("ray.data._internal.progress", logging.ERROR)):
        logging.getLogger(name).setLevel(level)
    try:
        yield ctx
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def _datasource(segment: list[np.ndarray]) -> Any:
    """A Ray Data datasource with one read task per id batch, each yielding exactly that batch as one block.

    One block per read task keeps Ray Data from merging id batches into bigger blocks (a read task's output
    buffer merges what it yields up to `target_max_block_size`), so a batch is the unit of work downstream."""
    from ray.data import Datasource
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask

    class IdBatches(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return int(sum(8 * len(ids) for ids in segment))

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list:
            return [ReadTask(functools.partial(_one_block, ids),
                             BlockMetadata(num_rows=len(ids), size_bytes=8 * len(ids), exec_stats=None))
                    for ids in segment]

    return IdBatches()


def _one_block(ids: np.ndarray) -> list[Any]:
    from ray.data.block import BlockAccessor

    return [BlockAccessor.batch_to_block({"id": ids})]


def _ray_batches(num_blocks: int, ledger: Ledger | None, stages: list[Stage], size: int,
                 keep_payload: bool) -> Iterator[Batch]:
    """Run the stages over the pending batches, SEGMENT_BATCHES batches per Ray Data execution (so the driver
    holds at most that many id batches, whatever the plan's size)."""
    import ray.data

    batches = pending_batches(num_blocks, ledger, size)
    while True:
        segment = list(itertools.islice(batches, SEGMENT_BATCHES))
        if not segment:
            return
        ds = ray.data.read_datasource(_datasource(segment), num_cpus=0, concurrency=2,
                                      override_num_blocks=len(segment))
        for k, st in enumerate(stages):
            last = k == len(stages) - 1
            common: dict[str, Any] = {"batch_size": None, "num_cpus": st.num_cpus, "zero_copy_batch": True}
            if st.num_gpus:
                common["num_gpus"] = st.num_gpus
            if st.actors:
                if last:
                    raise ValueError("the last stage writes and marks done: make it a task stage, not an actor pool")
                ds = ds.map_batches(st.fn, fn_constructor_kwargs=st.kwargs, **common,
                                    compute=ray.data.ActorPoolStrategy(size=st.actors,
                                                                       max_tasks_in_flight_per_actor=st.prefetch))
            else:
                fn: Any = (functools.partial(_mark_after, fn=st.fn, ledger=ledger, kwargs=st.kwargs,
                                             keep_payload=keep_payload) if last else st.fn)
                ds = ds.map_batches(fn, fn_kwargs=None if last else st.kwargs, **common,
                                    compute=ray.data.TaskPoolStrategy(size=st.concurrency))
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)


def _fused(batch: Batch, stages: list[Stage], ledger: Ledger | None, keep_payload: bool) -> Batch:
    """All task stages of a batch in one Ray task, the last one marking the blocks done."""
    for k, st in enumerate(stages):
        if k == len(stages) - 1:
            batch = _mark_after(batch, st.fn, ledger, st.kwargs, keep_payload)
        else:
            batch = st.fn(batch, **st.kwargs)
    return batch


def _task_batches(num_blocks: int, ledger: Ledger | None, stages: list[Stage], size: int,
                  keep_payload: bool) -> Iterator[Batch]:
    """Stages without actors as plain Ray tasks, one per batch, a bounded number in flight (starts in ms, where a
    Ray Data execution takes seconds: the choice for steps of many short runs, such as export's levels)."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    limit = min(st.concurrency or 2 * cpus for st in stages)
    num_cpus = max(st.num_cpus for st in stages)
    remote = ray.remote(num_cpus=num_cpus, max_retries=3)(_fused)
    stages_ref = ray.put(stages)
    in_flight: list[Any] = []
    for ids in pending_batches(num_blocks, ledger, size):
        if len(in_flight) >= limit:
            ready, in_flight = ray.wait(in_flight, num_returns=1)
            yield ray.get(ready[0])
        in_flight.append(remote.remote({"id": ids}, stages_ref, ledger, keep_payload))
    while in_flight:
        ready, in_flight = ray.wait(in_flight, num_returns=1)
        yield ray.get(ready[0])


def _local_batches(num_blocks: int, ledger: Ledger | None, stages: list[Stage], size: int,
                   keep_payload: bool) -> Iterator[Batch]:
    fns: list[Callable[[Batch], Batch]] = []
    for k, st in enumerate(stages):
        if isinstance(st.fn, type):
            fns.append(st.fn(**st.kwargs))
        elif k == len(stages) - 1:
            fns.append(functools.partial(_mark_after, fn=st.fn, ledger=ledger, kwargs=st.kwargs,
                                         keep_payload=keep_payload))
        else:
            fns.append(functools.partial(st.fn, **st.kwargs))
    for ids in pending_batches(num_blocks, ledger, size):
        batch: Batch = {"id": ids}
        for fn in fns:
            batch = fn(batch)
        yield batch


def run_blocks(
    desc: str,
    num_blocks: int,
    ledger: Ledger | None,
    stages: list[Stage],
    *,
    batch_ids: int,
    on_batch: Callable[[Batch], None] | None = None,
    keep_payload: bool = False,
    executor: Literal["auto", "ray", "tasks", "local"] = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Run every pending block of a grid through `stages`; returns counts and timings.

    `on_batch(batch)` gets each finished batch in the driver (ids, the last stage's stats columns and, with
    `keep_payload`, the payloads). Raises RuntimeError naming how many blocks are done when a stage fails,
    and when the ledger does not hold every block at the end (a run never reports success with blocks missing).
    """
    from tqdm import tqdm

    if not stages:
        raise ValueError("a block run needs at least one stage")
    t0 = time.perf_counter()
    skipped = ledger.count_done(num_blocks) if ledger is not None else 0
    pending = num_blocks - skipped
    log.info("%s: %d blocks, %d done before, %d to compute", desc, num_blocks, skipped, pending)
    computed, first_at = 0, None
    t_pool = time.perf_counter()
    if pending:
        if executor == "auto":
            executor = "ray" if any(st.actors for st in stages) else "tasks"
        run = {"ray": _ray_batches, "tasks": _task_batches, "local": _local_batches}[executor]
        batches = run(num_blocks, ledger, stages, batch_ids, keep_payload)
        ctx = _quiet_ray_data() if executor == "ray" else contextlib.nullcontext()
        with ctx, tqdm(total=pending, unit="block", desc=desc, disable=not progress, mininterval=1.0) as bar:
            try:
                for batch in batches:
                    n = len(batch["id"])
                    computed += n
                    if first_at is None:
                        first_at = time.perf_counter() - t_pool
                    if on_batch is not None:
                        on_batch(batch)
                    bar.update(n)
            except Exception as err:
                done = ledger.count_done(num_blocks) if ledger is not None else computed
                raise RuntimeError(f"{desc} failed with {done}/{num_blocks} blocks done (rerun to resume): "
                                   f"{type(err).__name__}: {err}") from err
    seconds = time.perf_counter() - t_pool
    if ledger is not None:
        done = ledger.count_done(num_blocks)
        if done != num_blocks or computed != pending:
            raise RuntimeError(f"{desc} incomplete: ledger holds {done}/{num_blocks} blocks, {computed} of {pending} "
                               "pending blocks reported; rerun to resume")
        ledger.collect_garbage()
    elif computed != pending:
        raise RuntimeError(f"{desc} incomplete: {computed} of {pending} blocks reported")
    return {"blocks": num_blocks, "computed": computed, "skipped": skipped, "batch_ids": batch_ids,
            "seconds": round(seconds, 3), "blocks_per_s": round(computed / seconds, 1) if computed and seconds else 0.0,
            "seconds_to_first_batch": round(first_at, 3) if first_at is not None else None,
            "total_seconds": round(time.perf_counter() - t0, 3)}
