"""Verification, written once and vectorised over a step's batch: greedy prefix match, or the p/q rejection rule.

Every scored row gets the target's own draw y (greedy: the argmax; sampled: argmax(p / E) with E the row's
position-keyed noise, workers/sampling.py). A deterministic draft (`Draft.probs is None`, chain or tree) keeps a
node iff it equals y and emits y where it stops: a one-hot q makes the p/q rule exactly this (accept x with
probability p(x), else a sample of p without x), so n-gram arms stay lossless under sampling and emit AR's seeded
sample. A drafter's distribution q (sampled sps, early exit) uses the p/q rule: accept x_i when u_i q(x_i) <
p(x_i), on the first rejection emit a sample of the residual (p - q)+; all accepted, the bonus is y after the last.

All device work of a batch ends in ONE host transfer (`torch.cat(...).tolist()`); the walk along each draft is
host-side list work. EOS and the token budget cut `emitted` here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import Noise, probs_from_logits, race, uniform
from .types import Draft, SamplingParams, Verdict


@dataclass(frozen=True)
class Scored:
    """One request's share of a step's verification."""

    logits: torch.Tensor          # [k'+1, V] target logits over [last, *draft.tokens] (grammar-masked if any)
    draft: Draft
    params: SamplingParams
    seed: int = 0                 # the request's seed (sampled requests)
    position: int = 0             # sequence index of the token row 0 predicts (= len(seq))
    budget: int | None = None     # tokens the request may still emit


def verify(logits: torch.Tensor, draft: Draft, params: SamplingParams, seed: int = 0, position: int = 0,
           eos_ids: frozenset[int] = frozenset(), budget: int | None = None, noise: Noise | None = None) -> Verdict:
    """Judge one draft (a batch of one).

    >>> verify(torch.eye(4)[[2, 3, 1]] * 9, Draft([2, 0]), SamplingParams()).emitted   # argmax 2, 3, 1
    [2, 3]
    """
    return verify_batch([Scored(logits, draft, params, seed, position, budget)], noise or Noise(logits.device),
                        eos_ids)[0]


def verify_batch(batch: list[Scored], noise: Noise, eos_ids: frozenset[int] = frozenset()) -> list[Verdict]:
    """Verdicts of every request of a step, with one host sync for all of them."""
    if not batch:
        return []
    greedy = [i for i, s in enumerate(batch) if s.params.greedy]
    packs: dict[int, torch.Tensor] = {}
    if greedy:                                                   # one argmax over every greedy row of the batch
        best = torch.cat([batch[i].logits for i in greedy]).argmax(-1)
        for i, part in zip(greedy, best.split([len(batch[i].logits) for i in greedy])):
            packs[i] = part
    for i, s in enumerate(batch):
        if i not in packs:
            packs[i] = _sampled(s, noise)
    flat = torch.cat([packs[i] for i in range(len(batch))]).tolist()      # the step's one host sync
    verdicts, at = [], 0
    for i, s in enumerate(batch):
        n = len(packs[i])
        verdicts.append(_walk(s, flat[at: at + n], eos_ids))
        at += n
    return verdicts


def _sampled(s: Scored, noise: Noise) -> torch.Tensor:
    """[k'+1] target draws y; with a drafter q also [k'] acceptances and [k'] residual draws: one int64 pack."""
    p = probs_from_logits(s.logits, s.params)                                # [k'+1, V]
    positions = [s.position] + [s.position + d for d in s.draft.depths()]
    e = noise.rows(s.seed, positions, p.shape[-1])                           # [k'+1, V+1]
    y = race(p, e)
    if s.draft.probs is None or not s.draft.tokens:
        return y
    q = _draft_rows(s.draft.probs, p.shape[-1]).to(p.device)                # [k', V]
    x = torch.tensor(s.draft.tokens, device=p.device)[:, None]
    p_x, q_x = p[:-1].gather(1, x)[:, 0], q.gather(1, x)[:, 0]
    accept = (q_x > 0) & (uniform(e[:-1]) * q_x < p_x)                      # accept w.p. min(1, p/q)
    return torch.cat([y, accept.long(), race(_residual(p[:-1], q), e[:-1])])


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[k', V] (p - q)+ per row (unnormalised: the race normalises); p itself where p == q up to rounding."""
    r = (p - q).clamp_min(0)
    return torch.where(r.sum(-1, keepdim=True) > 0, r, p)


def _draft_rows(q: torch.Tensor, vocab: int) -> torch.Tensor:
    q = q.float()
    if q.shape[-1] != vocab:  # drafter vocab padded differently from the target's: align by token id
        q = torch.nn.functional.pad(q[..., :vocab], (0, max(0, vocab - q.shape[-1])))
    return q


def _walk(s: Scored, draws: list[int], eos_ids: frozenset[int]) -> Verdict:
    draft, k = s.draft, len(s.draft.tokens)
    if draft.parents is not None:
        children: dict[int, dict[int, int]] = {}
        for i, (p, t) in enumerate(zip(draft.parents, draft.tokens)):
            children.setdefault(p, {}).setdefault(t, i)
        node, path = -1, []
        while (nxt := children.get(node, {}).get(draws[node + 1])) is not None:
            path.append(nxt)
            node = nxt
        emitted = [draft.tokens[i] for i in path] + [draws[node + 1]]
        return _truncate(len(path), emitted, eos_ids, s.budget, s.params.ignore_eos, path)
    y = draws[: k + 1]
    if len(draws) > k + 1:                                  # the p/q rule: [y, accept, residual draws]
        accept, z = draws[k + 1: 2 * k + 1], draws[2 * k + 1:]
        a = next((i for i, ok in enumerate(accept) if not ok), k)
        emitted = draft.tokens[:a] + [z[a] if a < k else y[k]]
    else:
        a = 0
        while a < k and draft.tokens[a] == y[a]:
            a += 1
        emitted = draft.tokens[:a] + [y[a]]
    return _truncate(a, emitted, eos_ids, s.budget, s.params.ignore_eos)


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
