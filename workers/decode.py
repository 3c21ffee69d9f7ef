"""The decode loop, written once: propose → one target forward over [last, *draft] → verify → roll back → observe.

The target's KV cache holds every token but the last (gpt-fast's convention), so each step scores `last`
together with the draft.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from .model import Session
from .proposers.ar import ARProposer
from .types import DecodeStats, Proposer, SamplingParams
from .verify import verify


def decode(session: Session, proposer: Proposer, prompt: list[int], params: SamplingParams,
           generator: torch.Generator | None, eos_ids: frozenset[int], capacity: int, k: int = 8,
           stats: DecodeStats | None = None) -> Iterator[list[int]]:
    """Yield the tokens emitted at each step until EOS, max_tokens or the cache's capacity.

    An arm that raises mid-request is replaced by AR for the rest of the request (`stats.fallback` says why).
    """
    stats = stats if stats is not None else DecodeStats()
    seq = list(prompt)
    t0 = time.perf_counter()
    session.forward(prompt[:-1]) if len(prompt) > 1 else None
    stats.prefill_s = time.perf_counter() - t0
    budget = min(params.max_tokens, capacity - len(prompt))
    while budget > 0:
        t0 = time.perf_counter()
        try:
            draft = proposer.propose(seq, min(k, budget - 1))
        except Exception as exc:  # an arm's failure must not fail the request
            stats.fallback, proposer = f"{type(exc).__name__}: {exc}", ARProposer()
            draft = proposer.propose(seq, 0)
        t1 = time.perf_counter()
        logits = session.forward([seq[-1], *draft.tokens])                     # [k'+1, V]
        verdict = verify(logits, draft, params, generator, eos_ids, budget)
        session.rollback(len(seq) + verdict.accepted)
        t2 = time.perf_counter()
        try:
            proposer.observe(seq, verdict)
        except Exception as exc:
            stats.fallback, proposer = f"{type(exc).__name__}: {exc}", ARProposer()
        seq.extend(verdict.emitted)
        budget -= len(verdict.emitted)
        _count(stats, len(draft.tokens), verdict.accepted, len(verdict.emitted))
        stats.propose_s += t1 - t0 + time.perf_counter() - t2
        stats.verify_s += t2 - t1
        yield verdict.emitted
        if verdict.emitted[-1] in eos_ids and not params.ignore_eos:
            return


def _count(stats: DecodeStats, drafted: int, accepted: int, emitted: int) -> None:
    stats.steps += 1
    stats.drafts += drafted > 0
    stats.drafted += drafted
    stats.accepted += accepted
    stats.emitted += emitted
