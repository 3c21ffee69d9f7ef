"""One replica's decoding engine: loads target, drafter and tokenizer once and runs the step loop over them.

Every request keeps its own arm; the replica's scheduler (workers/scheduler.py) scores all running requests in one
target forward per step. Request setup (tokenisation, grammar compilation, the arm's proposer and any drafter
lease) runs in the submitting thread, off the step loop: a slow grammar delays its own request only. Text
(detokenisation, stop strings) is assembled on the consumer side (`Output`), also off the loop.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .constraint import ConstraintConfig, GrammarCompiler
from .budget import AttentionCost, CostCurve
from .detokenize import Detokenizer
from .lean import LeanPool
from .model import Model, ModelConfig, load_model
from .registry import ArmContext, arms, build
from .request import Chunk, Request, RequestStats, Result   # torch-free (the router's view); re-exported
from .sampling import Noise, new_seed
from .scheduler import QueueFull, Scheduler, SchedulerConfig, Sequence
from .types import RequestError

__all__ = ["Chunk", "Engine", "EngineConfig", "Output", "QueueFull", "Request", "Result", "timestamped"]


@dataclass(frozen=True)
class EngineConfig:
    target: ModelConfig                      # the model whose distribution is served
    drafter: ModelConfig | None = None       # small model sharing the target's tokenizer (sps, pearl)
    tokenizer: str | None = None             # tokenizer path; None = the target's
    k_max: int = 8                           # longest draft any arm may propose in one step
    default_method: str = "sps"              # arm used when a request names none and no selector is attached
    constraints: ConstraintConfig = ConstraintConfig()  # grammar compile limits, cache, fast-forward
    learn_emitted: bool = True               # at request end, teach resources["ngram_table"] (if any) the emitted
                                             # tokens, whatever the arm; off where runs must not see each other (bench)
    batch: SchedulerConfig = SchedulerConfig()  # KV pool size, chunked prefill, step budget, waiting queue


def _stop_loop(stop: threading.Event, loop: threading.Thread, timeout_s: float = 10.0) -> None:
    stop.set()
    if loop is not threading.current_thread():
        loop.join(timeout_s)


class Engine:
    def __init__(self, cfg: EngineConfig, resources: dict[str, Any] | None = None) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.target.path)
        self.target: Model = load_model(cfg.target)
        self.drafter: Model | None = load_model(cfg.drafter) if cfg.drafter else None
        self.resources = dict(resources or {})
        eos = self.tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.grammars = GrammarCompiler(self.tokenizer, self.target.vocab_size, self.eos_ids, cfg.constraints)
        if cfg.default_method not in arms():
            raise ValueError(f"default_method {cfg.default_method!r} is not a registered arm")
        slots = pool_slots(self.target, cfg.batch)
        self.pool = self.target.pool(slots, cfg.batch.slot_tokens)            # the replica's KV memory, once
        self.drafter_pool = self.drafter.pool(slots, cfg.batch.slot_tokens) if self.drafter else None
        self.scheduler = Scheduler(Noise(self.target.device), self.eos_ids, cfg.batch, cfg.k_max)
        if cfg.batch.draft_budget:   # the forward's cost against tokens scored, on this replica's hardware
            self.scheduler.curve = CostCurve.measure(self.pool, self.target.vocab_size)
            if isinstance(self.pool, LeanPool):   # the forward whose attention calls drafts change (lean.py)
                self.scheduler.attention = AttentionCost.measure(self.pool, self.target.vocab_size,
                                                                 self.scheduler.curve)
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self.scheduler.run, args=(self._stop,), daemon=True,
                                      name="metaspec-step-loop")
        self._loop.start()
        # An engine dropped or still open at interpreter exit stops its loop first: a daemon thread left inside a
        # forward while the interpreter tears down the libraries it runs in can crash the exiting process.
        self._closer = weakref.finalize(self, _stop_loop, self._stop, self._loop)

    def close(self) -> None:
        """Stop the step loop (requests still running end with an error)."""
        self._closer()

    def available_methods(self) -> list[str]:
        return [name for name, arm in arms().items()
                if all(getattr(self, r, None) is not None or r in self.resources for r in arm.requires)]

    def memory(self) -> dict[str, Any]:
        """KV pool slots and memory per device (bytes), allocated once at start."""
        out: dict[str, Any] = {"slots": self.pool.slots, "free_slots": self.pool.free, "kv_bytes": {}}
        for pool, model in ((self.pool, self.target), (self.drafter_pool, self.drafter)):
            if pool is not None:
                dev = str(model.device)
                out["kv_bytes"][dev] = out["kv_bytes"].get(dev, 0) + getattr(pool, "mem_bytes", 0)
        return out

    def encode(self, request: Request) -> list[int]:
        if request.prompt_ids is not None:
            ids = list(request.prompt_ids)
            if any(not isinstance(t, int) or not 0 <= t < self.target.vocab_size for t in ids):
                raise RequestError(f"prompt_ids must be token ids in [0, {self.target.vocab_size})")
        else:
            ids = self.tokenizer.encode(request.prompt or "", add_special_tokens=False)
        if not ids:
            raise RequestError("prompt is empty")
        limit = min(self.target.max_context, self.pool.slot_tokens)
        if len(ids) >= limit:
            raise RequestError(f"prompt has {len(ids)} tokens; this replica serves contexts up to {limit}")
        return ids

    def submit(self, request: Request, sink: Callable[[tuple], None]) -> Sequence:
        """Set the request up in the caller's thread and queue it for the step loop; its events go to `sink`.

        Raises RequestError for a request that cannot be served as asked, QueueFull when the replica's waiting
        queue is full."""
        method = request.method or self.cfg.default_method
        ids = self.encode(request)
        params = request.params
        capacity = min(self.pool.slot_tokens, len(ids) + params.max_tokens + self.cfg.k_max + 1)
        seed = params.seed if params.seed is not None else new_seed()
        constraint = self.grammars.start(request.constraint, params, tuple(ids)) if request.constraint else None
        session = self.pool.session(capacity)
        ctx = ArmContext(target=self.target, params=params, seed=seed, drafter=self.drafter, target_session=session,
                         resources=self.resources, drafter_pool=self.drafter_pool)
        proposer = build(method, ctx)
        close = getattr(proposer, "close", None)    # arms holding a drafter slot or lease give it back at the end

        def on_end() -> None:
            if close is not None:
                close()
            if constraint is not None:
                constraint.close()

        s = Sequence(ids, params, seed, proposer, session, sink, min(params.max_tokens, capacity - len(ids)),
                     constraint, on_end=on_end)
        try:
            self.scheduler.submit(s)
        except QueueFull:
            on_end()
            raise
        return s

    def cancel(self, s: Sequence) -> None:
        self.scheduler.cancel(s)

    def output(self, request: Request, s: Sequence, t_start: float) -> Output:
        return Output(self, request.method or self.cfg.default_method, s, t_start)

    def stream(self, request: Request) -> Iterator[Chunk | Result]:
        """Yield Chunks as tokens are verified, then one Result. Errors in the request raise RequestError."""
        t_start = time.perf_counter()
        events: queue.SimpleQueue = queue.SimpleQueue()
        s = self.submit(request, timestamped(events.put))
        yield from self._consume(self.output(request, s, t_start), events)

    def _consume(self, out: Output, events: queue.SimpleQueue) -> Iterator[Chunk | Result]:
        try:
            while out.running:
                if (chunk := out.take(*events.get())) is not None:
                    yield chunk
            yield from out.finish()
        finally:
            if not out.ended:                 # the caller left, or a stop string: the loop drops it next step
                self.cancel(out.seq)

    def generate(self, request: Request) -> Result:
        for item in self.stream(request):
            if isinstance(item, Result):
                return item
        raise AssertionError("stream ended without a Result")

    def generate_many(self, requests: list[Request]) -> list[Result]:
        """Submit every request at once (they share the replica's steps), then collect their Results in order."""
        started = []
        for request in requests:   # timings come from the events' own timestamps, not from when we read them
            events: queue.SimpleQueue = queue.SimpleQueue()
            t_start = time.perf_counter()
            started.append((self.output(request, self.submit(request, timestamped(events.put)), t_start), events))
        return [item for out, events in started for item in self._consume(out, events) if isinstance(item, Result)]

    def learn(self, prompt: list[int], emitted: list[int]) -> None:
        """Request end: every arm's verified tokens teach the shared n-gram table's local copy; the background
        syncer pushes them to Redis with its next pipelined round (every sync_interval_s). The adjacency table
        learns only under `recycling`: it needs the target's logits at each step, which other arms would pay for."""
        table = self.resources.get("ngram_table") if self.cfg.learn_emitted else None
        if table is not None and emitted:
            table.learn(prompt, emitted)


def timestamped(put: Callable[[tuple], None]) -> Callable[[tuple], None]:
    """A sink that records when the step loop emitted each event: (perf_counter seconds, event)."""
    return lambda event: put((time.perf_counter(), event))


def pool_slots(target: Model, cfg: SchedulerConfig) -> int:
    """KV slots of a replica: max_batch, fewer when kv_mem_gb caps the pool's memory."""
    slots = cfg.max_batch
    per_slot = target.slot_bytes(min(cfg.slot_tokens or target.max_context, target.max_context))
    if cfg.kv_mem_gb is not None and per_slot > 0:
        slots = min(slots, int(cfg.kv_mem_gb * 2**30 // per_slot))
        if slots < 1:
            raise ValueError(f"kv_mem_gb={cfg.kv_mem_gb} holds no slot of {per_slot / 2**30:.3f} GiB")
    return slots


class Output:
    """One request's text, assembled from its token events (detokenisation, stop strings) off the step loop."""

    def __init__(self, engine: Engine, method: str, s: Sequence, t_start: float) -> None:
        self.engine, self.method, self.seq, self.t_start = engine, method, s, t_start
        self.stops, self.eos_ids = s.params.stop, engine.eos_ids
        self.detok = Detokenizer(engine.tokenizer)
        self.out: list[int] = []
        self.text, self.sent, self.finish_reason = "", 0, "length"
        self.ttft_s: float | None = None
        self.t_end: float | None = None      # when the step loop ended the request (None: when finish() runs)
        self.cut: int | None = None
        self.ended = False                   # the step loop ended the request (or it failed)

    @property
    def stopped(self) -> bool:
        return self.cut is not None

    @property
    def running(self) -> bool:
        """More events may come that this output wants (not ended, no stop string seen)."""
        return not self.ended and not self.stopped

    def take(self, t: float, event: tuple) -> Chunk | None:
        """One timestamped step-loop event: ("tokens", ids) -> their chunk; ("end", reason) -> None; ("error",
        exc) raises exc. `ended` is set by the last two."""
        kind, value = event
        if kind == "tokens":
            return self.push(value, t)
        self.ended = True
        if kind == "error":
            raise value
        self.t_end = t
        return None

    def push(self, emitted: list[int], t: float | None = None) -> Chunk:
        """`t`: when the step loop emitted these tokens (None = now)."""
        now = t if t is not None else time.perf_counter()
        self.ttft_s = self.ttft_s if self.ttft_s is not None else now - self.t_start
        self.out.extend(emitted)
        self.text += self.detok.push(emitted)       # only what is final: no decode of the whole output per step
        self.cut = _find_stop(self.text, self.stops, self.sent)
        if self.cut is not None:
            self.text, self.finish_reason = self.text[:self.cut], "stop"
            self.out = self._through_stop(len(self.out) - len(emitted))
        elif self.out[-1] in self.eos_ids and not self.seq.params.ignore_eos:
            self.finish_reason = "stop"
        final = len(self.text) if self.finish_reason == "stop" else _stable_len(self.text, self.stops)
        chunk = Chunk(emitted, self.text[self.sent:final])
        self.sent = max(self.sent, final)
        return chunk

    def _through_stop(self, before: int) -> list[int]:
        """The output tokens up to the one that completes the stop string (a long draft may have run past it)."""
        decode = self.engine.tokenizer.decode
        for n in range(max(before, 1), len(self.out)):
            if _find_stop(decode(self.out[:n], skip_special_tokens=True), self.stops, 0) is not None:
                return self.out[:n]
        return self.out

    def finish(self) -> Iterator[Chunk | Result]:
        if self.cut is None:                  # what the detokenizer held back (a character cut by the last token)
            self.text += self.detok.flush()
            if (cut := _find_stop(self.text, self.stops, self.sent)) is not None:
                self.text, self.finish_reason = self.text[:cut], "stop"
        self.engine.learn(self.seq.prompt, self.out)
        wall = (self.t_end if self.t_end is not None else time.perf_counter()) - self.t_start
        if self.sent < len(self.text):
            yield Chunk([], self.text[self.sent:])
        yield Result(self.text, self.out, self.finish_reason, self.method, len(self.seq.prompt),
                     self.ttft_s or wall, wall, RequestStats.of(self.seq.stats))


def _find_stop(text: str, stops: tuple[str, ...], searched_from: int) -> int | None:
    """Index where the earliest stop string starts in text[searched_from - longest:], or None."""
    if not stops:
        return None
    lo = max(0, searched_from - max(map(len, stops)))
    hits = [i for i in (text.find(s, lo) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stable_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of text that can be streamed now: hold back what could be the start of a stop string."""
    return max(0, len(text) - max(map(len, stops)) + 1) if stops else len(text)
