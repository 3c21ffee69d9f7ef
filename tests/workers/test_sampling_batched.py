"""Lossless sampling inside the step loop with the draft budget capping sampled drafts (`cap_sampled_drafts`).

test_sampling.py checks every arm's distribution one request at a time through `decode()`, where no budget runs.
Here the same first-two-token chi-square check runs through the engine's batched step loop on the same 12-token
pair: every arm that drafts from a distribution (sps, early_exit, pearl) is sampled N times (seeds 0..N-1) inside
batches of 1 to 6 requests that mix those arms, with the budget on and a cost curve under which drafting pays at
batch 1-2, pays one token at batch 3 and nothing from batch 4 on. So how far an sps or early_exit request drafts
depends on its batchmates and on its own acceptance so far (the cap is set before drafting; pearl's drafter runs
beside the target and is not capped). The test asserts the caps really varied: some requests drafted nothing,
others drafted, and with the cap off every request drafts. A cut made after drafting that looks at the draft's
values is caught by the same check (`test_a_cut_that_looks_at_the_draft_fails_the_same_check`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace
from itertools import cycle

import pytest
import torch

from metaspec.workers.budget import AttentionCost, CostCurve
from metaspec.workers.engine import Request
from metaspec.workers.scheduler import Scheduler, SchedulerConfig
from metaspec.workers.types import SamplingParams

from ..conftest import make_engine
from .test_sampling import ALPHA, N_SAMPLES, PROMPT, exact_first_two, goodness_of_fit

PARAMS = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)   # the prefill samples token 1; token 2
                                                                           # is a verified draft's (where drafted)
# Which requests share a step depends on when the step loop picks them up, so unlike test_sampling.py's seeded
# runs every run is a fresh draw: a stricter level keeps a correct arm's false failures at 3 arms x 1e-5 a run
# (the biased cut below gives p ~ 1e-20).
LEVEL = 1e-5
SOFT_ARMS = ("early_exit", "pearl", "sps")                                 # drafts carry the drafter's probs
PAY_TO_DRAFT = ("early_exit", "sps")   # the budget caps these; pearl's drafter runs beside the target, uncapped
CURVE = CostCurve((1, 2, 4, 8, 16), (1.0, 1.02, 1.1, 2.5, 8.0))           # ~free up to 4 tokens, then steep
CHUNKS = (1, 2, 3, 4, 5, 6)                                                # batch sizes the requests arrive in


@pytest.fixture(scope="module")
def capped(small_vocab_pair):
    """An engine on the 12-token pair: budget on, sampled drafts capped, no guard, the fixed cost curve."""
    from transformers import AutoModelForCausalLM

    engine = make_engine(small_vocab_pair, batch=SchedulerConfig(max_batch=8, draft_budget=True, draft_guard=False,
                                                                  cap_sampled_drafts=True))
    engine.scheduler.curve, engine.scheduler.attention, engine.scheduler.guard = CURVE, AttentionCost(), None
    hf = AutoModelForCausalLM.from_pretrained(small_vocab_pair.target).eval()
    yield engine, exact_first_two(hf, PROMPT, PARAMS)
    engine.close()


def sample_mixed(engine, arms: list[str], n: int, chunks: tuple[int, ...] = CHUNKS
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Counter]]:
    """Every arm n times (seed i), interleaved, in batches of the `chunks` sizes in turn: per arm the [V, V]
    counts of the first two tokens and how many tokens its requests drafted."""
    vocab = engine.target.vocab_size
    counts = {a: torch.zeros(vocab, vocab, dtype=torch.float64) for a in arms}
    drafted: dict[str, Counter] = defaultdict(Counter)
    work = [Request(prompt_ids=tuple(PROMPT), method=a, params=replace(PARAMS, seed=i)) for i in range(n) for a in arms]
    sizes, at = cycle(chunks), 0
    while at < len(work):
        batch = work[at:at + next(sizes)]
        at += len(batch)
        for request, result in zip(batch, engine.generate_many(batch)):
            assert len(result.token_ids) == PARAMS.max_tokens, (request.method, result.finish_reason)
            counts[request.method][result.token_ids[0], result.token_ids[1]] += 1
            drafted[request.method][result.stats.drafted] += 1
    return counts, drafted


def test_capped_sampled_drafts_keep_the_target_distribution_in_mixed_batches(capped):
    engine, truth = capped
    arms = [a for a in SOFT_ARMS if a in engine.available_methods()]
    assert {"sps", "early_exit"} <= set(arms), engine.available_methods()
    counts, drafted = sample_mixed(engine, arms, N_SAMPLES)
    for arm in arms:
        p_value, tv = goodness_of_fit(counts[arm], truth)
        print(f"{arm} capped in mixed batches: chi-square p={p_value:.3g} TV={tv:.3f} drafted {dict(drafted[arm])}")
        assert p_value > LEVEL, f"{arm}: chi-square p={p_value:.2e}, TV={tv:.3f}"
        if arm in PAY_TO_DRAFT:   # the caps were in play: some requests drafted nothing (capped to 0), others drafted
            assert drafted[arm][0] > N_SAMPLES // 10 and N_SAMPLES - drafted[arm][0] > N_SAMPLES // 10
    uncapped = replace(engine.scheduler.cfg, cap_sampled_drafts=False)   # where no cap applies, every request drafts
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine.scheduler, "cfg", uncapped)
        assert all(0 not in d for d in sample_mixed(engine, arms, 20)[1].values())


def test_a_cut_that_looks_at_the_draft_fails_the_same_check(capped, monkeypatch):
    """Dropping a sampled draft after drafting whenever its first token is the drafter's own favourite biases the
    sample: the drafts left to verify are then drawn from q without that token, not from q. Requests arrive one
    at a time here, where the curve lets a request draft (measured: ~64% of them drafted)."""
    engine, truth = capped
    cut = Scheduler._cut

    def peeking(self, decoding, drafts, forced, base_tokens):
        out = cut(self, decoding, drafts, forced, base_tokens)
        return [d.head(0) if d.probs is not None and d.tokens[:1] == [int(d.probs[0].argmax())] else d for d in out]
    monkeypatch.setattr(Scheduler, "_cut", peeking)
    counts, drafted = sample_mixed(engine, ["sps"], N_SAMPLES, chunks=(1,))
    p_value, tv = goodness_of_fit(counts["sps"], truth)
    print(f"sps with a value-dependent cut: chi-square p={p_value:.3g} TV={tv:.3f} drafted {dict(drafted['sps'])}")
    assert p_value < ALPHA, (p_value, tv)
