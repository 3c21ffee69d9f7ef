"""Draft-model speculation with a dynamic draft length.

The draft length k is chosen per step from the request's recent per-token acceptance and the cost of a drafter
step relative to a verification (timed as it decodes under greedy decoding, so it adapts to the hardware and its
load; a configured prior under sampling, so seeds reproduce):
the k with the most expected tokens per unit of cost. Within a step the drafter also stops early when its own
distribution is too flat to be trusted (SVIP-style entropy bound).

Batched: `propose_batch` drafts for every sps request of a step at once, one drafter forward per draft position
over all requests still drafting (their caches are slots of the replica's drafter pool), with one host sync per
position for the whole batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..draft_length import DRAFT_STEP_PRIOR_S, Acceptance, best_length, decayed_mean
from ..drafter_cache import DrafterCache
from ..kv import Item, SlotSession, forward_batch
from ..model import Model
from ..registry import ArmContext, register
from ..sampling import DRAFT, Noise, probs_from_logits, race
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
    def __init__(self, drafter: Model | None, params: SamplingParams, seed: int, cfg: SpsConfig, capacity: int,
                 session: SlotSession | None = None) -> None:
        self.cache = DrafterCache(drafter, capacity, session)
        self.params, self.seed, self.cfg = params, seed, cfg
        self.noise = Noise(drafter.device if drafter is not None else "cpu")
        self.acceptance = Acceptance(prior=cfg.prior_accept, decay=cfg.decay)
        self.step_s = self.verify_s = None       # decayed means: one drafter step; one verification
        self.drafted, self.proposed_at, self.steps = 0, None, 0
        self.group = 1                           # sps requests that drafted together in the last step

    @property
    def k(self) -> int:
        """Draft length for the next step.

        Measured timings steer k only under greedy decoding, where k cannot change the output; a sampled request
        uses `prior_cost`, so its draft lengths depend on its tokens alone.
        """
        timed = self.params.greedy and self.step_s is not None and self.verify_s is not None
        cost = self.step_s / self.verify_s if timed else self.cfg.prior_cost
        return best_length(self.acceptance.alpha, cost, self.cfg.k_max)

    def propose(self, seq: list[int], k: int) -> Draft:
        return propose_batch([self], [seq], [k])[0]

    @property
    def draft_cost_s(self) -> float:
        """Seconds one more drafted token costs this request: its share of a batched drafter step."""
        return (self.step_s if self.step_s is not None else DRAFT_STEP_PRIOR_S) / self.group

    def observe(self, seq: list[int], verdict: Verdict) -> None:
        if self.proposed_at is None:  # a step this arm did not draft (e.g. tokens a grammar forced)
            return
        self.verify_s = decayed_mean(self.verify_s, time.perf_counter() - self.proposed_at,  # forward + verify
                                     self.cfg.decay)
        if self.drafted:
            self.acceptance.update(verdict.accepted, self.drafted)
        self.drafted, self.proposed_at = 0, None

    def close(self) -> None:
        """Request end: the drafter slot goes back to the pool now."""
        self.cache.release()

    def _took(self, tokens: list[int], step_s: float) -> None:
        self.drafted, self.proposed_at = len(tokens), time.perf_counter()
        self.steps += 1
        if tokens and self.steps > 1:  # the first step also prefills the drafter with the prompt: not a step's cost
            self.step_s = decayed_mean(self.step_s, step_s, self.cfg.decay)


def propose_batch(proposers: list[SpsProposer], seqs: list[list[int]], ks: list[int]) -> list[Draft]:
    """Drafts of every sps request of a step: one drafter forward per position over the requests still drafting."""
    want = [min(k, p.k) if k > 0 else 0 for p, k in zip(proposers, ks)]
    ctx = [list(seq) for seq in seqs]
    tokens: list[list[int]] = [[] for _ in proposers]
    rows: list[list[torch.Tensor]] = [[] for _ in proposers]
    room = [p.cache.session.capacity for p in proposers]       # a drafter context shorter than the target's
    active = [i for i, w in enumerate(want) if w > 0 and len(ctx[i]) <= room[i]]
    t0, positions = time.perf_counter(), 0
    while active:
        feed = [proposers[i].cache.pending(ctx[i]) for i in active]
        logits = forward_batch([Item(proposers[i].cache.session, new, rows="last")
                                for i, new in zip(active, feed)])
        last = torch.cat(logits)                                               # [A, V]
        argmax = last.argmax(-1)                                               # [A]: all a greedy row needs
        picked = []
        for j, i in enumerate(active):
            p = proposers[i]
            p.cache.fed_up(feed[j])
            if p.params.greedy:
                picked.append(argmax[j])
                continue
            q = probs_from_logits(last[j], p.params)                           # [V]
            rows[i].append(q)
            picked.append(race(q, p.noise.rows(p.seed, [len(ctx[i])], q.shape[-1], DRAFT)[0]))
        # The drafter's own (temperature 1) confidence decides whether another drafter forward pays.
        flat = torch.cat([torch.stack(picked).float(), torch.special.entr(last.softmax(-1)).sum(-1)]).tolist()
        positions += 1
        still = []
        for j, i in enumerate(active):
            token = int(flat[j])
            tokens[i].append(token)
            ctx[i].append(token)
            if (len(tokens[i]) < want[i] and flat[len(active) + j] <= proposers[i].cfg.entropy_stop_nats
                    and len(ctx[i]) <= room[i]):
                still.append(i)
        active = still
    step_s = (time.perf_counter() - t0) / max(positions, 1)
    drafts = []
    group = max(1, sum(1 for t in tokens if t))
    for p, t, r in zip(proposers, tokens, rows):
        p.group = group
        p._took(t, step_s)
        drafts.append(Draft(t, None if p.params.greedy or not r else torch.stack(r)))
    return drafts


SpsProposer.propose_batch = staticmethod(propose_batch)


@register("sps", drafts="model", requires=("drafter",),
          placement=("alone_when_sampled",),   # selector/rules.py says why
          description="draft-model speculation with entropy-bounded, adaptive draft length")
def build(ctx: ArmContext) -> SpsProposer:
    capacity = ctx.target.max_context
    session = ctx.drafter_pool.session(capacity) if ctx.drafter_pool is not None else None
    return SpsProposer(ctx.drafter, ctx.params, ctx.seed, SpsConfig(), capacity, session)
