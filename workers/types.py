"""The decoding vocabulary shared by every arm: sampling parameters, drafts, verdicts, the Proposer protocol."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .errors import RequestError

__all__ = ["DecodeStats", "Draft", "Proposer", "RequestError", "SamplingParams", "Verdict"]


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
class Draft:
    tokens: list[int]                  # [k'] proposed continuation, k' <= k, may be empty
    probs: torch.Tensor | None = None  # [k', vocab] drafter distribution; None = deterministic drafter
    parents: list[int] | None = None   # [k'] tree draft: parent node index (-1 = child of `last`), parents[i] < i;
                                       # None = a chain (node i's parent is i - 1)

    def __post_init__(self) -> None:
        if self.parents is not None:
            if len(self.parents) != len(self.tokens) or any(not -1 <= p < i for i, p in enumerate(self.parents)):
                raise ValueError("tree draft: parents must have one entry per token, each in [-1, index)")
            if self.probs is not None:
                raise ValueError("tree drafts must be deterministic (probs=None)")

    def head(self, n: int) -> Draft:
        """The first n nodes: a chain's first n tokens, or a tree's first n nodes (a tree, as parents[i] < i)."""
        if len(self.tokens) <= n:
            return self
        n = max(0, n)
        return Draft(self.tokens[:n], None if self.probs is None else self.probs[:n],
                     None if self.parents is None else self.parents[:n])

    def depths(self) -> list[int]:
        """Depth of every node (1 = child of `last`); a chain's node i has depth i + 1."""
        if self.parents is None:
            return list(range(1, len(self.tokens) + 1))
        depth: list[int] = []
        for p in self.parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        return depth


@dataclass(frozen=True)
class Verdict:
    accepted: int                      # draft tokens kept, 0..k'
    emitted: list[int]                 # accepted tokens + one bonus-or-recovered token (fewer if cut by EOS/max)
    path: list[int] | None = None      # tree drafts: indices of the accepted nodes, root to leaf
    scored: list[int] | None = None    # [k'+1] what the target scored: [last, *draft.tokens] (the draft as verified)
    logits: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # [k'+1, V] the target's raw scores right after each `scored` token (before any grammar mask), for arms that
    # learn from the target (Token Recycling); None where nothing was scored (unit tests)


class Proposer(Protocol):
    """One arm's drafting strategy. AR is the proposer that always returns an empty draft."""

    def propose(self, seq: list[int], k: int) -> Draft: ...

    def observe(self, seq: list[int], verdict: Verdict) -> None: ...


@dataclass
class DecodeStats:
    """Counters of one decode; mean acceptance length = 1 + accepted / drafts."""

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

    @property
    def acceptance_length(self) -> float:
        return 1.0 + self.accepted / self.drafts if self.drafts else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0
