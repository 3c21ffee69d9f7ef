"""DecodeWorker: the Ray Serve deployment of one pool's replica, wrapping `Engine`.

Weights and the KV pool load once per replica (in `__init__`). Every request on the replica joins the engine's step
loop (its own thread): one target forward per step scores all of them, each with its own arm. Request setup
(tokenisation, grammar compilation, proposer) runs on a small thread pool and events come back to the event loop
by `call_soon_threadsafe`, so the event loop stays free for health checks and cancellation. A request whose
caller goes away (client cancel, deadline, disconnect) stops at the next step boundary and frees its slot.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ray import serve

from .engine import Chunk, Engine, EngineConfig, Request, Result, timestamped
from .model import ModelConfig
from .scheduler import SchedulerConfig
from .pearl import PearlConfig
from .registry import arms
from .request import WorkerInfo   # torch-free (the router imports it from there); re-exported
from .store import SharedTables, StoreConfig


@dataclass(frozen=True)
class WorkerConfig:
    pool: str                       # the pool this replica belongs to
    engine: EngineConfig            # models and decode settings
    threads: int = 1                # torch intra-op threads of this replica
    store: StoreConfig | None = None  # shared n-gram / recycling tables (Redis-synced); None = no table arms
    pearl: PearlConfig | None = None  # where the PEARL drafter runs (its device, process); None = pearl's defaults
    drafter_bundle: int | None = None  # placement-group bundle holding the PEARL drafter's own device (its GPU is
                                       # found at start, cluster/placement.py); None = no bundle of its own


@dataclass
class WorkerCounters:
    """What this replica did since it started (read by tests and Health)."""

    started: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens: int = 0
    tokenised: int = 0                               # requests whose prompt this replica tokenised (sent as text
                                                     # only: the router sends ids, which are never re-tokenised)
    active: set[str] = field(default_factory=set)   # ids of requests being decoded now
    running: int = 0                                 # requests in the step loop's batch now
    waiting: int = 0                                 # requests waiting for a KV slot now
    steps: int = 0                                   # step-loop forwards so far
    tokens_scored: int = 0                           # tokens those forwards scored
    plain_steps: int = 0                             # of them, steps the draft guard ran without drafts
    acceptance: dict[str, float] = field(default_factory=dict)   # learnt per-token acceptance by draft class
                                                     # ("arm/greedy|sampled/evidence", workers/draft_length.py)


def worker_config(pool: str, target: str, drafter: str | None, tokenizer: str | None = None, dtype: str = "float32",
                  device: str = "cpu", threads: int = 1, k_max: int = 8,
                  store: StoreConfig | None = None, pearl: PearlConfig | None = None,
                  drafter_bundle: int | None = None, batch: SchedulerConfig = SchedulerConfig()) -> WorkerConfig:
    """Build a WorkerConfig from a pool's plain settings."""
    def model(path: str) -> ModelConfig:
        return ModelConfig(path=path, dtype=dtype, device=device, threads=threads)

    engine = EngineConfig(target=model(target), drafter=model(drafter) if drafter else None, tokenizer=tokenizer,
                          k_max=k_max, default_method="ar", batch=batch)
    return WorkerConfig(pool, engine, threads, store, pearl, drafter_bundle)


@serve.deployment(name="DecodeWorker", ray_actor_options={"num_cpus": 1})
class DecodeWorker:
    def __init__(self, cfg: WorkerConfig) -> None:
        import torch

        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.engine = Engine(cfg.engine)
        self.tables = None
        if cfg.store is not None:   # fingerprinted by model + tokenizer: replicas of one model pair share tables
            self.tables = SharedTables.for_model(cfg.store, cfg.engine.target.path, self.engine.target.vocab_size,
                                                 cfg.engine.tokenizer)
            self.engine.resources.update(self.tables.resources())
        if cfg.pearl is not None:
            self.engine.resources["pearl_config"] = _placed(cfg.pearl, cfg.drafter_bundle)
        self.counters = WorkerCounters()
        # Setup threads: a grammar may take its whole compile_timeout_s, and a few slow ones must not hold up the
        # setup of every other request.
        self._setup = ThreadPoolExecutor(max_workers=max(8, cfg.engine.batch.max_batch),
                                         thread_name_prefix=f"setup-{cfg.pool}")

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.cfg.pool, tuple(self.engine.available_methods()), self.engine.target.max_context,
                          self.engine.target.vocab_size)

    def __del__(self) -> None:   # Serve calls it on graceful replica shutdown
        if getattr(self, "tables", None) is not None:
            self.tables.close()
        if getattr(self, "engine", None) is not None:
            self.engine.close()

    def ping(self) -> str:
        return self.cfg.pool

    def stats(self) -> WorkerCounters:
        m, load = self.engine.scheduler.metrics, self.engine.scheduler.load
        c = self.counters
        c.running, c.waiting, c.steps, c.tokens_scored = load["running"], load["waiting"], m.steps, m.tokens_scored
        c.plain_steps, c.acceptance = m.plain_steps, self.engine.scheduler.book.rates()
        return c

    def table_stats(self) -> dict | None:
        return self.tables.stats() if self.tables is not None else None

    def reset_tables(self) -> dict[str, int] | None:
        """Empty this replica's local n-gram and recycling tables (SharedTables.reset); None without tables."""
        return self.tables.reset() if self.tables is not None else None

    async def generate(self, request: Request, request_id: str = "") -> Result:
        """The whole request; raises RequestError on a request this worker cannot serve."""
        async with aclosing(self.stream(request, request_id)) as items:
            async for item in items:
                if isinstance(item, Result):
                    return item
        raise AssertionError("engine stream ended without a Result")

    async def stream(self, request: Request, request_id: str = "") -> AsyncIterator[Chunk | Result]:
        """Chunks as tokens are verified, then one Result (call with `handle.options(stream=True)`)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        t_start = time.perf_counter()
        if request.prompt_ids is None:
            self.counters.tokenised += 1
        setup = loop.run_in_executor(self._setup, self.engine.submit, request, _sink(loop, events))
        try:
            s = await asyncio.shield(setup)
        except asyncio.CancelledError:   # the caller left during setup: the request must not run unconsumed
            setup.add_done_callback(lambda f: f.exception() is None and self.engine.cancel(f.result()))
            self.counters.started += 1
            self.counters.cancelled += 1
            raise
        except Exception:
            self.counters.started += 1
            self.counters.failed += 1
            raise
        out = self.engine.output(request, s, t_start)
        key = request_id or str(id(s))
        self.counters.started += 1
        self.counters.active.add(key)
        outcome = "cancelled"   # unless it finishes or fails: cancelled by the caller
        try:
            while out.running:
                t, event = await events.get()
                outcome = "failed" if event[0] == "error" else outcome
                if (chunk := out.take(t, event)) is not None:
                    yield chunk
            for item in out.finish():
                if isinstance(item, Result):
                    self.counters.tokens += len(item.token_ids)
                    outcome = "finished"
                yield item
        finally:
            if not out.ended:
                self.engine.cancel(s)
            self.counters.active.discard(key)
            setattr(self.counters, outcome, getattr(self.counters, outcome) + 1)


def _sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
    """The step loop's events onto the caller's event loop (raises once that loop is closed: the loop cancels)."""
    return timestamped(lambda event: loop.call_soon_threadsafe(events.put_nowait, event))


def _placed(pearl: PearlConfig, bundle: int | None) -> PearlConfig:
    """The PEARL config with the drafter process given the GPU Ray reserved in its own bundle (if any)."""
    if bundle is None:
        return pearl
    from metaspec.cluster.placement import drafter_visible_devices

    return replace(pearl, drafter_visible_devices=drafter_visible_devices(bundle))


def registered_methods() -> dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str]]:
    """Every registered arm: name -> (description, required resources, placement needs, what it drafts with)."""
    return {name: (arm.description, tuple(sorted(arm.requires)), tuple(sorted(arm.placement)), arm.drafts)
            for name, arm in sorted(arms().items())}
