"""What `metaspec bench serve` drives: an in-process Engine, the running service over gRPC, or any OpenAI-compatible
HTTP server. Each backend hands out a blocking `send(ServeRequest) -> Trace` per method (None = automatic).

>>> backend = EngineBackend(build_engine(EngineSpec(max_batch=16)))
>>> trace = backend.sender("ar", max_tokens=32, ignore_eos=True)(request)
>>> trace.tokens, trace.t_chunks[0] - trace.t_send          # 32 tokens, the time to the first one
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass

from metaspec.bench.load import Send, ServeRequest, Trace
from metaspec.bench_generate import DEFAULT_CHECKPOINTS, check_checkpoint


@dataclass(frozen=True)
class EngineSpec:
    target: str = str(DEFAULT_CHECKPOINTS / "target")            # HF causal LM (path or hub id)
    drafter: str | None = str(DEFAULT_CHECKPOINTS / "drafter")   # draft model sharing the tokenizer; None = none
    dtype: str = "auto"                                          # compute dtype of both models
    threads: int | None = 2                                      # torch intra-op threads (the service's setting)
    max_batch: int = 16                                          # KV slots = requests decoding at once
    slot_tokens: int | None = None                               # cache positions per slot (None = the context)


def build_engine(spec: EngineSpec):
    """The bench's in-process replica: runs never teach the tables, which start empty (the table arms can run)."""
    from metaspec.bench_tables import Tables
    from metaspec.workers.engine import Engine, EngineConfig
    from metaspec.workers.model import ModelConfig
    from metaspec.workers.scheduler import SchedulerConfig

    for path in filter(None, (spec.target, spec.drafter)):
        check_checkpoint(path)
    target = ModelConfig(spec.target, dtype=spec.dtype, threads=spec.threads)
    drafter = ModelConfig(spec.drafter, dtype=spec.dtype, threads=spec.threads) if spec.drafter else None
    batch = SchedulerConfig(max_batch=spec.max_batch, slot_tokens=spec.slot_tokens)
    engine = Engine(EngineConfig(target=target, drafter=drafter, default_method="ar", learn_emitted=False,
                                 batch=batch))
    engine.resources.update(Tables.empty(engine.target.vocab_size).resources())
    return engine


VARIANT_OPTIONS = {"pearl": ("lanes",)}   # arm -> settings a method name may carry ("pearl:lanes=1")
EVERY_ARM_OPTIONS = ("guard",)            # settings any arm may carry: "sps:guard=1" runs with the draft guard on


def arm_variant(method: str) -> tuple[str, dict[str, int]]:
    """'pearl:lanes=1' -> ('pearl', {'lanes': 1}): an arm run with settings of its own (engine backend), so two
    settings of one arm can be measured in the same run; a plain name has none."""
    name, _, rest = method.partition(":")
    opts: dict[str, int] = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        takes = VARIANT_OPTIONS.get(name, ()) + EVERY_ARM_OPTIONS
        if not eq or key not in takes or not value.isdigit() or int(value) < 1 or (key == "guard" and value != "1"):
            allowed = ", ".join([f"{a}:{k}=N" for a, keys in VARIANT_OPTIONS.items() for k in keys]
                                + [f"<arm>:{k}=1" for k in EVERY_ARM_OPTIONS])
            raise ValueError(f"method {method!r}: {part!r} is not a setting it takes (settings: {allowed})")
        opts[key] = int(value)
    return name, opts


class EngineBackend:
    """The replica in this process: requests go through `Engine.submit`, text is assembled by each client thread
    (as the service's worker does); chunk times are taken when the step loop emits them."""

    name = "engine"

    def __init__(self, engine) -> None:
        self.engine = engine
        self._default_guard = engine.scheduler.guard   # what the engine was built with (None: off)
        self._guard = None                              # the guard of ":guard=1" loads, kept across them like a
                                                        # replica's (it learns per batch size)

    def methods(self) -> list[str]:
        return self.engine.available_methods()

    def reset(self) -> None:
        """Empty tables before each measured load, so no run drafts from an earlier run's text."""
        from metaspec.bench_tables import Tables

        self.engine.resources.update(Tables.empty(self.engine.target.vocab_size).resources())

    def snapshot(self) -> dict:
        m = self.engine.scheduler.metrics
        return {"steps": m.steps, "tokens_scored": m.tokens_scored, "batch_hist": dict(m.batch_hist),
                "plain_steps": m.plain_steps, "acceptance": self.engine.scheduler.book.rates()}

    def sender(self, method: str | None, max_tokens: int, ignore_eos: bool) -> Send:
        from metaspec.workers.engine import Request
        from metaspec.workers.pearl import PearlConfig
        from metaspec.workers.types import SamplingParams

        name, opts = arm_variant(method) if method else (None, {})
        if name == "pearl":   # this load's drafter settings (a plain "pearl" gets the defaults back)
            settings = {k: v for k, v in opts.items() if k in VARIANT_OPTIONS["pearl"]}
            self.engine.resources["pearl_config"] = PearlConfig(**settings)
        self.engine.scheduler.guard = self._guarded() if opts.get("guard") else self._default_guard
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=0, ignore_eos=ignore_eos)
        return lambda r: self._send(Request(prompt_ids=r.ids, params=params, method=name))

    def _guarded(self):
        """The draft guard of ":guard=1" loads (the engine's own when it was built with one); needs the budget."""
        from metaspec.workers.budget import DraftGuard

        if not self.engine.scheduler.cfg.draft_budget:
            raise ValueError("guard=1 needs the draft budget (the guard decides between the budget's drafts and none)")
        if self._guard is None:
            self._guard = self._default_guard or DraftGuard()
        return self._guard

    def _send(self, request) -> Trace:
        events: queue.SimpleQueue = queue.SimpleQueue()
        trace = Trace(time.perf_counter())
        s = self.engine.submit(request, lambda ev: events.put((time.perf_counter(), ev)))
        out = self.engine.output(request, s, trace.t_send)
        while out.running:   # (no stop strings here: it runs until the step loop ends it)
            t, event = events.get()
            if (chunk := out.take(t, event)) is not None:
                trace.chunk(len(chunk.token_ids), t)
        result = list(out.finish())[-1]
        trace.drafts, trace.accepted = result.stats.drafts, result.stats.accepted
        return trace

    def close(self) -> None:
        self.engine.close()


class GrpcBackend:
    """The running service (`metaspec serve`): token-id prompts over one shared channel, streamed."""

    name = "grpc"

    def __init__(self, address: str, api_key: str | None = None, timeout_s: float | None = None) -> None:
        from metaspec.protocol.client import Client

        self.client = Client(address, api_key=api_key, timeout_s=timeout_s)

    def methods(self) -> list[str]:
        return [m.name for m in self.client.list_methods().methods]

    def reset(self) -> None:
        pass

    def snapshot(self) -> None:
        return None

    def sender(self, method: str | None, max_tokens: int, ignore_eos: bool) -> Send:
        def send(r: ServeRequest) -> Trace:
            trace = Trace(time.perf_counter())
            for reply in self.client.stream(list(r.ids), max_tokens=max_tokens, temperature=0.0, seed=0,
                                            method=method or "", ignore_eos=ignore_eos):
                seen = trace.tokens
                if reply.finish_reason:   # the last message carries the totals; count what the chunks did not
                    trace.chunk(max(0, reply.completion_tokens - seen))
                    trace.drafts = int(reply.acceptance.get("drafts", 0))
                    trace.accepted = int(reply.acceptance.get("accepted", 0))
                else:
                    trace.chunk(len(reply.token_ids))
            return trace
        return send

    def close(self) -> None:
        self.client.close()


class OpenAIBackend:
    """Any OpenAI-compatible server (`/v1/completions`, streamed) through the `openai` package. Tokens per chunk
    come from the final usage; a method is sent as metaspec's `metaspec.method` extra, EOS ignored as vLLM's
    `ignore_eos` extra (servers that refuse unknown fields need `auto` and `--stop-at-eos`)."""

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None) -> None:
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0)
        self.model = model

    def methods(self) -> list[str]:
        return []

    def reset(self) -> None:
        pass

    def snapshot(self) -> None:
        return None

    def sender(self, method: str | None, max_tokens: int, ignore_eos: bool) -> Send:
        extra = ({"metaspec": {"method": method}} if method else {}) | ({"ignore_eos": True} if ignore_eos else {})

        def send(r: ServeRequest) -> Trace:
            trace, usage = Trace(time.perf_counter()), None
            stream = self.client.completions.create(model=self.model, prompt=r.text, max_tokens=max_tokens,
                                                    temperature=0.0, seed=0, stream=True,
                                                    stream_options={"include_usage": True}, extra_body=extra)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    trace.chunk(1)
                usage = chunk.usage or usage
            if usage is not None and trace.n_chunks:   # text chunks carry no token counts: the usage does
                trace.n_chunks[-1] += max(0, usage.completion_tokens - trace.tokens)
            return trace
        return send

    def close(self) -> None:
        self.client.close()
