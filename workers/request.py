"""What crosses the router <-> worker boundary, importable without torch: the engine's request, its answer and the
stats record.

The router and `protocol/` import this module, never `engine.py` (which loads models and the step loop); the
workers re-export these names (`workers.engine`, `workers.types`, `workers.constraint`), so either import works.
A finished request's counters travel as `RequestStats`, a versioned record with named fields, checked again when
it is unpickled on the router's side.

>>> stats = RequestStats.of(DecodeStats(steps=4, drafts=2, drafted=6, accepted=4, emitted=8))
>>> stats.acceptance_length, stats.acceptance_rate
(3.0, 0.6666666666666666)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import QueueFull, RequestError

__all__ = ["KINDS", "STATS_SCHEMA", "Chunk", "ConstraintSpec", "DecodeStats", "QueueFull", "Request", "RequestError",
           "RequestStats", "Result", "SamplingParams", "WorkerInfo"]

KINDS = ("json_schema", "regex", "grammar")
STATS_SCHEMA = 1             # RequestStats' layout; a record of another layout is refused where it arrives


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = no top-k cut
    top_p: float = 1.0                # nucleus mass in (0, 1]
    max_tokens: int = 128             # tokens to emit at most
    stop: tuple[str, ...] = ()        # stop strings (not included in the output)
    seed: int | None = None           # seeds drafter sampling and verification together
    ignore_eos: bool = False          # keep going past EOS (benchmarks)

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or math.isnan(self.top_p) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be an integer > 0, got {self.max_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class ConstraintSpec:
    """What the output must match. `grammar` is a Lark grammar (llguidance's dialect; GBNF is converted)."""

    kind: str                # "json_schema" | "regex" | "grammar"
    source: str              # the JSON Schema (JSON text), the regex, or the grammar text
    aligned: bool = False    # ASAp grammar-aligned sampling, learning across repeats of the same request

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RequestError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.source, str) or not self.source.strip():
            raise RequestError("constraint source must be a non-empty string")

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.kind}\0{self.source}".encode()).hexdigest()


@dataclass(frozen=True)
class Request:
    prompt: str | None = None                          # text prompt (or give prompt_ids)
    prompt_ids: tuple[int, ...] | None = None          # tokenised prompt; when given, the engine never tokenises
                                                       # `prompt` (the router sends both: text for features)
    params: SamplingParams = field(default_factory=SamplingParams)
    method: str | None = None                          # arm name; None = automatic
    constraint: ConstraintSpec | None = None           # output grammar (JSON Schema, regex, Lark); None = free text


class _Acceptance:
    """Acceptance measures of a decode's counters (`drafts`, `drafted`, `accepted`), shared by both records."""

    drafts: int
    drafted: int
    accepted: int

    @property
    def acceptance_length(self) -> float:
        return 1.0 + self.accepted / self.drafts if self.drafts else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class DecodeStats(_Acceptance):
    """Counters of one decode, updated by the step loop; mean acceptance length = 1 + accepted / drafts."""

    steps: int = 0               # target forwards after prefill
    drafts: int = 0              # steps that carried a non-empty draft
    drafted: int = 0             # draft tokens proposed
    accepted: int = 0            # draft tokens accepted
    emitted: int = 0             # tokens emitted
    prefill_s: float = 0.0       # prompt prefill wall time
    propose_s: float = 0.0       # time spent in propose/observe
    verify_s: float = 0.0        # time spent in target forwards + verification
    fallback: str | None = None  # why the arm fell back to AR mid-request, if it did
    forced: int = 0              # constrained: tokens emitted from grammar-forced drafts (fast-forward, final EOS)
    pruned: int = 0              # constrained: draft tokens dropped before verification because they left the grammar
    budget_cut: int = 0          # draft tokens the step budget cut (did not pay for their share of the batch)
    draft_hist: dict[int, int] = field(default_factory=dict)   # verified draft length -> steps
    batch_sum: int = 0           # sum over its steps of the requests in the step (mean batch = batch_sum / steps)
    budget_reason: str = ""      # the latest budget decision that cut this request's draft, in words


_COUNTS = ("steps", "drafts", "drafted", "accepted", "emitted", "forced", "pruned", "budget_cut", "batch_sum")


@dataclass(frozen=True)
class RequestStats(_Acceptance):
    """One finished request's decode counters, as the worker hands them to the router (a frozen DecodeStats)."""

    steps: int = 0               # target forwards after prefill
    drafts: int = 0              # steps that carried a non-empty draft
    drafted: int = 0             # draft tokens proposed
    accepted: int = 0            # draft tokens accepted
    emitted: int = 0             # tokens emitted
    prefill_s: float = 0.0       # prompt prefill wall time
    propose_s: float = 0.0       # time in propose/observe
    verify_s: float = 0.0        # time in target forwards + verification
    fallback: str | None = None  # why the arm fell back to AR mid-request; None = it did not
    forced: int = 0              # constrained: tokens emitted from grammar-forced drafts
    pruned: int = 0              # constrained: draft tokens dropped because they left the grammar
    budget_cut: int = 0          # draft tokens the step budget cut
    draft_hist: tuple[tuple[int, int], ...] = ()   # (verified draft length, steps), by length
    batch_sum: int = 0           # sum over its steps of the requests in the step
    budget_reason: str = ""      # the latest budget decision that cut its draft, in words
    schema: int = STATS_SCHEMA   # the record's layout

    def __post_init__(self) -> None:
        if self.schema != STATS_SCHEMA:
            raise ValueError(f"stats record of schema {self.schema!r}; this side reads schema {STATS_SCHEMA} "
                             "(router and workers run different versions)")
        if bad := [n for n in _COUNTS if not isinstance(getattr(self, n), int) or getattr(self, n) < 0]:
            raise ValueError(f"stats record: {', '.join(bad)} must be integers >= 0")

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (Ray, across the boundary) checks the record like construction does."""
        known = {f.name for f in fields(self)}
        if missing := known - set(state):
            raise ValueError(f"stats record lacks {', '.join(sorted(missing))} (schema {state.get('schema')!r})")
        for name in known:
            object.__setattr__(self, name, state[name])
        self.__post_init__()

    @classmethod
    def of(cls, stats: DecodeStats) -> RequestStats:
        """The one conversion from the step loop's counters."""
        return cls(**(asdict(stats) | {"draft_hist": tuple(sorted(stats.draft_hist.items()))}))

    @property
    def batch_mean(self) -> float:
        return self.batch_sum / max(self.steps, 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (benchmark records): the fields plus acceptance_length and acceptance_rate."""
        return asdict(self) | {"draft_hist": dict(self.draft_hist), "acceptance_length": self.acceptance_length,
                               "acceptance_rate": self.acceptance_rate}


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
    stats: RequestStats = field(default_factory=RequestStats)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(frozen=True)
class WorkerInfo:
    """What a pool's replica tells the router about itself."""

    pool: str
    methods: tuple[str, ...]        # arms this replica can run
    max_context: int                # target's context window (prompt + completion)
    vocab_size: int
