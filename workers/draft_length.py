"""How long a draft should be: expected tokens per step against the cost of drafting them.

One step with a k-token draft at per-token acceptance alpha emits (1 - alpha^(k+1)) / (1 - alpha) tokens (the
bonus included) and costs one verification plus k drafter steps. The best k maximises their ratio; arms that
track their own acceptance and costs (sps, early_exit) ask here instead of growing and shrinking k by hand.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens emitted by one step with a k-token draft at per-token acceptance alpha (bonus included)."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def tokens_per_cost(alpha: float, k: int, cost_per_token: float) -> float:
    """Expected tokens of one step with a k-token draft per verification-equivalent of its cost."""
    return expected_tokens(alpha, k) / (1 + k * cost_per_token)


def best_length(alpha: float, cost_per_token: float, k_cap: int) -> int:
    """The k in 1..k_cap with the most expected tokens per verification-equivalent of cost.

    >>> best_length(0.63, 0.19, 8), best_length(0.9, 0.05, 8), best_length(0.2, 0.5, 8)
    (2, 8, 1)
    """
    return max(range(1, max(1, k_cap) + 1), key=lambda k: tokens_per_cost(alpha, k, cost_per_token))


DRAFT_STEP_PRIOR_S = 0.0005   # one drafting position's cost before an arm has timed its own (the step budget's
                              # price for a draft token of an arm that drafts with a model)


def decayed_mean(old: float | None, new: float, decay: float) -> float:
    """Running mean that keeps `decay` of the old value per sample (the first sample starts it)."""
    return new if old is None else decay * old + (1 - decay) * new


@dataclass
class Acceptance:
    """Per-token acceptance of recent drafts: a Beta-style estimate whose evidence decays by `decay` per step.

    A step that accepted a of n drafted tokens is a successes and, when a < n, one failure (geometric model).
    """

    prior: float = 0.6      # acceptance assumed before any evidence
    weight: float = 4.0     # the prior's weight in pseudo-trials
    decay: float = 0.9      # evidence kept per step (recent acceptance counts most)
    hits: float = 0.0
    misses: float = 0.0

    def update(self, accepted: int, drafted: int) -> None:
        self.hits = self.hits * self.decay + accepted
        self.misses = self.misses * self.decay + (accepted < drafted)

    @property
    def alpha(self) -> float:
        return self.estimate()

    def estimate(self, prior: float | None = None) -> float:
        """The acceptance, its evidence shrunk towards `prior` (default: its own) with the prior's weight."""
        p = self.prior if prior is None else prior
        return (self.hits + p * self.weight) / (self.hits + self.misses + self.weight)


@dataclass
class AcceptanceBook:
    """Per-token acceptance learnt across a replica's requests, by class: (arm, greedy or sampled, evidence).

    What a request's own estimate starts from and shrinks to. A fixed prior (0.6) prices a sampled request's first
    lookup drafts as if the target would take most of them, where measured it keeps about one in seven, and gives
    a 3-gram match the same odds as a 1-gram one. `evidence` is the draft's own class (`Draft.evidence`: the
    length of the context a lookup matched); the class -1 is "any draft of this arm", used before the request
    has drafted. Off (`learnt=False`) every class reads the fixed prior: one estimate per request, as before.

    >>> book = AcceptanceBook()
    >>> for _ in range(50): book.update(("pld", False, 1), 0, 4)       # sampled 1-gram matches: never accepted
    >>> round(book.alpha(("pld", False, 1)), 2), book.alpha(("pld", True, 3))
    (0.06, 0.6)
    """

    prior: float = 0.6
    weight: float = 4.0
    decay: float = 0.99       # evidence kept per step of the class (about its last hundred drafts count)
    learnt: bool = True
    table: dict[Hashable, Acceptance] = field(default_factory=dict)

    def alpha(self, key: Hashable) -> float:
        a = self.table.get(key) if self.learnt else None
        return self.prior if a is None else a.alpha

    def update(self, key: Hashable, accepted: int, drafted: int) -> None:
        if self.learnt:
            self.table.setdefault(key, Acceptance(self.prior, self.weight, self.decay)).update(accepted, drafted)

    def rates(self) -> dict[str, float]:
        """Every class's acceptance, keyed "arm/greedy|sampled/evidence" (metrics, bench reports)."""
        return {f"{k[0]}/{'greedy' if k[1] else 'sampled'}/{k[2]}": round(a.alpha, 4)
                for k, a in sorted(list(self.table.items()), key=lambda kv: str(kv[0]))}
