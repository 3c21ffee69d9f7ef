"""Draft-model speculation with a dynamic draft length.

The draft length k is chosen per step from the request's recent per-token acceptance and the cost of a drafter
step relative to a verification (timed as it decodes under greedy decoding, so it adapts to the hardware and its
load; a configured prior under sampling, so seeds reproduce):
the k with the most expected tokens per unit of cost. Within a step the drafter also stops early when its own
distribution is too flat to be trusted (SVIP-style entropy bound).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..draft_length import Acceptance, best_length, decayed_mean
from ..drafter_cache import DrafterCache
from ..model import Model
from ..registry import ArmContext, register
from ..sampling import probs_from_logits, sample
from ..types import Draft, SamplingParams, Verdict


@dataclass(frozen=True)
class SpsConfig:
    k_max: int = 8                  # draft length ceiling
    entropy_stop_nats: float = 7.0  # stop drafting after a token whose drafter entropy exceeds this (SVIP-style;
                                    # calibrated on the shipped drafter, whose entropy is high even when right)
    prior_accept: float = 0.6       # per-token acceptance assumed before the request has any evidence
    prior_cost: float = 0.2         # drafter step / verification time assumed before both were timed
    decay: float = 0.9              # evidence kept per step (acceptance and timings follow recent steps)


def entropy(probs: torch.Tensor) -> float:
    """Shannon entropy (nats) of a [V] distribution."""
    p = probs[probs > 0]
    return float(-(p * p.log()).sum())


class SpsProposer:
    def __init__(self, drafter: Model, params: SamplingParams, generator, cfg: SpsConfig, capacity: int) -> None:
        self.cache = DrafterCache(drafter, capacity)
        self.params, self.generator, self.cfg = params, generator, cfg
        self.acceptance = Acceptance(prior=cfg.prior_accept, decay=cfg.decay)
        self.step_s = self.verify_s = None       # decayed means: one drafter step; one verification
        self.drafted, self.proposed_at, self.steps = 0, None, 0

    @property
    def k(self) -> int:
        """Draft length for the next step.

        Measured timings steer k only under greedy decoding, where k cannot change the output; a sampled request
        uses `prior_cost`, so its draft lengths (and with them its random draws) depend on the seed alone and a
        fixed seed reproduces the same text.
        """
        timed = self.params.greedy and self.step_s is not None and self.verify_s is not None
        cost = self.step_s / self.verify_s if timed else self.cfg.prior_cost
        return best_length(self.acceptance.alpha, cost, self.cfg.k_max)

    def propose(self, seq: list[int], k: int) -> Draft:
        tokens, rows, ctx = [], [], list(seq)
        t0 = time.perf_counter()
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
        self.drafted, self.proposed_at = len(tokens), time.perf_counter()
        self.steps += 1
        if tokens and self.steps > 1:  # the first step also prefills the drafter with the prompt: not a step's cost
            self.step_s = decayed_mean(self.step_s, (self.proposed_at - t0) / len(tokens), self.cfg.decay)
        return Draft(tokens, None if self.params.greedy or not rows else torch.stack(rows))

    def observe(self, seq: list[int], verdict: Verdict) -> None:
        if self.proposed_at is None:  # a step this arm did not draft (e.g. tokens a grammar forced)
            return
        self.verify_s = decayed_mean(self.verify_s, time.perf_counter() - self.proposed_at,  # forward + verify
                                     self.cfg.decay)
        if self.drafted:
            self.acceptance.update(verdict.accepted, self.drafted)
        self.drafted, self.proposed_at = 0, None


@register("sps", requires=("drafter",), description="draft-model speculation with entropy-bounded, adaptive draft length")
def build(ctx: ArmContext) -> SpsProposer:
    return SpsProposer(ctx.drafter, ctx.params, ctx.generator, SpsConfig(), capacity=ctx.target.max_context)
