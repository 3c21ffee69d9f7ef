"""Verification: greedy prefix match, EOS and budget truncation, p/q rejection sampling (one-hot and soft drafts)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from metaspec.workers.types import Draft, SamplingParams, Verdict
from metaspec.workers.verify import verify

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=1.0)
ALPHA = 1e-3  # chi-square p-value below which a sampled distribution is declared wrong


def _argmax_logits(best: list[int], vocab: int = 8) -> torch.Tensor:
    """[len(best), vocab] logits whose row-wise argmax is `best`."""
    logits = torch.randn(len(best), vocab, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(len(best)), best] = 10.0
    return logits


def _prob_logits(rows: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax (temperature 1) is `rows`; zero probability becomes -inf."""
    return torch.tensor(rows).log()


# --- greedy ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("draft, accepted, emitted", [
    ([], 0, [2]),                          # AR step: the bonus only
    ([2, 3, 1], 3, [2, 3, 1, 5]),          # full acceptance + bonus
    ([2, 3, 4], 2, [2, 3, 1]),             # mismatch at 2: recovered = target's argmax there
    ([6, 3, 1], 0, [2]),                   # first token wrong: later matches do not count
    ([2, 0, 1], 1, [2, 3]),
])
def test_greedy_prefix_match(draft, accepted, emitted):
    logits = _argmax_logits([2, 3, 1, 5][: len(draft) + 1])
    assert verify(logits, Draft(draft), GREEDY, None) == Verdict(accepted, emitted)


def test_greedy_ignores_draft_probs():
    logits = _argmax_logits([2, 3, 1])
    q = torch.full((2, 8), 1 / 8)
    assert verify(logits, Draft([2, 4], q), GREEDY, None) == Verdict(1, [2, 3])


def test_eos_inside_an_accepted_draft_cuts_emitted_there():
    logits = _argmax_logits([4, 7, 5, 6])
    verdict = verify(logits, Draft([4, 7, 5]), GREEDY, None, eos_ids=frozenset({7}))
    assert verdict.emitted == [4, 7]
    assert verdict.accepted == 2


def test_eos_as_bonus_and_ignore_eos():
    logits = _argmax_logits([4, 7])
    assert verify(logits, Draft([4]), GREEDY, None, eos_ids=frozenset({7})).emitted == [4, 7]
    keep_going = SamplingParams(ignore_eos=True)
    logits = _argmax_logits([7, 5, 6])
    assert verify(logits, Draft([7, 5]), keep_going, None, eos_ids=frozenset({7})).emitted == [7, 5, 6]


def test_first_of_several_eos_ids_wins():
    logits = _argmax_logits([4, 6, 7, 1])
    verdict = verify(logits, Draft([4, 6, 7]), GREEDY, None, eos_ids=frozenset({6, 7}))
    assert verdict.emitted == [4, 6]


@pytest.mark.parametrize("budget, emitted", [(1, [2]), (2, [2, 3]), (3, [2, 3, 1]), (4, [2, 3, 1, 5]), (9, [2, 3, 1, 5])])
def test_budget_truncation(budget, emitted):
    verdict = verify(_argmax_logits([2, 3, 1, 5]), Draft([2, 3, 1]), GREEDY, None, budget=budget)
    assert verdict.emitted == emitted
    assert verdict.accepted == min(3, budget)


def test_budget_and_eos_together():
    logits = _argmax_logits([2, 7, 1, 5])
    verdict = verify(logits, Draft([2, 7, 1]), GREEDY, None, eos_ids=frozenset({7}), budget=1)
    assert verdict.emitted == [2]


# --- rejection sampling ------------------------------------------------------------------------------------------

def test_one_hot_draft_is_always_accepted_where_target_is_certain():
    p = _prob_logits([[0, 1, 0, 0], [0, 0, 1, 0], [0.25, 0.25, 0.25, 0.25]])
    for seed in range(50):
        verdict = verify(p, Draft([1, 2]), SAMPLED, seed=seed)
        assert verdict.accepted == 2 and verdict.emitted[:2] == [1, 2]


def test_one_hot_draft_is_never_accepted_where_target_gives_zero():
    p = _prob_logits([[0.5, 0, 0.5, 0], [0.25, 0.25, 0.25, 0.25]])
    for seed in range(50):
        verdict = verify(p, Draft([1]), SAMPLED, seed=seed)
        assert verdict.accepted == 0 and verdict.emitted[0] in (0, 2)


def _first_token_counts(p_logits: torch.Tensor, draft: Draft, n: int, params=SAMPLED) -> torch.Tensor:
    counts = torch.zeros(p_logits.shape[-1])
    for seed in range(n):
        counts[verify(p_logits, draft, params, seed=1234 + seed).emitted[0]] += 1
    return counts


def _p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled a token the target gives zero probability"
    return float(chisquare(counts[keep].numpy(), (probs[keep] * counts.sum()).numpy()).pvalue)


@pytest.mark.parametrize("draft_token", [0, 1, 3])
def test_one_hot_draft_leaves_first_token_distributed_as_target(draft_token):
    """probs=None means q is one-hot: accept w.p. p(x), otherwise resample from p without x."""
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    logits = _prob_logits([probs.tolist(), [0.25] * 4])
    counts = _first_token_counts(logits, Draft([draft_token]), n=4000)
    assert _p_value(counts, probs) > ALPHA


def test_soft_draft_leaves_first_token_distributed_as_target():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25, 0.0])
    q = torch.tensor([0.4, 0.1, 0.1, 0.2, 0.2])
    logits = _prob_logits([probs.tolist(), [0.2] * 5])
    gen = torch.Generator().manual_seed(7)
    counts = torch.zeros(5)
    for seed in range(4000):
        x = int(torch.multinomial(q, 1, generator=gen))
        counts[verify(logits, Draft([x], q[None]), SAMPLED, seed=seed).emitted[0]] += 1
    assert _p_value(counts, probs) > ALPHA


def test_the_distribution_check_rejects_a_biased_sampler():
    """The check above has power: 'resample from p after a rejection' (a classic bug) is caught."""
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(4)
    for _ in range(4000):  # draft token 3, one-hot q: accept w.p. p(3), else resample from p (may give 3 again)
        accept = torch.rand((), generator=gen) < probs[3]
        counts[3 if accept else int(torch.multinomial(probs, 1, generator=gen))] += 1
    assert _p_value(counts, probs) < ALPHA


def test_draft_probs_with_a_padded_vocab_are_aligned_by_token_id():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    q = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])  # drafter vocab padded to 6, all mass on token 3
    logits = _prob_logits([probs.tolist(), [0.25] * 4])
    counts = _first_token_counts(logits, Draft([3], q), n=4000)
    assert _p_value(counts, probs) > ALPHA


def test_sampled_verdict_is_consistent():
    logits = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    for seed in range(200):
        draft = Draft(torch.randint(0, 16, (3,), generator=gen).tolist())
        verdict = verify(logits, draft, SAMPLED, seed=seed)
        assert 0 <= verdict.accepted <= 3
        assert verdict.emitted[: verdict.accepted] == draft.tokens[: verdict.accepted]
        assert len(verdict.emitted) == verdict.accepted + 1
        if verdict.accepted < 3:  # a one-hot draft's rejected token is never the recovered one
            assert verdict.emitted[-1] != draft.tokens[verdict.accepted]


def test_one_hot_draft_emits_the_targets_own_draw_like_ar():
    """So a seeded request emits what AR would, whatever a deterministic arm drafts (shared tables included)."""
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(8))
    for seed in range(30):
        ar = [verify(logits[i: i + 1], Draft([]), SAMPLED, seed=seed, position=i).emitted[0] for i in range(5)]
        for draft in ([], ar[:4], ar[:2] + [(ar[2] + 1) % 6], [(ar[0] + 1) % 6, 3]):
            verdict = verify(logits[: len(draft) + 1], Draft(draft), SAMPLED, seed=seed)
            assert verdict.emitted == ar[: len(verdict.emitted)], (seed, draft, verdict)


def test_same_seed_gives_same_verdicts():
    logits = torch.randn(4, 16, generator=torch.Generator().manual_seed(6))
    runs = [[verify(logits, Draft([1, 2, 3]), SAMPLED, seed=99 + i) for i in range(20)] for _ in range(2)]
    assert runs[0] == runs[1]
    assert len({tuple(v.emitted) for v in runs[0]}) > 1
