"""Shared tables for the table-driven arms, one local copy per worker process, synced through Redis.

>>> tables = SharedTables(StoreConfig(redis=RedisConfig(url="redis://127.0.0.1:6379/0")),
...                       fingerprint="0123abcd", vocab_size=8192)
>>> engine = Engine(engine_cfg, resources=tables.resources())   # arms find "ngram_table", "adjacency_table"
>>> tables.stats()["ngram"]["hit_rate"]
0.0
>>> tables.close()                                               # last push, stop the syncer

Redis layout of one namespace `metaspec:tables:v{SCHEMA_VERSION}:{fingerprint}` (values: packed int32):
  :ngram          hash   packed context (1..4 tokens) -> [tok, count, ...] (<= max_continuations pairs)
  :ngram:lru      zset   packed context -> last write time; beyond max_contexts the oldest are evicted
  :adjacency:k{k} hash   packed [token] -> [k next tokens] (-1 = empty), at most vocab_size fields
  :feed           stream one entry per push {t: table, w: worker, k: packed keys}, ~feed_max_entries long
  :meta           hash   epoch: a random id, new whenever the namespace is recreated
Nothing read from Redis is unpickled or evaluated: values are size-checked (max_value_bytes, max_feed_entry_bytes)
before they are unpacked, counts saturate at INT32_MAX, and a malformed key, row or feed entry is skipped and
counted (`stats()["ngram"]["malformed"]`, `["adjacency"]["malformed"]`, `["redis"]["skipped_feed_entries"]`);
a wrong-typed key is deleted (`["redis"]["repaired_keys"]`); push and pull fail independently
(`["redis"]["step_errors"]`); Redis >= 5 is required (`["redis"]["refused"]` says why not), 6 works.
Every key expires after ttl_s without writes. Memory bound with the defaults (measured, 100k contexts of Zipf
text): Redis 7.5 MB n-gram hash + 11 MB LRU index (~190 B per context), adjacency 0.7 MB for 8192 rows, feed
<= 2,000 entries (2.1 MB there); each worker's local copy ~680 B per context including unpushed deltas (68 MB).
"""

from __future__ import annotations

from .adjacency import AdjacencyTable
from .keys import Keys, NgramConfig, RedisConfig, StoreConfig, fingerprint, pack, redact_url, unpack, worker_id
from .ngram import NgramTable, read_corpus, seed
from .sync import Syncer, make_client

__all__ = ["AdjacencyTable", "Keys", "NgramConfig", "NgramTable", "RedisConfig", "SharedTables", "StoreConfig",
           "fingerprint", "make_client", "pack", "read_corpus", "redact_url", "remote_stats", "seed", "unpack",
           "worker_id"]


class SharedTables:
    """Both tables of one model + tokenizer (one `fingerprint`), and the syncer that shares them."""

    def __init__(self, cfg: StoreConfig, fingerprint: str, vocab_size: int) -> None:
        self.cfg = cfg
        self.keys = Keys.for_fingerprint(fingerprint)
        self.ngram = NgramTable(cfg.ngram, vocab_size)
        self.adjacency = AdjacencyTable(vocab_size, cfg.adjacency_k)
        self.worker = worker_id()
        self.syncer = Syncer(cfg, self.keys, [self.ngram, self.adjacency], self.worker)
        self.ngram.request_sync = self.adjacency.request_sync = self.syncer.request

    @classmethod
    def for_model(cls, cfg: StoreConfig, model_dir: str, vocab_size: int, tokenizer_dir: str | None = None):
        return cls(cfg, fingerprint(model_dir, tokenizer_dir), vocab_size)

    def resources(self) -> dict:
        """The ArmContext resources the table-driven arms require."""
        return {"ngram_table": self.ngram, "adjacency_table": self.adjacency}

    def flush(self) -> bool:
        """Push and pull now, from the calling thread; False if Redis is unavailable or a step failed."""
        return self.syncer.sync(force=True)

    def reset(self) -> dict[str, int]:
        """Empty this worker's tables (what they learnt from earlier requests), e.g. so that benchmark passes
        over the same prompts each start from the same state, as vLLM's `/reset_prefix_cache` is used. Only for
        local tables: a shared namespace is re-seeded by every other replica's copy (that is what it is for),
        so resetting one replica there would be a lie; ValueError. Returns {table: rows dropped}."""
        if self.cfg.redis.url is not None:
            raise ValueError("reset is for replica-local tables (tables.redis_url: null); shared tables are "
                             "re-seeded from every replica's copy")
        return {"ngram": self.ngram.clear(), "adjacency": self.adjacency.clear()}

    def stats(self) -> dict:
        return {"namespace": self.keys.ns, "ngram": self.ngram.stats(), "adjacency": self.adjacency.stats(),
                "redis": self.syncer.stats()}

    def close(self) -> None:
        self.syncer.close()


def remote_stats(cfg: StoreConfig, fingerprint: str) -> dict:
    """What one namespace holds in Redis right now (sizes and bytes per key); raises if Redis is unreachable."""
    keys, r = Keys.for_fingerprint(fingerprint), make_client(cfg.redis)
    try:
        names = {"ngram": keys.ngram, "ngram_lru": keys.ngram_lru, "adjacency": keys.adjacency(cfg.adjacency_k),
                 "feed": keys.feed, "meta": keys.meta}
        pipe = r.pipeline(transaction=False)
        pipe.hlen(keys.ngram)
        pipe.hlen(keys.adjacency(cfg.adjacency_k))
        pipe.xlen(keys.feed)
        for key in names.values():
            pipe.memory_usage(key, samples=0)
        contexts, rows, feed, *sizes = pipe.execute()
        return {"namespace": keys.ns, "ngram_contexts": contexts, "adjacency_rows": rows, "feed_entries": feed,
                "bytes": {name: size or 0 for name, size in zip(names, sizes)}}
    finally:
        r.close()
