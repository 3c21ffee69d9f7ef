"""The corpus n-gram table: next-token counts keyed by the last n tokens (n = max_order..min_order).

Learned only from emitted (verified) tokens, optionally seeded from a corpus. A row is a flat list
`[tok, count, tok, count, ...]` sorted by count (descending; ties keep their first-learned order), at most
`max_continuations` pairs. The local copy serves lookups without a lock or a network call; `push`/`pull_*` run in
the background syncer (sync.py).

Concurrency: a push reads the remote rows it changes, adds its own deltas and writes them back in one
transaction; two workers pushing the same context within that round trip can lose one side's increments.
Counts only rank drafts, and verification keeps the output exact, so that is an accepted approximation.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from .counters import lookup_rates, record_lookup
from .keys import INT32_MAX, Keys, NgramConfig, StoreConfig, pack, saturating_add, unpack

Context = tuple[int, ...]


def add_count(row: list[int], token: int, count: int, cap: int) -> None:
    """Add `count` to `token` in a flat sorted row in place.

    A new token on a full row takes the last slot: the top cap-1 continuations are stable, the last one is the
    most recent newcomer until it earns its place.
    """
    for i in range(0, len(row), 2):
        if row[i] == token:
            row[i + 1] = saturating_add(row[i + 1], count)
            break
    else:
        if len(row) >= 2 * cap:
            del row[-2:]
        row += [token, min(count, INT32_MAX)]
        i = len(row) - 2
    while i >= 2 and row[i + 1] > row[i - 1]:  # bubble up: keep counts descending
        row[i - 2: i + 2] = row[i: i + 2] + row[i - 2: i]
        i -= 2


def merge_rows(base: list[int], delta: dict[int, int] | None, cap: int) -> list[int]:
    """base (flat sorted row) + delta counts: the `cap` highest totals (saturating at INT32_MAX), ties in
    base-then-delta order."""
    if not delta:
        return list(base)
    totals = dict(zip(base[0::2], base[1::2]))
    for token, count in delta.items():
        totals[token] = saturating_add(totals.get(token, 0), count)
    top = sorted(totals.items(), key=lambda tc: -tc[1])[:cap]   # stable sort keeps first-seen order on ties
    return [x for pair in top for x in pair]


def row_from_bytes(data: bytes | None, vocab_size: int, cap: int, max_bytes: int | None = None) -> list[int] | None:
    """Decode a packed row; None when it is not a well-formed row (too large, odd length, bad or repeated token,
    count <= 0). The size is checked before anything is unpacked."""
    arr = unpack(data, max_bytes)
    if not arr or len(arr) % 2:
        return None
    tokens, counts = arr[0::2], arr[1::2]
    if min(tokens) < 0 or max(tokens) >= vocab_size or min(counts) <= 0 or len(set(tokens)) != len(tokens):
        return None
    if len(tokens) <= cap and all(a >= b for a, b in zip(counts, counts[1:])):
        return arr
    top = sorted(zip(tokens, counts), key=lambda tc: -tc[1])[:cap]
    return [x for pair in top for x in pair]


def pack_contexts(contexts: Iterable[Context]) -> bytes:
    """[n, c1..cn, n, c1..cn, ...] as packed int32 (a feed entry's key list)."""
    return pack([x for ctx in contexts for x in (len(ctx), *ctx)])


def unpack_contexts(data: bytes, max_order: int, max_bytes: int | None = None) -> list[Context]:
    """Inverse of `pack_contexts`; stops at the first malformed context ([] for an oversized list)."""
    arr, out, i = unpack(data, max_bytes), [], 0
    while i < len(arr):
        n = arr[i]
        if not 1 <= n <= max_order or i + 1 + n > len(arr):
            break
        out.append(tuple(arr[i + 1: i + 1 + n]))
        i += 1 + n
    return out


class NgramTable:
    """Local copy of the shared n-gram table.

    >>> table = NgramTable(NgramConfig(), vocab_size=100)
    >>> table.learn([5, 6], [7, 8, 5, 6, 7])
    >>> table.continuations([1, 5, 6])      # longest match: (5, 6) -> 7 (seen twice)
    [7]
    """

    name = "ngram"

    def __init__(self, cfg: NgramConfig, vocab_size: int) -> None:
        self.cfg, self.vocab_size = cfg, vocab_size
        self.rows: OrderedDict[Context, list[int]] = OrderedDict()   # least recently learned first
        self.pending: dict[Context, dict[int, int]] = {}             # counts not yet in Redis
        self.lock = threading.Lock()
        self.request_sync: Callable[[], None] = _no_sync  # set by SharedTables: wakes the background syncer
        self.counters = dict(lookups=0, hits=0, drafted=0, accepted=0, learned_tokens=0, pushed=0, pulled=0,
                             malformed=0)   # malformed: keys / rows read from Redis that were skipped

    # -- hot path (request thread) -------------------------------------------------------------------
    def continuations(self, seq: list[int] | tuple[int, ...], backoff: bool = False) -> list[int]:
        """Next tokens after the longest context of `seq` present in the table, most frequent first.

        `backoff` appends the shorter contexts' continuations not already listed (more siblings for a tree).
        """
        rows, out = self.rows, []
        for n in range(min(self.cfg.max_order, len(seq)), self.cfg.min_order - 1, -1):
            row = rows.get(tuple(seq[-n:]))
            if row:
                if not backoff:
                    return row[0::2]
                out += [t for t in row[0::2] if t not in out]
        return out

    def following(self, context: list[int] | tuple[int, ...]) -> list[int]:
        """Next tokens after exactly this context (no shorter match), most frequent first."""
        row = self.rows.get(tuple(context))
        return row[0::2] if row else []

    def learn(self, context: list[int], emitted: list[int]) -> None:
        """Count every emitted token after each of its 1..max_order preceding tokens (context may precede)."""
        order, cap = self.cfg.max_order, self.cfg.max_continuations
        tokens = list(context[-order:]) + list(emitted)
        start = len(tokens) - len(emitted)
        with self.lock:
            for j in range(start, len(tokens)):
                token = tokens[j]
                for n in range(self.cfg.min_order, min(order, j) + 1):
                    ctx = tuple(tokens[j - n: j])
                    add_count(self._row(ctx), token, 1, cap)
                    delta = self.pending.setdefault(ctx, {})
                    delta[token] = delta.get(token, 0) + 1
            self.counters["learned_tokens"] += len(emitted)
            self._bound()

    def record(self, drafted: int, accepted: int, hit: bool) -> None:
        record_lookup(self.counters, drafted, accepted, hit)

    def copy(self) -> NgramTable:
        """A detached local table with the same rows (nothing pending, no syncer, fresh counters)."""
        out = NgramTable(self.cfg, self.vocab_size)
        with self.lock:
            out.rows = OrderedDict((ctx, list(row)) for ctx, row in self.rows.items())
        return out

    def clear(self) -> int:
        """Forget every learnt row and unsent delta (readers holding the old rows finish on them); returns the
        number of contexts dropped. Counters are kept."""
        with self.lock:
            dropped = len(self.rows)
            self.rows, self.pending = OrderedDict(), {}
        return dropped

    def _row(self, ctx: Context) -> list[int]:
        row = self.rows.get(ctx)
        if row is None:
            row = self.rows[ctx] = []
        else:
            self.rows.move_to_end(ctx)
        return row

    def _bound(self) -> None:
        while len(self.rows) > self.cfg.max_contexts:
            self.rows.popitem(last=False)
        while len(self.pending) > self.cfg.max_contexts:  # Redis down for long: keep the newest deltas
            del self.pending[next(iter(self.pending))]

    # -- background syncer -------------------------------------------------------------------------------
    def mark_all_dirty(self) -> None:
        """Redis lost the namespace: re-send every local row as a delta."""
        with self.lock:
            for ctx, row in self.rows.items():
                delta = self.pending.setdefault(ctx, {})
                for token, count in zip(row[0::2], row[1::2]):
                    delta[token] = max(delta.get(token, 0), count)

    def push(self, r, keys: Keys, cfg: StoreConfig, worker: str) -> int:
        """Merge pending deltas into Redis (read, add, write in one transaction per batch); returns contexts sent."""
        with self.lock:
            pending, self.pending = self.pending, {}
        items, sent, size = list(pending.items()), 0, 0
        try:
            for lo in range(0, len(items), cfg.batch_keys):
                size = self._push_batch(r, keys, cfg, worker, items[lo: lo + cfg.batch_keys])
                sent = lo + cfg.batch_keys
        except BaseException:
            with self.lock:  # give the unsent deltas back (newer local deltas merged on top)
                for ctx, delta in items[sent:]:
                    mine = self.pending.setdefault(ctx, {})
                    for token, count in delta.items():
                        mine[token] = mine.get(token, 0) + count
            raise
        self.counters["pushed"] += len(items)
        if size > self.cfg.max_contexts:  # evict the least recently written contexts
            evicted = [m for m, _ in r.zpopmin(keys.ngram_lru, size - self.cfg.max_contexts)]
            if evicted:
                r.hdel(keys.ngram, *evicted)
        return len(items)

    def _push_batch(self, r, keys: Keys, cfg: StoreConfig, worker: str, batch) -> int:
        cap = self.cfg.max_continuations
        fields = [pack(ctx) for ctx, _ in batch]
        remote = r.hmget(keys.ngram, fields)
        rows = self._decode(remote, cfg)        # a malformed remote row is overwritten by ours (and counted)
        merged = {f: merge_rows(row or [], delta, cap) for f, row, (_, delta) in zip(fields, rows, batch)}
        pipe = r.pipeline(transaction=True)
        pipe.hset(keys.ngram, mapping={f: pack(row) for f, row in merged.items()})
        pipe.zadd(keys.ngram_lru, dict.fromkeys(fields, time.time()))
        pipe.xadd(keys.feed, {"t": self.name, "w": worker, "k": pack_contexts(ctx for ctx, _ in batch)},
                  maxlen=cfg.feed_max_entries, approximate=True)
        pipe.zcard(keys.ngram_lru)
        for key in (keys.ngram, keys.ngram_lru, keys.feed):
            pipe.expire(key, cfg.ttl_s)
        size = pipe.execute()[3]
        self._apply(((ctx, row) for (ctx, _), row in zip(batch, merged.values())), count=False)
        return size

    def feed_keys(self, data: bytes, cfg: StoreConfig) -> list[Context]:
        return unpack_contexts(data, self.cfg.max_order, cfg.max_feed_entry_bytes)

    def pull_keys(self, r, keys: Keys, cfg: StoreConfig, contexts: list[Context]) -> None:
        for lo in range(0, len(contexts), cfg.batch_keys):
            batch = contexts[lo: lo + cfg.batch_keys]
            remote = r.hmget(keys.ngram, [pack(ctx) for ctx in batch])
            self._apply(zip(batch, self._decode(remote, cfg)))

    def pull_all(self, r, keys: Keys, cfg: StoreConfig) -> None:
        order, buffer, bad = self.cfg.max_order, [], 0
        for field_, data in r.hscan_iter(keys.ngram, count=cfg.batch_keys):
            ctx = tuple(unpack(field_, 4 * order))
            if not 1 <= len(ctx) <= order:
                bad += 1
                continue
            buffer.append((ctx, data))
            if len(buffer) >= cfg.batch_keys:
                self._apply(zip([c for c, _ in buffer], self._decode([d for _, d in buffer], cfg)))
                buffer = []
        self._apply(zip([c for c, _ in buffer], self._decode([d for _, d in buffer], cfg)))
        self.counters["malformed"] += bad

    def _decode(self, values: list, cfg: StoreConfig) -> list[list[int] | None]:
        """Rows of fetched values (None: absent or malformed; malformed ones are counted)."""
        cap, out = self.cfg.max_continuations, []
        for data in values:
            row = row_from_bytes(data, self.vocab_size, cap, cfg.max_value_bytes)
            self.counters["malformed"] += data is not None and row is None
            out.append(row)
        return out

    def _apply(self, rows: Iterable[tuple[Context, list[int] | None]], count: bool = True) -> None:
        """Remote rows replace local ones (plus any delta learned since); malformed rows are skipped.

        Callers pass rows already fetched and decoded: the lock is never held across a network call.
        """
        cap, n, bad = self.cfg.max_continuations, 0, 0
        with self.lock:
            for ctx, row in rows:
                if row is None:
                    continue
                if any(not 0 <= t < self.vocab_size for t in ctx):
                    bad += 1
                    continue
                self.rows[ctx] = merge_rows(row, self.pending.get(ctx), cap)
                self.rows.move_to_end(ctx)
                n += 1
            self._bound()
        self.counters["pulled"] += n if count else 0
        self.counters["malformed"] += bad

    def stats(self) -> dict:
        c = dict(self.counters)
        return c | {"contexts": len(self.rows), "pending": len(self.pending)} | lookup_rates(c)


def read_corpus(path: str | Path, tokenizer=None) -> Iterable[list[int]]:
    """Documents of token ids from a corpus file.

    `.jsonl`: one object per line with "ids" (list of ints) or "text". Any other file: one document per line,
    either whitespace-separated token ids or text. Text needs `tokenizer` (an HF tokenizer).
    """
    path = Path(path)
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                row = json.loads(line)
                ids, text = row.get("ids"), row.get("text")
            else:
                parts = line.split()
                numeric = all(p.lstrip("-").isdigit() for p in parts)
                ids, text = ([int(p) for p in parts], None) if numeric else (None, line)
            if ids is None:
                if tokenizer is None:
                    raise ValueError(f"{path} holds text: seeding it needs a tokenizer")
                ids = tokenizer.encode(text, add_special_tokens=False)
            yield [int(t) for t in ids]


def seed(table: NgramTable, documents: Iterable[list[int]]) -> int:
    """Learn every document (as if emitted); returns tokens learned. Seed from one process: counts add up."""
    n = 0
    for doc in documents:
        doc = [t for t in doc if 0 <= t < table.vocab_size]
        table.learn([], doc)
        n += len(doc)
    return n


def _no_sync() -> None:
    """A table without Redis has nothing to sync."""
