"""The decode loop, written once: propose → one target forward over [last, *draft] → verify → roll back → observe.

The target's KV cache holds every token but the last (gpt-fast's convention), so each step scores `last`
together with the draft. Every proposer's `observe` gets the same Verdict, which also carries what the target
scored ([last, *draft.tokens] as verified) and its raw logits [k'+1, V]: arms that learn from the target (Token
Recycling) read them, the others ignore them.
"""

from __future__ import annotations

import time
from dataclasses import replace
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from .model import Session
from .proposers.ar import ARProposer
from .types import DecodeStats, Draft, Proposer, SamplingParams
from .verify import verify

if TYPE_CHECKING:
    from .constraint import Constraint


def decode(session: Session, proposer: Proposer, prompt: list[int], params: SamplingParams,
           generator: torch.Generator | None, eos_ids: frozenset[int], capacity: int, k: int = 8,
           stats: DecodeStats | None = None, constraint: Constraint | None = None) -> Iterator[list[int]]:
    """Yield the tokens emitted at each step until EOS, max_tokens or the cache's capacity.

    An arm that raises mid-request is replaced by AR for the rest of the request (`stats.fallback` says why).
    `constraint` (the request's grammar, workers/constraint.py) drafts the tokens it forces instead of the arm,
    prunes the arm's drafts, masks the target's logits and ends with the EOS it forces; None = unconstrained.
    """
    stats = stats if stats is not None else DecodeStats()
    seq = list(prompt)
    t0 = time.perf_counter()
    session.forward(prompt[:-1]) if len(prompt) > 1 else None
    stats.prefill_s = time.perf_counter() - t0
    budget = min(params.max_tokens, capacity - len(prompt))
    while budget > 0:
        t0 = time.perf_counter()
        room = min(k, budget - 1)  # draft nodes the cache and the budget hold: [last, *draft] fills room + 1 slots
        forced = constraint.forced(room) if constraint is not None else None
        try:
            draft = (forced or proposer.propose(seq, room)).head(room)  # a tree arm's template may be wider than k
        except Exception as exc:  # an arm's failure must not fail the request
            stats.fallback, proposer = f"{type(exc).__name__}: {exc}", ARProposer()
            draft = proposer.propose(seq, 0)
        draft = constraint.restrict(draft, params) if constraint is not None else draft
        t1 = time.perf_counter()
        logits = _score(session, seq[-1], draft)                              # [k'+1, V]
        scored = constraint.mask(logits, draft, params) if constraint is not None else logits
        verdict = replace(verify(scored, draft, params, generator, eos_ids, budget),
                          scored=[seq[-1], *draft.tokens], logits=logits)
        if verdict.path:  # tree: move the accepted nodes' cache entries onto the sequence
            session.keep([len(seq) + i for i in verdict.path], len(seq))
        session.rollback(len(seq) + verdict.accepted)
        t2 = time.perf_counter()
        try:
            if forced is None:  # a step the grammar drafted is none of the arm's business
                proposer.observe(seq, verdict)
        except Exception as exc:
            stats.fallback, proposer = f"{type(exc).__name__}: {exc}", ARProposer()
        emitted = verdict.emitted if constraint is None else constraint.commit(verdict, budget)
        seq.extend(emitted)
        budget -= len(emitted)
        _count(stats, 0 if forced else len(draft.tokens), 0 if forced else verdict.accepted, len(emitted))
        if constraint is not None:
            stats.forced += (verdict.accepted if forced else 0) + len(emitted) - len(verdict.emitted)
            stats.pruned = constraint.pruned
        stats.propose_s += t1 - t0 + time.perf_counter() - t2
        stats.verify_s += t2 - t1
        yield emitted
        if emitted[-1] in eos_ids and (not params.ignore_eos or constraint is not None):
            return


def _score(session: Session, last: int, draft: Draft) -> torch.Tensor:
    if draft.parents is None:
        return session.forward([last, *draft.tokens])
    return session.forward([last, *draft.tokens], parents=[-1] + [p + 1 for p in draft.parents])


def _count(stats: DecodeStats, drafted: int, accepted: int, emitted: int) -> None:
    stats.steps += 1
    stats.drafts += drafted > 0
    stats.drafted += drafted
    stats.accepted += accepted
    stats.emitted += emitted
