"""The done-ledger: which blocks of a plan are finished, kept next to the output so reruns resume.

Layout (any tensorstore kvstore: local directory, s3://, gs://)::

    <ledger>/ledger.json                       {"fingerprint": ..., "describe": {...}} of the current run
    <ledger>/<fingerprint>/<index // SHARD>/<index>   one empty-ish marker per finished block

A marker is written only after the block's outputs were written, by the worker that wrote them; each
block has its own key, so concurrent writers never conflict and a retried block rewrites the same key.
The fingerprint hashes everything that changes the bytes a block writes (block geometry, checkpoint
weights, mode, output layout...), and markers live under it, so a stale marker can never be read as
done for another configuration. A changed fingerprint clears the ledger (with a log line saying what
changed). Lookups list one shard of at most SHARD keys at a time: memory stays bounded for any plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Iterator

import numpy as np
import tensorstore as ts

from vemscale.io.urls import join_url, kvstore_url, parse_url

log = logging.getLogger(__name__)

SHARD = 4096  # markers per listing prefix
META_KEY = "ledger.json"
LEDGER_DIR = ".vemscale-ledger"


def fingerprint(describe: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able description of what determines the output bytes."""
    return hashlib.sha256(json.dumps(describe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ledger_url(output_url: str) -> str:
    """The kvstore URL of the ledger of an output (a directory inside it)."""
    return join_url(kvstore_url(parse_url(output_url)), LEDGER_DIR) + "/"


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


class Ledger:
    """Done markers of one plan under one fingerprint. Picklable (reopens its kvstore)."""

    def __init__(self, url: str, fp: str) -> None:
        self.url = url
        self.fingerprint = fp
        self._kv: ts.KvStore | None = None

    def __getstate__(self) -> dict:
        return {"url": self.url, "fingerprint": self.fingerprint, "_kv": None}

    @property
    def kv(self) -> ts.KvStore:
        if self._kv is None:
            self._kv = ts.KvStore.open(self.url).result()
        return self._kv

    @classmethod
    def open(cls, url: str, describe: dict[str, Any], reset: bool = False) -> Ledger:
        """Open the ledger at `url` for a run described by `describe`; clear it when that changed or on reset."""
        fp = fingerprint(describe)
        ledger = cls(url, fp)
        res = ledger.kv.read(META_KEY).result()
        old = None
        if res.state == "value":
            try:
                old = json.loads(bytes(res.value))
            except ValueError:
                old = {}
        if old is not None and (reset or old.get("fingerprint") != fp):
            why = "overwrite requested" if reset else "changed: " + ", ".join(_changed(old.get("describe", {}), describe))
            log.info("ledger %s was for another run (%s); starting over", url, why)
            ledger.clear()
            old = None
        if old is None:
            ledger.kv.write(META_KEY, json.dumps({"fingerprint": fp, "describe": describe}, indent=1, default=str).encode()).result()
        return ledger

    def clear(self) -> None:
        """Delete every marker (and the metadata) of every fingerprint."""
        self.kv.delete_range(ts.KvStore.KeyRange()).result()

    def _key(self, index: int) -> str:
        return f"{self.fingerprint}/{index // SHARD}/{index}"

    def _shard_range(self, shard: int) -> ts.KvStore.KeyRange:
        prefix = f"{self.fingerprint}/{shard}/"
        return ts.KvStore.KeyRange(inclusive_min=prefix, exclusive_max=prefix[:-1] + "0")  # '0' follows '/'

    def mark_done(self, index: int, info: dict[str, Any] | None = None) -> None:
        """Record block `index` as finished; call only after its outputs were written."""
        self.kv.write(self._key(int(index)), json.dumps(info or {}).encode()).result()

    def is_done(self, index: int) -> bool:
        return self.kv.read(self._key(int(index))).result().state == "value"

    def _list_shard(self, shard: int) -> ts.Future:
        return self.kv.list(self._shard_range(shard), strip_prefix_length=len(f"{self.fingerprint}/{shard}/"))

    def done_mask(self, ids: np.ndarray) -> np.ndarray:
        """For each block id, whether it is done (one listing per shard the ids touch)."""
        ids = np.asarray(ids, np.int64)
        mask = np.zeros(ids.shape, bool)
        if ids.size == 0:
            return mask
        shards = ids // SHARD
        for shard in np.unique(shards):
            done = np.fromiter((int(k) for k in self._list_shard(int(shard)).result()), np.int64)
            sel = shards == shard
            mask[sel] = np.isin(ids[sel], done)
        return mask

    def pending(self, start: int, stop: int, batch: int = SHARD) -> Iterator[np.ndarray]:
        """Ids in [start, stop) not yet done, in arrays of at most `batch` (no more than one shard listed at a time)."""
        for lo in range(start, stop, batch):
            ids = np.arange(lo, min(lo + batch, stop), dtype=np.int64)
            todo = ids[~self.done_mask(ids)]
            if todo.size:
                yield todo

    def count_done(self, num_blocks: int, window: int = 16) -> int:
        """Markers among ids [0, num_blocks), listing `window` shards concurrently."""
        total, n_shards = 0, -(-num_blocks // SHARD)
        for lo in range(0, n_shards, window):
            futures = [(s, self._list_shard(s)) for s in range(lo, min(lo + window, n_shards))]
            for s, fut in futures:
                keys = fut.result()
                if (s + 1) * SHARD <= num_blocks:
                    total += len(keys)
                else:
                    total += sum(1 for k in keys if int(k) < num_blocks)
        return total
