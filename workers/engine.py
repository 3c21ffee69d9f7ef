"""One replica's decoding engine: loads target, drafter and tokenizer once, serves requests one arm at a time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .constraint import ConstraintConfig, ConstraintSpec, GrammarCompiler
from .decode import decode
from .detokenize import Detokenizer
from .model import Model, ModelConfig, load_model
from .registry import ArmContext, arms, build
from .sampling import make_generator
from .types import DecodeStats, RequestError, SamplingParams


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


@dataclass(frozen=True)
class Request:
    prompt: str | None = None                          # text prompt (or give prompt_ids)
    prompt_ids: tuple[int, ...] | None = None          # pre-tokenised prompt
    params: SamplingParams = field(default_factory=SamplingParams)
    method: str | None = None                          # arm name; None = automatic
    constraint: ConstraintSpec | None = None           # output grammar (JSON Schema, regex, Lark); None = free text


@dataclass(frozen=True)
class Chunk:
    token_ids: list[int]     # tokens emitted by one decode step
    text: str                # text that became final with them (stop strings held back until resolved)


@dataclass(frozen=True)
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str                       # "stop" | "length"
    method: str
    prompt_tokens: int
    ttft_s: float                            # request start → first emitted token
    wall_s: float
    stats: dict[str, Any]                    # DecodeStats fields + acceptance_length

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.wall_s if self.wall_s > 0 else 0.0


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

    def available_methods(self) -> list[str]:
        return [name for name, arm in arms().items()
                if all(getattr(self, r, None) is not None or r in self.resources for r in arm.requires)]

    def encode(self, request: Request) -> list[int]:
        if request.prompt_ids is not None:
            ids = list(request.prompt_ids)
            if any(not isinstance(t, int) or not 0 <= t < self.target.vocab_size for t in ids):
                raise RequestError(f"prompt_ids must be token ids in [0, {self.target.vocab_size})")
        else:
            ids = self.tokenizer.encode(request.prompt or "", add_special_tokens=False)
        if not ids:
            raise RequestError("prompt is empty")
        if len(ids) >= self.target.max_context:
            raise RequestError(f"prompt has {len(ids)} tokens; the model's context is {self.target.max_context}")
        return ids

    def stream(self, request: Request) -> Iterator[Chunk | Result]:
        """Yield Chunks as tokens are verified, then one Result. Errors in the request raise RequestError."""
        t_start = time.perf_counter()
        method = request.method or self.cfg.default_method
        ids = self.encode(request)
        params = request.params
        capacity = min(self.target.max_context, len(ids) + params.max_tokens + self.cfg.k_max + 1)
        generator = make_generator(params.seed)
        constraint = self.grammars.start(request.constraint, params, tuple(ids)) if request.constraint else None
        session = self.target.session(capacity)
        ctx = ArmContext(target=self.target, params=params, generator=generator, drafter=self.drafter,
                         target_session=session, resources=self.resources)
        proposer = build(method, ctx)
        stats, out, text, sent, finish, ttft = DecodeStats(), [], "", 0, "length", None
        detok, cut = Detokenizer(self.tokenizer), None
        for emitted in decode(session, proposer, ids, params, generator, self.eos_ids, capacity, self.cfg.k_max, stats,
                              constraint):
            ttft = ttft if ttft is not None else time.perf_counter() - t_start
            out.extend(emitted)
            text += detok.push(emitted)       # only what is final: no decode of the whole output per step
            cut = _find_stop(text, params.stop, sent)
            if cut is not None:
                text, finish = text[:cut], "stop"
            elif out[-1] in self.eos_ids and not params.ignore_eos:
                finish = "stop"
            final = len(text) if finish == "stop" else _stable_len(text, params.stop)
            yield Chunk(emitted, text[sent:final])
            sent = max(sent, final)
            if cut is not None:
                break
        if cut is None:                       # what the detokenizer held back (a character cut by the last token)
            text += detok.flush()
            if (cut := _find_stop(text, params.stop, sent)) is not None:
                text, finish = text[:cut], "stop"
        if constraint is not None:
            constraint.close()
        self._learn(ids, out)
        wall = time.perf_counter() - t_start
        s = asdict(stats) | {"acceptance_length": stats.acceptance_length, "acceptance_rate": stats.acceptance_rate}
        if sent < len(text):
            yield Chunk([], text[sent:])
        yield Result(text, out, finish, method, len(ids), ttft or wall, wall, s)

    def _learn(self, prompt: list[int], emitted: list[int]) -> None:
        """Request end: every arm's verified tokens teach the shared n-gram table's local copy; the background
        syncer pushes them to Redis with its next pipelined round (every sync_interval_s). The adjacency table
        learns only under `recycling`: it needs the target's logits at each step, which other arms would pay for."""
        table = self.resources.get("ngram_table") if self.cfg.learn_emitted else None
        if table is not None and emitted:
            table.learn(prompt, emitted)

    def generate(self, request: Request) -> Result:
        for item in self.stream(request):
            if isinstance(item, Result):
                return item
        raise AssertionError("stream ended without a Result")


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
