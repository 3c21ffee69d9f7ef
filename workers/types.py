"""The decoding vocabulary shared by every arm: drafts, verdicts, the Proposer protocol (sampling parameters and
the decode counters live in the torch-free `request.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .request import DecodeStats, RequestError, SamplingParams   # torch-free; re-exported here

__all__ = ["DecodeStats", "Draft", "Proposer", "RequestError", "SamplingParams", "Verdict"]


@dataclass(frozen=True)
class Draft:
    tokens: list[int]                  # [k'] proposed continuation, k' <= k, may be empty
    probs: torch.Tensor | None = None  # [k', vocab] drafter distribution; None = deterministic drafter
    parents: list[int] | None = None   # [k'] tree draft: parent node index (-1 = child of `last`), parents[i] < i;
                                       # None = a chain (node i's parent is i - 1)
    evidence: int = 0                  # how strong the match behind the draft is, a class the step budget prices
                                       # with its own learnt acceptance (lookup arms: the context length matched);
                                       # arms that do not say leave 0 (one class)

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
                     None if self.parents is None else self.parents[:n], self.evidence)

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
