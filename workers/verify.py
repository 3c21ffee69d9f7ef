"""Verification, written once: greedy prefix match, or the p/q rejection rule with residual resampling.

A deterministic drafter (`Draft.probs is None`) is a one-hot q, so n-gram arms stay lossless under sampling:
accept x with probability p(x); on rejection resample from p with x removed. EOS and the token budget cut
`emitted` here and nowhere else.
"""

from __future__ import annotations

import torch

from .sampling import probs_from_logits, sample
from .types import Draft, SamplingParams, Verdict


def verify(logits: torch.Tensor, draft: Draft, params: SamplingParams, generator: torch.Generator | None,
           eos_ids: frozenset[int] = frozenset(), budget: int | None = None) -> Verdict:
    """Judge `draft` against target `logits` [k'+1, V] scored over [last, *draft.tokens].

    >>> verify(torch.eye(4)[[2, 3, 1]] * 9, Draft([2, 0]), SamplingParams()).emitted   # argmax 2, 3, 1
    [2, 3]
    """
    if params.greedy:
        accepted, emitted = _greedy(logits, draft.tokens)
    else:
        accepted, emitted = _rejection(probs_from_logits(logits, params), draft, generator)
    return _truncate(accepted, emitted, eos_ids, budget, params.ignore_eos)


def _greedy(logits: torch.Tensor, tokens: list[int]) -> tuple[int, list[int]]:
    best = logits.argmax(-1).tolist()                                    # [k'+1]
    accepted = 0
    while accepted < len(tokens) and tokens[accepted] == best[accepted]:
        accepted += 1
    return accepted, tokens[:accepted] + [best[accepted]]


def _rejection(p: torch.Tensor, draft: Draft, generator: torch.Generator | None) -> tuple[int, list[int]]:
    """p: [k'+1, V] target distribution; q: [k', V] drafter distribution or one-hot when absent."""
    vocab = p.shape[-1]
    for i, x in enumerate(draft.tokens):
        q = _draft_row(draft, i, vocab)
        p_x, q_x = p[i, x].item(), q[x].item()
        if q_x > 0 and torch.rand((), generator=generator).item() * q_x < p_x:  # accept w.p. min(1, p/q)
            continue
        residual = (p[i] - q).clamp_min(0)
        if residual.sum() <= 0:  # p == q up to rounding: any token of p is a valid recovery
            residual = p[i]
        return i, draft.tokens[:i] + [sample(residual / residual.sum(), generator)]
    return len(draft.tokens), draft.tokens + [sample(p[len(draft.tokens)], generator)]


def _draft_row(draft: Draft, i: int, vocab: int) -> torch.Tensor:
    if draft.probs is None:
        q = torch.zeros(vocab)
        q[draft.tokens[i]] = 1.0
        return q
    q = draft.probs[i].float()
    if q.shape[-1] != vocab:  # drafter vocab padded differently from the target's: align by token id
        q = torch.nn.functional.pad(q[:vocab], (0, max(0, vocab - q.shape[-1])))
    return q


def _truncate(accepted: int, emitted: list[int], eos_ids: frozenset[int], budget: int | None,
              ignore_eos: bool) -> Verdict:
    if not ignore_eos:
        for i, token in enumerate(emitted):
            if token in eos_ids:
                emitted = emitted[: i + 1]
                break
    if budget is not None:
        emitted = emitted[:budget]
    return Verdict(accepted=min(accepted, len(emitted)), emitted=emitted)
