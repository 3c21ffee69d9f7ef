"""The shared tables in `metaspec bench`: the table-driven arms (ngram_store, recycling) run cold and warm.

cold: every run starts from empty tables (the arm learns only within its own request).
warm: every run starts from a copy of its category's tables, filled by one earlier pass over *other* prompts of
the same category, as if other workers had served that traffic. With `redis_url` that pass goes through Redis:
one SharedTables (the "other worker") learns and pushes, a second pulls, and the warm runs start from what it
pulled; the bench namespaces are deleted afterwards. Runs never teach the tables (the bench engine's
learn_emitted is off), so no arm drafts from another arm's output of the same prompt.

>>> warm = warm_tables(engine, {"humaneval": [ids_a, ids_b]}, params, redis_url=None)
>>> warm["humaneval"].size()
{'contexts': 412, 'rows': 131}
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from metaspec.prompts import Prompt
from metaspec.workers.engine import Engine, Request
from metaspec.workers.registry import arms
from metaspec.workers.store import AdjacencyTable, NgramConfig, NgramTable, RedisConfig, SharedTables, StoreConfig
from metaspec.workers.types import SamplingParams

MODES = ("cold", "warm")
TABLE_RESOURCES = frozenset({"ngram_table", "adjacency_table"})


@dataclass(frozen=True)
class Tables:
    ngram: NgramTable
    adjacency: AdjacencyTable

    @classmethod
    def empty(cls, vocab_size: int) -> Tables:
        return cls(NgramTable(NgramConfig(), vocab_size), AdjacencyTable(vocab_size))

    def copy(self) -> Tables:
        return Tables(self.ngram.copy(), self.adjacency.copy())

    def resources(self) -> dict:
        return {"ngram_table": self.ngram, "adjacency_table": self.adjacency}

    def size(self) -> dict[str, int]:
        return {"contexts": len(self.ngram.rows), "rows": sum(1 for row in self.adjacency.rows if row)}


def table_arms(methods: list[str]) -> list[str]:
    """The methods that draft from a shared table (they run once per mode)."""
    table = arms()
    return [m for m in methods if table[m].requires & TABLE_RESOURCES]


def warm_prompts(prompts: list[Prompt], measured: list[Prompt], n_per_category: int, seed: int
                 ) -> dict[str, list[Prompt]]:
    """Per measured category, up to n prompts of that category that are not measured, chosen by seed (a category
    with no other prompt is left out: its warm runs start empty)."""
    taken = {p.prompt_id for p in measured}
    out = {}
    for category in dict.fromkeys(p.category for p in measured):
        pool = [p for p in prompts if p.category == category and p.prompt_id not in taken]
        rng = random.Random(f"warm/{seed}/{category}")
        if chosen := sorted(rng.sample(pool, min(n_per_category, len(pool))), key=pool.index):
            out[category] = chosen
    return out


def fill(engine: Engine, tables: Tables, prompts: list[list[int]], params: SamplingParams) -> None:
    """One pass of `recycling` runs: the adjacency table learns the target's top-k at every scored position, and
    the n-gram table learns each run's emitted tokens (what a serving engine teaches it at request end)."""
    engine.resources.update(tables.resources())
    for ids in prompts:
        result = engine.generate(Request(prompt_ids=tuple(ids), params=params, method="recycling"))
        tables.ngram.learn(list(ids), result.token_ids)


def warm_tables(engine: Engine, prompts: dict[str, list[list[int]]], params: SamplingParams,
                redis_url: str | None, progress: Callable[[str], None] = lambda category: None) -> dict[str, Tables]:
    """Per category, the tables one pass over its warm prompts leaves (through Redis when redis_url is set)."""
    out = {}
    for category, ids in prompts.items():
        vocab = engine.target.vocab_size
        if redis_url is None:
            out[category] = Tables.empty(vocab)
            fill(engine, out[category], ids, params)
        else:
            out[category] = _through_redis(engine, ids, params, RedisConfig(url=redis_url), vocab)
        progress(category)
    engine.resources.update(Tables.empty(engine.target.vocab_size).resources())
    return out


def _through_redis(engine: Engine, prompts: list[list[int]], params: SamplingParams, redis: RedisConfig,
                   vocab: int) -> Tables:
    cfg = StoreConfig(redis=redis, sync_interval_s=3600)   # synced explicitly here
    fp = f"bench-{uuid.uuid4().hex[:12]}"                  # a namespace of its own, deleted at the end
    writer = SharedTables(cfg, fp, vocab)
    try:
        fill(engine, Tables(writer.ngram, writer.adjacency), prompts, params)
        _flush(writer)
        reader = SharedTables(cfg, fp, vocab)
        try:
            _flush(reader)
            return Tables(reader.ngram.copy(), reader.adjacency.copy())
        finally:
            reader.close()
    finally:
        writer.close()
        _delete(cfg, writer)


def _flush(tables: SharedTables) -> None:
    if not tables.flush():
        raise OSError(f"Redis for the warm tables is unreachable: {tables.stats()['redis']['last_error']}")


def _delete(cfg: StoreConfig, tables: SharedTables) -> None:
    from metaspec.workers.store import make_client

    try:
        client = make_client(cfg.redis)
        client.delete(*tables.keys.all(cfg.adjacency_k))
        client.close()
    except Exception:  # best effort: the keys also expire after ttl_s
        pass
