"""The done-ledger: which blocks of a grid are finished, kept next to the output so reruns resume.

Layout (any tensorstore kvstore: local directory, s3://, gs://)::

    <ledger>/ledger.json                              {"fingerprint", "generation", "describe", "stale"}
    <ledger>/<generation>/<shard>/<lo>-<hi>           blocks lo..hi-1 are done (+ their payloads)

One key marks a whole contiguous run of block ids (a batch of the runner writes one or a few), so a
1e6-block plan leaves ~1e6 / batch keys and resuming lists them shard by shard (SHARD ids per listing
prefix, bounded memory). A key is written only after the blocks' outputs were written; keys of a retried
batch are the same keys with the same bytes. The value holds an optional per-block payload (a stage's
small result: label counts, metric sums, mesh fragment names), so reductions survive a resume.

The fingerprint hashes everything that changes the bytes a block writes. A run under a new fingerprint
(or `reset`) starts a new *generation*: one small write of ledger.json, O(1) before the first block;
markers of older generations are never read again and are deleted by `collect_garbage` after the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Any, Iterator, Sequence

import numpy as np
import tensorstore as ts

from vemscale.io.urls import join_url, kvstore_url, parse_url

log = logging.getLogger(__name__)

SHARD = 1 << 16  # block ids per listing prefix
META_KEY = "ledger.json"
LEDGER_DIR = ".vemscale-ledger"


def fingerprint(describe: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able description of what determines the output bytes."""
    return hashlib.sha256(json.dumps(describe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ledger_url(output_url: str, step: str | None = None) -> str:
    """The kvstore URL of the ledger of an output (a directory inside it; one per step of a multi-step stage)."""
    url = join_url(kvstore_url(parse_url(output_url)), LEDGER_DIR)
    return (join_url(url, step) if step else url) + "/"


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def runs(ids: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Sorted ids -> (lo, hi, start, stop): contiguous runs [lo, hi) split at shard bounds, ids[start:stop]."""
    ids = np.asarray(ids, np.int64)
    if ids.size == 0:
        return []
    cuts = np.flatnonzero((np.diff(ids) != 1) | (np.diff(ids // SHARD) != 0)) + 1
    bounds = [0, *cuts.tolist(), ids.size]
    return [(int(ids[a]), int(ids[b - 1]) + 1, a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def encode_payloads(payloads: Sequence[bytes] | None) -> bytes:
    """[n: int64][n lengths: int64][bytes...]; b'' for no payloads."""
    if not payloads:
        return b""
    lengths = np.asarray([len(p) for p in payloads], np.int64)
    return np.int64(len(payloads)).tobytes() + lengths.tobytes() + b"".join(payloads)


def decode_payloads(value: bytes, n: int) -> list[bytes]:
    if not value:
        return [b""] * n
    count = int(np.frombuffer(value[:8], np.int64)[0])
    lengths = np.frombuffer(value[8 : 8 + 8 * count], np.int64)
    out, pos = [], 8 + 8 * count
    for length in lengths:
        out.append(value[pos : pos + int(length)])
        pos += int(length)
    return out


class Ledger:
    """Done markers of one grid under one generation. Picklable (reopens its kvstore)."""

    def __init__(self, url: str, fp: str, generation: str, fresh: bool = False) -> None:
        self.url, self.fingerprint, self.generation, self.fresh = url, fp, generation, fresh
        self._kv: ts.KvStore | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_kv": None}

    @property
    def kv(self) -> ts.KvStore:
        if self._kv is None:
            self._kv = ts.KvStore.open(self.url).result()
        return self._kv

    @staticmethod
    def _read_meta(kv: ts.KvStore) -> dict[str, Any] | None:
        res = kv.read(META_KEY).result()
        if res.state != "value":
            return None
        try:
            return json.loads(bytes(res.value))
        except ValueError:
            return {}

    @classmethod
    def open(cls, url: str, describe: dict[str, Any], reset: bool = False) -> Ledger:
        """Open the ledger at `url` for a run described by `describe`; a new generation when that changed or on
        reset (O(1): old markers stay until `collect_garbage`)."""
        fp = fingerprint(describe)
        kv = ts.KvStore.open(url).result()
        old = cls._read_meta(kv)
        if old is not None and not reset and old.get("fingerprint") == fp and old.get("generation"):
            ledger = cls(url, fp, old["generation"])
            ledger._kv = kv
            return ledger
        stale = list((old or {}).get("stale", []))
        if old is not None:
            why = "overwrite requested" if reset else "changed: " + ", ".join(_changed(old.get("describe", {}), describe))
            log.info("ledger %s was for another run (%s); starting over", url, why)
            if old.get("generation"):
                stale.append(old["generation"])
        generation = uuid.uuid4().hex[:12]
        meta = {"fingerprint": fp, "generation": generation, "describe": describe, "stale": stale}
        kv.write(META_KEY, json.dumps(meta, indent=1, default=str).encode()).result()
        ledger = cls(url, fp, generation, fresh=True)
        ledger._kv = kv
        return ledger

    @classmethod
    def invalidate(cls, url: str) -> None:
        """Forget every done block (before outputs are deleted, so a kill in between cannot skip blocks)."""
        kv = ts.KvStore.open(url).result()
        old = cls._read_meta(kv)
        if old is not None and old.get("generation"):
            stale = [*old.get("stale", []), old["generation"]]
            kv.write(META_KEY, json.dumps({**old, "generation": None, "stale": stale}, default=str).encode()).result()

    def collect_garbage(self) -> int:
        """Delete the markers of older generations (after a complete run); returns how many were dropped."""
        meta = self._read_meta(self.kv) or {}
        stale = [g for g in meta.get("stale", []) if g != self.generation]
        for g in stale:
            self.kv.delete_range(ts.KvStore.KeyRange(inclusive_min=f"{g}/", exclusive_max=f"{g}0")).result()
        if meta.get("stale"):
            self.kv.write(META_KEY, json.dumps({**meta, "stale": []}, indent=1, default=str).encode()).result()
        return len(stale)

    # --- markers -------------------------------------------------------------------------------------------

    def _prefix(self, shard: int) -> str:
        return f"{self.generation}/{shard:06d}/"

    def mark_done(self, ids: Sequence[int] | np.ndarray, payloads: Sequence[bytes] | None = None) -> int:
        """Record blocks `ids` as finished (with one payload each, optional); call only after their outputs were
        written. Returns the number of keys written."""
        ids = np.asarray(ids, np.int64)
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        if payloads is not None:
            payloads = [payloads[i] for i in order]
        futures = []
        for lo, hi, a, b in runs(ids):
            value = encode_payloads(payloads[a:b]) if payloads is not None else b""
            futures.append(self.kv.write(f"{self._prefix(lo // SHARD)}{lo:015d}-{hi:015d}", value))
        for f in futures:
            f.result()
        return len(futures)

    def _list(self, shard: int) -> ts.Future:
        prefix = self._prefix(shard)
        return self.kv.list(ts.KvStore.KeyRange(inclusive_min=prefix, exclusive_max=prefix[:-1] + "0"),
                            strip_prefix_length=len(prefix))

    @staticmethod
    def _ranges(keys: Sequence[bytes]) -> list[tuple[int, int, str]]:
        out = []
        for k in keys:
            name = bytes(k).decode()
            lo, _, hi = name.partition("-")
            if lo.isdigit() and hi.isdigit():
                out.append((int(lo), int(hi), name))
        return out

    def done_in_shard(self, shard: int) -> np.ndarray:
        """Sorted done ids of one shard (one listing)."""
        parts = [np.arange(lo, hi, dtype=np.int64) for lo, hi, _ in self._ranges(self._list(shard).result())]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def pending(self, start: int, stop: int) -> Iterator[np.ndarray]:
        """Ids in [start, stop) not yet done, one shard at a time (the next shard is listed while this one is used)."""
        if stop <= start:
            return
        first, last = start // SHARD, (stop - 1) // SHARD
        nxt = self._list(first)
        for shard in range(first, last + 1):
            keys = nxt.result()
            if shard < last:
                nxt = self._list(shard + 1)
            lo, hi = max(start, shard * SHARD), min(stop, (shard + 1) * SHARD)
            todo = np.ones(hi - lo, bool)
            for a, b, _ in self._ranges(keys):
                a, b = max(a, lo), min(b, hi)
                if a < b:
                    todo[a - lo : b - lo] = False
            ids = np.flatnonzero(todo).astype(np.int64) + lo
            if ids.size:
                yield ids

    def count_done(self, num_blocks: int, window: int = 16) -> int:
        """Done blocks among ids [0, num_blocks), listing `window` shards concurrently."""
        total, n_shards = 0, -(-num_blocks // SHARD)
        for lo in range(0, n_shards, window):
            futures = [self._list(s) for s in range(lo, min(lo + window, n_shards))]
            for fut in futures:
                end = 0  # keys may overlap (a stale task of a failed run marking ids a rerun marked too): count the union
                for a, b, _ in sorted(self._ranges(fut.result())):
                    a, b = max(a, end), min(b, num_blocks)
                    if b > a:
                        total += b - a
                    end = max(end, b)
        return total

    def is_done(self, index: int) -> bool:
        return bool(np.isin(index, self.done_in_shard(int(index) // SHARD)))

    def payloads(self, num_blocks: int) -> Iterator[tuple[int, bytes]]:
        """(id, payload) of every done block in increasing id, one shard's values at a time (for reductions over a
        resumed run)."""
        for shard in range(-(-num_blocks // SHARD)):
            entries = sorted(self._ranges(self._list(shard).result()))  # listings come in no particular order
            prefix = self._prefix(shard)
            futures = [(a, b, self.kv.read(prefix + name)) for a, b, name in entries]
            end = 0  # each id once where keys overlap (a block's payload is the same whoever wrote it)
            for a, b, fut in futures:
                res = fut.result()
                if res.state != "value":
                    continue
                for i, p in zip(range(a, b), decode_payloads(bytes(res.value), b - a)):
                    if end <= i < num_blocks:
                        yield i, p
                end = max(end, b)


def volume_identity(vol: Any) -> dict[str, Any]:
    """What names a volume's content for the ledger: URL, shape, dtype, and (local files) the metadata's mtime;
    a vemscale infer output adds its ledger generation, so a re-inferred prediction is scored afresh."""
    import os

    from vemscale.io.urls import parse_url

    out: dict[str, Any] = {"url": vol.url, "shape": list(vol.shape), "dtype": str(vol.dtype)}
    parsed = parse_url(vol.url)
    if not parsed.remote:
        path = parsed.location
        for name in ("", ".zarray", "zarr.json", "info", "attributes.json", "0/.zarray", "0/zarr.json"):
            p = os.path.join(path, name) if name else path
            if os.path.isfile(p):
                out.setdefault("mtimes", {})[name or "file"] = os.stat(p).st_mtime_ns
        ledger = os.path.join(os.path.dirname(path.rstrip("/")), LEDGER_DIR, "ledger.json")
        if os.path.isfile(ledger):
            out["producer"] = json.loads(open(ledger).read()).get("generation")
    return out
