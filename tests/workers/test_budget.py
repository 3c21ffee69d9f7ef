"""The per-step draft budget: drafts grow when the batch is small and shrink to nothing when they stop paying."""

from __future__ import annotations

from dataclasses import replace

import pytest

from metaspec.workers.budget import AttentionCost, Ask, CostCurve, DraftGuard, default_curve, plan
from metaspec.workers.draft_length import AcceptanceBook
from metaspec.workers.engine import Request
from metaspec.workers.proposers.ngram_store import match_order
from metaspec.workers.proposers.pld import lookup
from metaspec.workers.scheduler import SchedulerConfig
from metaspec.workers.types import SamplingParams
from tests.conftest import make_engine

CURVE = CostCurve((1, 2, 4, 8, 16, 32, 64), (1.0, 1.18, 1.18, 1.38, 1.74, 2.48, 4.08))   # PERF_NOTES' shape


def test_alone_a_long_draft_is_nearly_free():
    assert plan([Ask(0.8, 8)], 1, CURVE) == [8]


def test_drafts_shrink_as_the_batch_grows():
    lengths = [sum(plan([Ask(0.7, 8)] * b, b, CURVE)) / b for b in (1, 4, 16, 32)]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > 2 * lengths[-1], lengths


def test_nothing_is_drafted_where_no_token_pays():
    """A flat curve beyond 64 tokens still costs per token: at poor acceptance every draft is empty (batched AR)."""
    assert plan([Ask(0.05, 8)] * 64, 64, CURVE) == [0] * 64


def test_the_likeliest_tokens_get_the_budget_first():
    caps = plan([Ask(0.9, 8), Ask(0.3, 8)] * 12, 24, CURVE)
    assert sum(caps[::2]) > sum(caps[1::2])


def test_drafting_cost_counts():
    cheap, dear = plan([Ask(0.6, 8)], 1, CURVE), plan([Ask(0.6, 8, cost_s=0.3)], 1, CURVE)
    assert dear[0] < cheap[0]


def test_fixed_draft_tokens_are_kept():
    assert plan([Ask(0.01, 5, fixed=5)] * 4, 4, CURVE) == [5] * 4


def test_curve_interpolates_and_extrapolates():
    c = CostCurve((1, 8), (1.0, 2.0))
    assert c.time(1) == 1.0 and c.time(8) == 2.0 and abs(c.time(4) - (1 + 3 / 7)) < 1e-9 and c.time(15) == 3.0
    assert default_curve(1.0).time(64) == pytest.approx(4.08)


# one-token step = 1.0; each request's cache costs 0.01 per 100 tokens; a padded query row 1/3 of that
ATTENTION = AttentionCost(split_s=0.05, pad_s=0.0001 / 3, context=100, row_s=0.0001)


def test_attention_extra_follows_the_forwards_split():
    assert ATTENTION.extra(16, 0, 0, 1, 300) == 0.0
    assert ATTENTION.extra(16, 2, 600, 5, 300) == pytest.approx(2 * 0.05 * 3)       # a call per draft
    assert ATTENTION.extra(16, 9, 2700, 3, 300) == pytest.approx(0.0001 / 3 * 16 * 2 * 300)   # all padded


def test_padding_every_request_to_a_draft_is_priced():
    """At 16 requests over long caches, one draft token each pads all 16 queries: with attention priced fewer
    requests draft, and fewer tokens in all, than with the GEMM rows alone."""
    asks = [Ask(0.7, 8, context=300)] * 16
    priced, rows_only = plan(asks, 16, CURVE, ATTENTION, 16, 16 * 300), plan(asks, 16, CURVE)
    assert sum(priced) < sum(rows_only) and sum(1 for c in priced if c) < 16, (priced, rows_only)
    assert plan([Ask(0.8, 8, context=300)], 1, CURVE, ATTENTION, 1, 300)[0] >= 6   # alone: still nearly free


@pytest.fixture(scope="module")
def budget_engine(tiny_pair):
    """The tiny engine with the draft budget on (the shared fixture has it off)."""
    engine = make_engine(tiny_pair, batch=SchedulerConfig(draft_budget=True, draft_guard=True, guard_from_batch=1))
    yield engine
    engine.close()


def test_the_measured_curve_never_decreases(budget_engine):
    c = budget_engine.scheduler.curve
    assert list(c.seconds) == sorted(c.seconds) and c.tokens[0] == 1 and c.seconds[0] > 0
    a = budget_engine.scheduler.attention        # measured on the same pool: finite, non-negative, scaled
    assert a.context > 1 and min(a.split_s, a.pad_s, a.row_s) >= 0
    assert budget_engine.pool.free == budget_engine.pool.slots      # measuring gave every slot back


def test_a_loaded_step_cuts_drafts_and_says_why(budget_engine):
    """With a curve where every scored token costs a full forward, draft tokens stop paying: they are cut, the
    reason is recorded, and the output is still AR's."""
    saved = budget_engine.scheduler.curve, budget_engine.scheduler.guard
    budget_engine.scheduler.curve = CostCurve((1, 2), (1.0, 2.0))
    budget_engine.scheduler.guard = None        # the plan alone (the guard's plain steps: below)
    try:
        requests = [Request(prompt=f"def f{i}(x):\n    return x +", method="pld",
                            params=SamplingParams(max_tokens=24)) for i in range(6)]
        got = budget_engine.generate_many(requests)
    finally:
        budget_engine.scheduler.curve, budget_engine.scheduler.guard = saved
    want = [budget_engine.generate(Request(prompt=r.prompt, method="ar", params=r.params)) for r in requests]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    # (not "nothing accepted": a step that also carries a request's prefill chunk is slow anyway, and a drafted
    # token may pay there)
    assert sum(g.stats.budget_cut for g in got) > 0
    assert any("worth their forward cost" in g.stats.budget_reason for g in got)


def test_a_drafter_that_does_not_pay_is_not_run(budget_engine):
    """An arm that pays to draft (sps) is capped before it drafts, every step: where no token pays, its drafter
    never runs (the cap used to lapse after a step without a draft, so it drafted every other step only to be
    cut). The output is still AR's. One request at a time: a step that also carries another request's prefill
    chunk is slow anyway, and there a drafted token may pay for itself."""
    saved = budget_engine.scheduler.curve
    budget_engine.scheduler.curve = CostCurve((1, 2), (1.0, 2.0))
    try:
        requests = [Request(prompt=f"def g{i}(y):\n    return y *", method="sps", params=SamplingParams(max_tokens=24))
                    for i in range(3)]
        got = [budget_engine.generate(r) for r in requests]
    finally:
        budget_engine.scheduler.curve = saved
    want = [budget_engine.generate(Request(prompt=r.prompt, method="ar", params=r.params)) for r in requests]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert sum(g.stats.drafted for g in got) == 0 and sum(g.stats.budget_cut for g in got) == 0


def test_the_guard_runs_the_faster_mode_and_keeps_measuring_the_other():
    g = DraftGuard(probe_every=8, decay=0.5, clear_gap=2.0)
    assert all(g.drafting(20) for _ in range(7)) and not g.drafting(20)      # unmeasured: draft, probe plain
    for _ in range(4):
        g.observe(20, True, 40, 0.1)     # drafting: 400 tokens/s
        g.observe(20, False, 20, 0.04)   # plain: 500 tokens/s
    modes = [g.drafting(20) for _ in range(16)]
    assert modes.count(True) == 2 and modes.count(False) == 14               # plain, probing drafting 1 in 8
    assert g.drafting(1) is True                                              # another batch size: its own
    for _ in range(4):
        g.observe(20, True, 80, 0.1)     # drafting got better (longer accepted drafts): 800 tokens/s
    assert sum(g.drafting(20) for _ in range(16)) == 14
    assert g.rates()["16"]["plain"] == pytest.approx(500) and g.rates()["16"]["draft"] > 700
    for _ in range(8):
        g.observe(20, True, 200, 0.1)    # drafting 2,000 tokens/s: a clear lead, plain probed 1 step in 32
    assert sum(not g.drafting(20) for _ in range(64)) == 2
    g.observe(20, True, 5, 0.0)          # a zero-length step is ignored
    with pytest.raises(ValueError):
        DraftGuard(probe_every=1)


@pytest.mark.parametrize("from_batch", [1, 8])
def test_plain_steps_keep_every_arms_output_and_say_why(budget_engine, from_batch):
    """Where plain steps measure faster, a mixed batch decodes without drafts (probing drafting 1 step in 16):
    every request's output is still AR's, and the cut drafts' reason names the measured rates. Below
    `guard_from_batch` the guard does not act: the same six requests then draft every step."""
    scheduler = budget_engine.scheduler
    guard, cfg = scheduler.guard, scheduler.cfg
    saved = dict(guard.buckets)
    for batch in (1, 2, 4, 8):
        guard.observe(batch, True, 1, 1.0)           # drafting "measured" at 1 token/s, plain at 10,000
        guard.observe(batch, False, 10_000, 1.0)
    plain_before = scheduler.metrics.plain_steps
    scheduler.cfg = replace(cfg, guard_from_batch=from_batch)
    try:
        requests = [Request(prompt=f"def h{i}(z):\n    return z -", method=m, params=SamplingParams(max_tokens=24))
                    for i, m in enumerate(["pld", "sps", "ngram_store", "recycling", "early_exit", "pld"])]
        got = budget_engine.generate_many(requests)
    finally:
        scheduler.cfg = cfg
        guard.buckets.clear()
        guard.buckets.update(saved)
    want = [budget_engine.generate(Request(prompt=r.prompt, method="ar", params=r.params)) for r in requests]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    plain = scheduler.metrics.plain_steps - plain_before
    said = any("plain decoding measured faster" in g.stats.budget_reason for g in got)
    if from_batch == 1:
        assert plain >= 16 and said
    else:
        assert plain == 0 and not said and sum(g.stats.accepted for g in got) > 0


@pytest.mark.parametrize("cap", [False, True])
def test_sampled_drafts_are_capped_only_where_the_pool_allows_it(budget_engine, cap):
    """A sampled request's drafts from a distribution (sps, early_exit) are never capped by default: they draft
    on however little they pay. With `cap_sampled_drafts` the budget caps them before they are drafted, like any
    arm that pays to draft: where no token pays they are not drafted at all, and the request is sampled AR
    (position-keyed noise: the same tokens as AR with the same seed)."""
    scheduler = budget_engine.scheduler
    saved = scheduler.curve, scheduler.guard, scheduler.cfg
    scheduler.curve, scheduler.guard = CostCurve((1, 2), (1.0, 2.0)), None
    scheduler.cfg = replace(saved[2], cap_sampled_drafts=cap)
    try:
        params = SamplingParams(max_tokens=20, temperature=0.9, seed=7, ignore_eos=True)
        requests = [Request(prompt=f"def k{i}(q):\n    return q //", method=m, params=params)
                    for i, m in enumerate(["sps", "early_exit"])]
        got = [budget_engine.generate(r) for r in requests]
        ar = [budget_engine.generate(Request(prompt=r.prompt, method="ar", params=params)) for r in requests]
    finally:
        scheduler.curve, scheduler.guard, scheduler.cfg = saved
    drafted = [g.stats.drafted for g in got]
    if cap:
        assert drafted == [0, 0] and [g.token_ids for g in got] == [a.token_ids for a in ar]
    else:
        assert all(d > 0 for d in drafted) and sum(g.stats.budget_cut for g in got) == 0


def test_the_book_learns_each_class_apart():
    book = AcceptanceBook()
    for _ in range(50):
        book.update(("pld", False, 1), 0, 4)          # sampled 1-gram matches: never accepted
        book.update(("pld", True, 3), 4, 4)           # greedy 3-gram matches: always
    assert book.alpha(("pld", False, 1)) < 0.1 and book.alpha(("pld", True, 3)) > 0.9
    assert book.alpha(("pld", True, 1)) == 0.6        # an unseen class reads the prior
    assert set(book.rates()) == {"pld/sampled/1", "pld/greedy/3"}
    off = AcceptanceBook(learnt=False)
    off.update(("pld", False, 1), 0, 4)
    assert off.alpha(("pld", False, 1)) == 0.6 and off.rates() == {}


def test_lookups_say_how_long_a_match_they_drafted_from():
    from metaspec.workers.store import NgramConfig, NgramTable

    assert lookup([5, 6, 7, 8, 5, 6], 2) == ([7, 8], 2)
    assert lookup([5, 6, 7, 8, 9, 6], 2) == ([7, 8], 1)
    assert lookup([1, 2, 3], 2) == ([], 0)
    shared, own = NgramTable(NgramConfig(), 32), NgramTable(NgramConfig(), 32)
    shared.learn([], [1, 2, 7])
    own.learn([], [5, 2, 9])
    assert [match_order([own, shared], s) for s in ([1, 2], [4, 2], [3])] == [2, 1, 0]


def test_learnt_acceptance_cuts_what_the_replica_saw_rejected(budget_engine):
    """Sampled lookups that this replica learnt are almost never accepted are cut before they are verified; the
    same arm's greedy drafts, of a class it has not learnt, are not. Every request's tokens are still AR's (the
    sampled ones with its seed: position-keyed noise)."""
    scheduler = budget_engine.scheduler
    saved = scheduler.curve, scheduler.guard, scheduler.book
    scheduler.curve, scheduler.guard, scheduler.book = CURVE, None, AcceptanceBook()
    for evidence in (-1, 0, 1, 2, 3):
        for _ in range(50):
            scheduler.book.update(("PLDProposer", False, evidence), 0, 4)
    try:
        sampled = SamplingParams(max_tokens=24, temperature=0.9, seed=11, ignore_eos=True)
        greedy = SamplingParams(max_tokens=24, ignore_eos=True)
        every = tuple(range(4, budget_engine.target.vocab_size))     # whatever is sampled, a 1-gram matches
        requests = [Request(prompt_ids=every[i:] + every[:i], method="pld", params=p)
                    for i, p in enumerate([sampled, greedy])]
        got = [budget_engine.generate(r) for r in requests]
        learnt = scheduler.book.rates()
    finally:
        scheduler.curve, scheduler.guard, scheduler.book = saved
    want = [budget_engine.generate(Request(prompt_ids=r.prompt_ids, method="ar", params=r.params)) for r in requests]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert got[0].stats.drafted == 0 and got[0].stats.budget_cut > 0, got[0].stats
    assert got[1].stats.drafted > 0, got[1].stats
    assert any(k.startswith("PLDProposer/greedy/") and k != "PLDProposer/greedy/-1" for k in learnt), learnt
