"""Draft-model speculation with a dynamic draft length.

The drafter stops early when its own distribution is too flat to be trusted (SVIP-style entropy bound) and the
per-request draft length adapts to recent acceptance (grow on full acceptance, shrink on rejection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import Model
from ..registry import ArmContext, register
from ..sampling import probs_from_logits, sample
from ..types import Draft, SamplingParams, Verdict


@dataclass(frozen=True)
class SpsConfig:
    k_init: int = 4                 # starting draft length
    k_min: int = 1                  # draft length floor
    k_max: int = 8                  # draft length ceiling
    entropy_stop_nats: float = 1.5  # stop drafting after a token whose drafter entropy exceeds this


def entropy(probs: torch.Tensor) -> float:
    """Shannon entropy (nats) of a [V] distribution."""
    p = probs[probs > 0]
    return float(-(p * p.log()).sum())


class DrafterCache:
    """The drafter's KV cache kept in step with the sequence by common-prefix rollback."""

    def __init__(self, drafter: Model, capacity: int) -> None:
        self.session, self.fed = drafter.session(capacity), []

    def logits_after(self, seq: list[int]) -> torch.Tensor:
        """[V] logits for the position after `seq`, feeding only what the cache lacks."""
        common = 0
        limit = min(len(self.fed), len(seq) - 1)  # the last token is always fed to get its logits
        while common < limit and self.fed[common] == seq[common]:
            common += 1
        self.session.rollback(common)
        logits = self.session.forward(seq[common:])[-1]
        self.fed = list(seq)
        return logits


class SpsProposer:
    def __init__(self, drafter: Model, params: SamplingParams, generator, cfg: SpsConfig, capacity: int) -> None:
        self.cache = DrafterCache(drafter, capacity)
        self.params, self.generator, self.cfg = params, generator, cfg
        self.k, self.drafted = cfg.k_init, 0

    def propose(self, seq: list[int], k: int) -> Draft:
        tokens, rows, ctx = [], [], list(seq)
        while len(tokens) < min(k, self.k):
            logits = self.cache.logits_after(ctx)                              # [V]
            q = probs_from_logits(logits, self.params)                         # [V]
            token = int(q.argmax()) if self.params.greedy else sample(q, self.generator)
            tokens.append(token)
            rows.append(q)
            ctx.append(token)
            # The drafter's own (temperature 1) confidence decides whether another drafter forward pays.
            if entropy(logits.softmax(-1)) > self.cfg.entropy_stop_nats:
                break
        self.drafted = len(tokens)
        return Draft(tokens, None if self.params.greedy or not rows else torch.stack(rows))

    def observe(self, seq: list[int], verdict: Verdict) -> None:
        if self.drafted and verdict.accepted >= self.drafted:
            self.k = min(self.cfg.k_max, self.k + 1)
        elif verdict.accepted < self.drafted:
            self.k = max(self.cfg.k_min, self.k - 1)


@register("sps", requires=("drafter",), description="draft-model speculation with entropy-bounded, adaptive draft length")
def build(ctx: ArmContext) -> SpsProposer:
    return SpsProposer(ctx.drafter, ctx.params, ctx.generator, SpsConfig(), capacity=ctx.target.max_context)
