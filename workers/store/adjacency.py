"""The Token Recycling adjacency table: for every vocabulary entry, the target's top-k next tokens.

Row t holds the top-k of the target's logits the last time t was scored (any verified position, any request,
any worker); rows are overwritten, never reset, and -1 marks an empty slot. Shared through Redis with
last-writer-wins per row: a row is a plain observation, so there is nothing to merge.
Memory: vocab x k int32 in Redis (8192 x 8 -> 256 KiB + hash overhead) and a list per row locally.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # the router's n-gram mirror imports this package: no torch there
    import torch

from .counters import lookup_rates, record_lookup
from .keys import Keys, StoreConfig, pack, unpack


class AdjacencyTable:
    """Local copy of the shared adjacency table.

    >>> table = AdjacencyTable(vocab_size=4, k=2)
    >>> table.update([3], torch.tensor([[0.0, 2.0, 1.0, -1.0]]))
    >>> table.next_tokens(3)
    [1, 2]
    """

    name = "adjacency"

    def __init__(self, vocab_size: int, k: int = 8) -> None:
        self.vocab_size, self.k = vocab_size, k
        self.rows: list[list[int]] = [[] for _ in range(vocab_size)]   # [V] rows of <= k tokens, best first
        self.pending: set[int] = set()
        self.lock = threading.Lock()
        self.request_sync: Callable[[], None] = _no_sync  # set by SharedTables: wakes the background syncer
        self.counters = dict(lookups=0, hits=0, drafted=0, accepted=0, updates=0, pushed=0, pulled=0,
                             malformed=0)   # malformed: keys / rows read from Redis that were skipped

    def next_tokens(self, token: int) -> list[int]:
        """The target's most likely next tokens after `token`, best first (empty if never seen)."""
        return self.rows[token] if 0 <= token < self.vocab_size else []

    def update(self, tokens: list[int], logits: torch.Tensor) -> None:
        """tokens: [T] scored tokens; logits: [T, V'] the target's scores right after each of them."""
        k = min(self.k, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices.tolist()                     # [T, k]
        with self.lock:
            for token, row in zip(tokens, top):
                if 0 <= token < self.vocab_size:
                    self.rows[token] = [t for t in row if t < self.vocab_size]
                    self.pending.add(token)
            self.counters["updates"] += len(tokens)

    def record(self, drafted: int, accepted: int, hit: bool) -> None:
        record_lookup(self.counters, drafted, accepted, hit)

    def copy(self) -> AdjacencyTable:
        """A detached local table with the same rows (nothing pending, no syncer, fresh counters)."""
        out = AdjacencyTable(self.vocab_size, self.k)
        with self.lock:
            out.rows = [list(row) for row in self.rows]
        return out

    def clear(self) -> int:
        """Forget every row and unsent update; returns the number of rows dropped. Counters are kept."""
        with self.lock:
            dropped = sum(1 for row in self.rows if row)
            self.rows, self.pending = [[] for _ in range(self.vocab_size)], set()
        return dropped

    def mark_all_dirty(self) -> None:
        with self.lock:
            self.pending.update(t for t, row in enumerate(self.rows) if row)

    def push(self, r, keys: Keys, cfg: StoreConfig, worker: str) -> int:
        with self.lock:
            tokens, self.pending = sorted(self.pending), set()
            rows = [self.rows[t] for t in tokens]
        key, sent = keys.adjacency(self.k), 0
        try:
            for lo in range(0, len(tokens), cfg.batch_keys):
                batch = tokens[lo: lo + cfg.batch_keys]
                pipe = r.pipeline(transaction=True)
                pipe.hset(key, mapping={pack([t]): pack(_padded(row, self.k))
                                        for t, row in zip(batch, rows[lo: lo + cfg.batch_keys])})
                pipe.xadd(keys.feed, {"t": self.name, "w": worker, "k": pack(batch)},
                          maxlen=cfg.feed_max_entries, approximate=True)
                pipe.expire(key, cfg.ttl_s)
                pipe.expire(keys.feed, cfg.ttl_s)
                pipe.execute()
                sent = lo + len(batch)
        except BaseException:
            with self.lock:
                self.pending.update(tokens[sent:])
            raise
        self.counters["pushed"] += len(tokens)
        return len(tokens)

    def feed_keys(self, data: bytes, cfg: StoreConfig) -> list[int]:
        return [t for t in unpack(data, cfg.max_feed_entry_bytes) if 0 <= t < self.vocab_size]

    def pull_keys(self, r, keys: Keys, cfg: StoreConfig, tokens: list[int]) -> None:
        for lo in range(0, len(tokens), cfg.batch_keys):
            batch = tokens[lo: lo + cfg.batch_keys]
            remote = r.hmget(keys.adjacency(self.k), [pack([t]) for t in batch])
            self._apply(zip(batch, remote))

    def pull_all(self, r, keys: Keys, cfg: StoreConfig) -> None:
        buffer = []   # applied in batches: the lock is never held across a network call, memory stays bounded
        for f, data in r.hscan_iter(keys.adjacency(self.k), count=cfg.batch_keys):
            buffer.append((_token(f), data))
            if len(buffer) >= cfg.batch_keys:
                self._apply(buffer)
                buffer = []
        self._apply(buffer)

    def _apply(self, rows: Iterable[tuple[int, bytes | None]]) -> None:
        """Remote rows replace local ones, except rows changed here and not yet pushed (ours are newer).

        A row must be exactly k int32 (checked before it is unpacked) of tokens in [-1, vocab); anything else is
        skipped and counted.
        """
        n, bad, size = 0, 0, 4 * self.k
        with self.lock:
            for token, data in rows:
                if data is None:
                    continue
                arr = unpack(data) if isinstance(data, bytes) and len(data) == size else []
                if not 0 <= token < self.vocab_size or len(arr) != self.k or \
                        any(not -1 <= t < self.vocab_size for t in arr):
                    bad += 1
                    continue
                if token in self.pending:
                    continue
                self.rows[token] = [t for t in arr if t >= 0]
                n += 1
        self.counters["pulled"] += n
        self.counters["malformed"] += bad

    def stats(self) -> dict:
        c = dict(self.counters)
        return c | {"rows": sum(1 for row in self.rows if row), "pending": len(self.pending)} | lookup_rates(c)


def _token(field: bytes) -> int:
    ids = unpack(field, 4)
    return ids[0] if len(ids) == 1 else -1


def _padded(row: list[int], k: int) -> list[int]:
    return (row + [-1] * k)[:k]


def _no_sync() -> None:
    """A table without Redis has nothing to sync."""
