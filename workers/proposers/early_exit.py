"""Self-speculation (LayerSkip/DEL-style): draft with the target's first L layers through its own LM head.

The draft runs in the request's own target cache: layer i's keys and values depend only on layers < i, so the
cache the full model wrote for layers < L is exactly the L-layer drafter's cache (reused for free, no second
session), and the draft's writes past the verified prefix are overwritten by the verification forward, which
scores the same positions. The shared model and its config are never touched.

Per request the arm picks the exit L and the draft length k that maximise expected tokens per unit of cost,
from per-exit acceptance tracked as it decodes (optimistic estimates, so every candidate exit gets tried).
Not yet done: the verification forward recomputes the first L layers of `last` instead of continuing from the
draft's hidden state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..draft_length import best_length, tokens_per_cost
from ..model import Session
from ..registry import ArmContext, register
from ..sampling import probs_from_logits, sample
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
    def __init__(self, session: Session, num_layers: int, params: SamplingParams, generator,
                 cfg: EarlyExitConfig) -> None:
        exits = cfg.exit_layers or default_exits(num_layers)
        if not exits or any(not 1 <= e < num_layers for e in exits):
            raise RequestError(f"early_exit needs exits in 1..{num_layers - 1}, got {exits}")
        self.session, self.num_layers, self.cfg = session, num_layers, cfg
        self.params, self.generator = params, generator
        self.accepted = dict.fromkeys(exits, 0)    # per exit: draft tokens accepted
        self.rejected = dict.fromkeys(exits, 0)    # per exit: drafts cut by a rejection
        self.layer, self.drafted, self.steps = 0, 0, 0

    def propose(self, seq: list[int], k: int) -> Draft:
        layer, k = plan(self.accepted, self.rejected, self.num_layers, min(k, self.cfg.k_max), self.cfg, self.steps)
        self.layer, self.drafted, self.steps = layer, 0, self.steps + 1
        if k <= 0:
            return Draft([])
        start = self.session.length
        if start != len(seq) - 1:
            raise RuntimeError(f"target cache holds {start} tokens, expected {len(seq) - 1}")
        tokens, rows, last = [], [], seq[-1]
        try:
            for _ in range(k):
                logits = self.session.forward([last], exit_layer=layer)[-1]          # [V]
                if self.params.greedy:
                    last = int(logits.argmax())
                else:
                    rows.append(probs_from_logits(logits, self.params))              # [V]
                    last = sample(rows[-1], self.generator)
                tokens.append(last)
        finally:
            self.session.rollback(start)  # the verification forward rewrites every position drafted here
        self.drafted = len(tokens)
        return Draft(tokens, torch.stack(rows) if rows else None)

    def observe(self, seq: list[int], verdict: Verdict) -> None:
        if self.drafted:
            self.accepted[self.layer] += verdict.accepted
            self.rejected[self.layer] += verdict.accepted < self.drafted

    def acceptance(self) -> dict[int, float]:
        """Measured per-token acceptance per exit (NaN where never tried)."""
        return {e: self.accepted[e] / (self.accepted[e] + self.rejected[e]) if self.accepted[e] + self.rejected[e]
                else math.nan for e in self.accepted}


@register("early_exit", description="self-speculation: the target's first L layers draft, L and k chosen per request")
def build(ctx: ArmContext) -> EarlyExitProposer:
    if ctx.target_session is None:
        raise RequestError("early_exit drafts in the request's target cache, which this worker did not provide")
    try:  # a model that cannot exit early says so on a throwaway one-position session
        ctx.target.session(1).forward([0], exit_layer=1)
    except (ValueError, NotImplementedError, TypeError) as exc:
        raise RequestError(f"early_exit needs a target that can exit early (the lean Llama forward): {exc}") from exc
    if ctx.target.num_layers < 2:
        raise RequestError("early_exit needs a target with at least 2 layers")
    return EarlyExitProposer(ctx.target_session, ctx.target.num_layers, ctx.params, ctx.generator, EarlyExitConfig())
