"""Verification, written once: greedy prefix match, or the p/q rejection rule with residual resampling.

A deterministic drafter (`Draft.probs is None`) is a one-hot q, so n-gram arms stay lossless under sampling:
accept x with probability p(x); on rejection resample from p with x removed. Tree drafts (deterministic) try
the children of the current node in turn, each with the residual probability left after zeroing the rejected
siblings and renormalising; with no child accepted, the residual is sampled. EOS and the token budget cut
`emitted` here and nowhere else.
"""

from __future__ import annotations

import torch

from .sampling import probs_from_logits, sample
from .types import Draft, SamplingParams, Verdict


def verify(logits: torch.Tensor, draft: Draft, params: SamplingParams, generator: torch.Generator | None = None,
           eos_ids: frozenset[int] = frozenset(), budget: int | None = None) -> Verdict:
    """Judge `draft` against target `logits` [k'+1, V] scored over [last, *draft.tokens].

    >>> verify(torch.eye(4)[[2, 3, 1]] * 9, Draft([2, 0]), SamplingParams()).emitted   # argmax 2, 3, 1
    [2, 3]
    """
    if draft.parents is not None:
        path, emitted = _tree(logits, draft, params, generator)
        return _truncate(len(path), emitted, eos_ids, budget, params.ignore_eos, path)
    if params.greedy:
        accepted, emitted = _greedy(logits, draft.tokens)
    else:
        accepted, emitted = _rejection(probs_from_logits(logits, params), draft, generator)
    return _truncate(accepted, emitted, eos_ids, budget, params.ignore_eos)


def _tree(logits: torch.Tensor, draft: Draft, params: SamplingParams,
          generator: torch.Generator | None) -> tuple[list[int], list[int]]:
    """Walk the tree from `last`: row 0 of logits scores `last`, row i + 1 scores node i."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(draft.parents):
        children.setdefault(p, []).append(i)
    best = logits.argmax(-1).tolist() if params.greedy else None
    probs = None if params.greedy else probs_from_logits(logits, params)
    node, path = -1, []
    while True:
        kids = children.get(node, [])
        if best is not None:
            nxt = next((c for c in kids if draft.tokens[c] == best[node + 1]), None)
            token = best[node + 1]
        else:
            nxt, token = _try_siblings(probs[node + 1].clone(), [draft.tokens[c] for c in kids], generator)
            nxt = kids[nxt] if nxt is not None else None
        if nxt is None:
            return path, [draft.tokens[i] for i in path] + [token]
        path.append(nxt)
        node = nxt


def _try_siblings(residual: torch.Tensor, tokens: list[int],
                  generator: torch.Generator | None) -> tuple[int | None, int]:
    """Accept sibling j with its residual probability; on rejection zero it and renormalise. -> (j or None, token)"""
    for j, x in enumerate(tokens):
        total = residual.sum()
        if torch.rand((), generator=generator).item() * total < residual[x]:
            return j, x
        residual[x] = 0.0
    return None, sample(residual / residual.sum(), generator)


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
        if draft.probs is None:  # one-hot q: y ~ p, keep x iff y == x (P = p(x); else y ~ p without x). One draw
            y = sample(p[i], generator)  # per emitted token, as in AR: a seed gives AR's output whatever is drafted
            if y == x:
                continue
            return i, draft.tokens[:i] + [y]
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
              ignore_eos: bool, path: list[int] | None = None) -> Verdict:
    if not ignore_eos:
        for i, token in enumerate(emitted):
            if token in eos_ids:
                emitted = emitted[: i + 1]
                break
    if budget is not None:
        emitted = emitted[:budget]
    accepted = min(accepted, len(emitted))
    return Verdict(accepted=accepted, emitted=emitted, path=None if path is None else path[:accepted])
