"""Self-speculation (LayerSkip/DEL-style): draft with the target's first L layers through its own LM head.

The draft runs in the request's own target cache: layer i's keys and values depend only on layers < i, so the
cache the full model wrote for layers < L is exactly the L-layer drafter's cache (reused for free, no second
session), and the draft's writes past the verified prefix are overwritten by the verification forward, which
scores the same positions. The shared model and its config are never touched.

Per request the arm picks the exit L and the draft length k that maximise expected tokens per unit of cost,
from per-exit acceptance tracked as it decodes (optimistic estimates, so every candidate exit gets tried).
Batched: `propose_batch` drafts for every early_exit request of a step at once, one L-layer forward per position
for all requests that chose exit L. Not yet done: the verification forward recomputes the first L layers of
`last` instead of continuing from the draft's hidden state.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..draft_length import DRAFT_STEP_PRIOR_S, best_length, decayed_mean, tokens_per_cost
from ..kv import Item, forward_batch
from ..model import Session
from ..registry import ArmContext, register
from ..sampling import DRAFT, Noise, probs_from_logits, race
from ..types import Draft, RequestError, SamplingParams, Verdict


@dataclass(frozen=True)
class EarlyExitConfig:
    exit_layers: tuple[int, ...] = ()    # candidate exits; () = a quarter, half and three quarters of the depth
    k_max: int = 8                       # longest draft
    head_cost_layers: float = 0.5        # final norm + LM head + call overhead per draft token, in layers
    verify_cost_per_token: float = 0.03  # extra cost of one more scored token in the verification forward
    prior_accept: float = 0.5            # prior per-token acceptance of every exit
    prior_weight: float = 2.0            # the prior's weight in pseudo-trials
    explore: float = 0.25                # optimism bonus scale (UCB over decode steps)


def default_exits(num_layers: int) -> tuple[int, ...]:
    return tuple(sorted({min(num_layers - 1, max(1, round(num_layers * f))) for f in (0.25, 0.5, 0.75)}))


def plan(accepted: dict[int, int], rejected: dict[int, int], num_layers: int, k_cap: int,
         cfg: EarlyExitConfig, steps: int = 0) -> tuple[int, int]:
    """(exit layer, k) with the most expected tokens per full-forward-equivalent of cost; (0, 0) = don't draft.

    Acceptance per exit is the posterior mean plus a UCB bonus that grows with the decode steps taken (drafting
    or not), so an exit that looked poor early is retried now and then.

    >>> plan({2: 30}, {2: 3}, 8, 8, EarlyExitConfig())      # 91% acceptance at layer 2: draft long
    (2, 5)
    """
    best, choice = 1.0, (0, 0)                                   # AR: one token per full forward
    if k_cap < 1:
        return choice
    for layer in accepted:
        trials = accepted[layer] + rejected[layer] + cfg.prior_weight
        alpha = (accepted[layer] + cfg.prior_accept * cfg.prior_weight) / trials
        alpha = min(0.99, alpha + cfg.explore * math.sqrt(math.log(steps + 2) / trials))
        per_token = (layer + cfg.head_cost_layers) / (num_layers + cfg.head_cost_layers) + cfg.verify_cost_per_token
        k = best_length(alpha, per_token, k_cap)
        ratio = tokens_per_cost(alpha, k, per_token)
        if ratio > best:
            best, choice = ratio, (layer, k)
    return choice


class EarlyExitProposer:
    def __init__(self, session: Session, num_layers: int, params: SamplingParams, seed: int,
                 cfg: EarlyExitConfig) -> None:
        exits = cfg.exit_layers or default_exits(num_layers)
        if not exits or any(not 1 <= e < num_layers for e in exits):
            raise RequestError(f"early_exit needs exits in 1..{num_layers - 1}, got {exits}")
        self.session, self.num_layers, self.cfg = session, num_layers, cfg
        self.params, self.seed = params, seed
        self.noise = Noise(getattr(getattr(session.pool, "m", None), "device", "cpu"))
        self.accepted = dict.fromkeys(exits, 0)    # per exit: draft tokens accepted
        self.rejected = dict.fromkeys(exits, 0)    # per exit: drafts cut by a rejection
        self.layer, self.drafted, self.steps = 0, 0, 0
        self.share_s: float | None = None          # decayed mean: its share of one batched drafting position

    @property
    def draft_cost_s(self) -> float:
        """Seconds one more drafted token costs this request (the step's draft budget weighs it)."""
        return self.share_s if self.share_s is not None else DRAFT_STEP_PRIOR_S

    def propose(self, seq: list[int], k: int) -> Draft:
        return propose_batch([self], [seq], [k])[0]

    def observe(self, seq: list[int], verdict: Verdict) -> None:
        if self.drafted:
            self.accepted[self.layer] += verdict.accepted
            self.rejected[self.layer] += verdict.accepted < self.drafted

    def acceptance(self) -> dict[int, float]:
        """Measured per-token acceptance per exit (NaN where never tried)."""
        return {e: self.accepted[e] / (self.accepted[e] + self.rejected[e]) if self.accepted[e] + self.rejected[e]
                else math.nan for e in self.accepted}


def propose_batch(proposers: list[EarlyExitProposer], seqs: list[list[int]], ks: list[int]) -> list[Draft]:
    """Drafts of every early_exit request of a step: per exit layer, one forward per position over its requests."""
    plans = []
    for p, k in zip(proposers, ks):
        layer, k = plan(p.accepted, p.rejected, p.num_layers, min(k, p.cfg.k_max), p.cfg, p.steps)
        p.layer, p.drafted, p.steps = layer, 0, p.steps + 1
        plans.append((layer, k))
    for p, seq in zip(proposers, seqs):
        if p.session.length != len(seq) - 1:
            raise RuntimeError(f"target cache holds {p.session.length} tokens, expected {len(seq) - 1}")
    tokens: list[list[int]] = [[] for _ in proposers]
    rows: list[list[torch.Tensor]] = [[] for _ in proposers]
    try:
        for layer in sorted({layer for layer, k in plans if k > 0}):
            group = [i for i, (l, k) in enumerate(plans) if l == layer and k > 0]
            last = {i: seqs[i][-1] for i in group}
            for depth in range(max(plans[i][1] for i in group)):
                live = [i for i in group if depth < plans[i][1]]
                t0 = time.perf_counter()
                logits = forward_batch([Item(proposers[i].session, [last[i]]) for i in live], exit_layer=layer)
                picked = []
                for i, lg in zip(live, logits):
                    p = proposers[i]
                    if p.params.greedy:
                        picked.append(lg[-1].argmax())
                    else:
                        rows[i].append(probs_from_logits(lg[-1], p.params))                # [V]
                        e = p.noise.rows(p.seed, [len(seqs[i]) + depth], rows[i][-1].shape[-1], DRAFT)[0]
                        picked.append(race(rows[i][-1], e))
                for i, t in zip(live, torch.stack(picked).tolist()):                     # one sync per position
                    tokens[i].append(t)
                    last[i] = t
                share = (time.perf_counter() - t0) / len(live)
                for i in live:
                    proposers[i].share_s = decayed_mean(proposers[i].share_s, share, 0.9)
    finally:
        for p, seq in zip(proposers, seqs):
            p.session.rollback(len(seq) - 1)  # the verification forward rewrites every position drafted here
    drafts = []
    for p, t, r in zip(proposers, tokens, rows):
        p.drafted = len(t)
        drafts.append(Draft(t, torch.stack(r) if r else None))
    return drafts


EarlyExitProposer.propose_batch = staticmethod(propose_batch)


@register("early_exit", drafts="model", placement=("alone_when_sampled",),   # selector/rules.py says why
          description="self-speculation: the target's first L layers draft, L and k chosen per request")
def build(ctx: ArmContext) -> EarlyExitProposer:
    if ctx.target_session is None:
        raise RequestError("early_exit drafts in the request's target cache, which this worker did not provide")
    if not getattr(ctx.target_session.pool, "num_layers", 0):  # HF's forward runs every layer
        raise RequestError("early_exit needs a target that can exit early (the lean Llama forward)")
    if ctx.target.num_layers < 2:
        raise RequestError("early_exit needs a target with at least 2 layers")
    return EarlyExitProposer(ctx.target_session, ctx.target.num_layers, ctx.params, ctx.seed, EarlyExitConfig())
