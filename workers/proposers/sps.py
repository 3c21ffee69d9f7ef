"""Draft-model speculation with a dynamic draft length.

The drafter stops early when its own distribution is too flat to be trusted (SVIP-style entropy bound) and the
per-request draft length adapts to recent acceptance (grow on full acceptance, shrink on rejection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..drafter_cache import DrafterCache
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


class SpsProposer:
    def __init__(self, drafter: Model, params: SamplingParams, generator, cfg: SpsConfig, capacity: int) -> None:
        self.cache = DrafterCache(drafter, capacity)
        self.params, self.generator, self.cfg = params, generator, cfg
        self.k, self.drafted = cfg.k_init, 0

    def propose(self, seq: list[int], k: int) -> Draft:
        tokens, rows, ctx = [], [], list(seq)
        while len(tokens) < min(k, self.k):
            logits, _ = self.cache.logits_after(ctx)                           # [V]
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
