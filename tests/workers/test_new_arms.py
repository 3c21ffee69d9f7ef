"""Arm-specific behaviour of ngram_store, recycling and early_exit (greedy equality and sampling are covered for
every arm by test_contract.py and test_sampling.py); the tables here are process-local (Redis: test_tables.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from metaspec.workers.decode import decode
from metaspec.workers.engine import Request
from metaspec.workers.model import ModelConfig, load_model
from metaspec.workers.proposers.early_exit import EarlyExitConfig, EarlyExitProposer, default_exits, plan
from metaspec.workers.proposers.ngram_store import NgramStoreConfig, NgramStoreProposer, ngram_tree
from metaspec.workers.proposers.recycling import RecyclingConfig, RecyclingProposer, recycling_tree
from metaspec.workers.registry import ArmContext, build
from metaspec.workers.store import AdjacencyTable, NgramConfig, NgramTable
from metaspec.workers.tree_draft import best_chain, draft_tree, make_template, spine
from metaspec.workers.types import DecodeStats, RequestError, SamplingParams, Verdict

from ..conftest import make_engine

# -- trees --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes,depth", [(80, 6), (24, 8), (1, 1)])
def test_templates_are_breadth_first_trees(nodes, depth):
    template = make_template(nodes, depth)
    assert len(template) == nodes
    depths = []
    for i, (parent, rank) in enumerate(template):
        assert -1 <= parent < i and 0 <= rank < 8
        depths.append(1 if parent < 0 else depths[parent] + 1)
    assert depths == sorted(depths) and max(depths) <= depth
    assert len(set(template)) == nodes
    chain = spine(template)
    assert [r for _, r in chain] == [0] * len(chain) and [p for p, _ in chain] == list(range(-1, len(chain) - 1))


def test_draft_tree_drops_missing_candidates_and_best_chain_takes_rank_zero():
    table = {(): [5, 6, 7], (5,): [8], (6,): [9, 10], (5, 8): [11]}
    tokens, parents = draft_tree(make_template(12, 3), lambda path: table.get(path, []))
    assert set(zip(tokens, parents)) >= {(5, -1), (6, -1), (7, -1)}
    nodes = {(tokens[i], tokens[p] if p >= 0 else None) for i, p in enumerate(parents)}
    assert nodes <= {(5, None), (6, None), (7, None), (8, 5), (9, 6), (10, 6), (11, 8)}
    assert best_chain(tokens, parents, k=8) == [5, 8, 11]
    assert best_chain(tokens, parents, k=2) == [5, 8]
    assert draft_tree(make_template(12, 3), lambda path: []) == ([], [])


# -- ngram_store ----------------------------------------------------------------------------------------------------


def test_ngram_store_drafts_the_longest_match_and_learns_what_it_emits():
    table = NgramTable(NgramConfig(), vocab_size=50)
    table.learn([], [1, 2, 3, 4, 9, 2, 3, 7, 7])
    proposer = NgramStoreProposer(table, NgramStoreConfig())
    assert proposer.propose([1, 2, 3], k=3).tokens == [4, 9, 2]    # (1,2,3) -> 4 beats (2,3) -> 4|7
    assert proposer.propose([8, 2, 3], k=2).tokens == [4, 9]       # (2,3): 4 and 7 tie, first learned wins
    assert proposer.propose([40], k=4).tokens == [] and proposer.propose([1, 2], k=0).tokens == []
    proposer.propose([5, 6], k=2)
    proposer.observe([5, 6], Verdict(accepted=0, emitted=[11]))
    assert proposer.propose([5, 6], k=2).tokens == [11]            # learned within the request (privately)
    assert table.following([5, 6]) == [] and table.following([6]) == []   # the engine teaches the shared one
    proposer.observe([7, 3], Verdict(accepted=0, emitted=[9]))     # own: (3,) -> 9 and (7, 3) -> 9
    assert proposer.propose([1, 2, 3], k=1).tokens == [4]          # a longer shared context beats own (3,)
    assert proposer.propose([3, 3], k=1).tokens == [9]             # same length (3,): own 9 before shared 4
    tokens, parents = ngram_tree(table, [9, 2, 3], make_template(24, 8, top_accept=0.8))
    assert best_chain(tokens, parents, 1) == [7] and {4, 7} <= {tokens[i] for i, p in enumerate(parents) if p < 0}
    s = table.stats()
    assert s["lookups"] == 2 and s["hits"] == 1 and s["learned_tokens"] == 9


def test_ngram_store_learns_emitted_tokens_only(tiny_pair):
    engine = make_engine(tiny_pair)
    table = NgramTable(NgramConfig(max_continuations=64), engine.target.vocab_size)   # no count lost to caps
    engine.resources["ngram_table"] = table
    result = engine.generate(Request(prompt="a b c d e f g h", params=SamplingParams(max_tokens=16, ignore_eos=True),
                                     method="ngram_store"))
    assert table.stats()["learned_tokens"] == len(result.token_ids) == 16
    for n in (1, 2, 3, 4):                                         # one count per emitted token per order
        assert sum(sum(row[1::2]) for ctx, row in table.rows.items() if len(ctx) == n) == 16


@pytest.mark.parametrize("method", ["ar", "pld", "sps", "recycling", "early_exit", "ngram_store"])
def test_every_arm_teaches_the_shared_table_once_at_request_end(tiny_pair, method):
    engine = make_engine(tiny_pair)
    table = NgramTable(NgramConfig(max_continuations=64), engine.target.vocab_size)
    engine.resources["ngram_table"] = table
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    steps = list(engine.stream(Request(prompt="x = [1, 2, 3]\ny =", params=params, method=method)))
    result = steps[-1]
    assert table.stats()["learned_tokens"] == len(result.token_ids) == 24
    ids, out = engine.encode(Request(prompt="x = [1, 2, 3]\ny =")), result.token_ids
    full = ids + out
    for j in range(len(ids), len(full)):                          # every emitted token after its 1..4 predecessors
        for n in range(1, 5):
            assert full[j] in table.following(full[j - n: j]), (j, n)
    ngram = engine.generate(Request(prompt="x = [1, 2, 3]\ny =", params=params, method="ngram_store"))
    assert ngram.token_ids == out and ngram.stats.accepted >= 12   # the next request drafts from it


def test_learning_can_be_switched_off_for_benchmarks(tiny_pair):
    from dataclasses import replace

    engine = make_engine(tiny_pair)
    engine.cfg = replace(engine.cfg, learn_emitted=False)
    table = engine.resources["ngram_table"] = NgramTable(NgramConfig(), engine.target.vocab_size)
    engine.generate(Request(prompt="a b c", params=SamplingParams(max_tokens=8), method="ar"))
    assert table.stats()["learned_tokens"] == 0 and not table.rows


# -- recycling ----------------------------------------------------------------------------------------------------


def test_recycling_drafts_from_the_recycled_rows():
    table = AdjacencyTable(vocab_size=10, k=3)
    proposer = RecyclingProposer(table, RecyclingConfig())
    assert proposer.propose([1, 2], k=4).tokens == []
    logits = torch.full((3, 10), -5.0)
    logits[0, 4], logits[1, 5], logits[2, 2] = 1.0, 1.0, 1.0      # after 2 -> 4, after 4 -> 5, after 5 -> 2
    proposer.observe([1, 2], Verdict(accepted=0, emitted=[4]))     # nothing scored: nothing recycled
    assert proposer.propose([7, 2], k=4).tokens == []
    proposer.observe([1, 2], Verdict(accepted=1, emitted=[4, 5], scored=[2, 4, 5], logits=logits))
    assert [table.next_tokens(t)[0] for t in (2, 4, 5)] == [4, 5, 2]
    assert proposer.propose([7, 2], k=4).tokens == [4, 5, 2, 4]
    assert proposer.propose([7, 2], k=2).tokens == [4, 5]
    tokens, parents = recycling_tree(table, 2, make_template(80, 6))
    assert len(tokens) > 6 and best_chain(tokens, parents, 6) == [4, 5, 2, 4, 5, 2]


class _Recording(RecyclingProposer):
    def __init__(self, table):
        super().__init__(table, RecyclingConfig())
        self.steps = []

    def propose(self, seq, k):
        self.draft = super().propose(seq, k)
        return self.draft

    def observe(self, seq, verdict):
        self.steps.append([list(seq), verdict.scored, verdict.logits.argmax(-1).tolist(), verdict])
        # unconstrained: the draft as proposed, or a prefix of it where the step's draft budget cut it
        assert verdict.scored == [seq[-1], *self.draft.tokens[: len(verdict.scored) - 1]]
        super().observe(seq, verdict)


def test_decode_feeds_recycling_the_targets_logits(tiny_pair):
    """observe's Verdict carries [last, *draft] with the logits after each; each row ends as the top of its last
    scoring."""
    from transformers import AutoTokenizer

    target = load_model(ModelConfig(tiny_pair.target))
    table = AdjacencyTable(target.vocab_size)
    proposer = _Recording(table)
    prompt = AutoTokenizer.from_pretrained(tiny_pair.target).encode("x = [1, 2, 3]\ny =")
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    session, stats = target.session(128), DecodeStats()
    out = [t for step in decode(session, proposer, prompt, params, None, frozenset(), 128, 8, stats) for t in step]
    assert stats.fallback is None, stats.fallback                  # an assertion in observe would be a fallback
    assert len(proposer.steps) < len(out)                          # some drafts were accepted
    latest = {}
    for seq, scored, argmax, verdict in proposer.steps:
        assert scored[0] == seq[-1] and len(argmax) == len(scored)
        assert argmax[: verdict.accepted + 1] == verdict.emitted   # greedy: row i is the target after scored[i]
        latest.update(zip(scored, argmax))
    assert latest and all(table.next_tokens(t)[0] == top for t, top in latest.items())
    assert table.stats()["updates"] == sum(len(s[1]) for s in proposer.steps)


# -- early_exit ---------------------------------------------------------------------------------------------------


def test_plan_prefers_the_exit_with_more_tokens_per_cost():
    cfg = EarlyExitConfig()
    assert plan({2: 0, 4: 0}, {2: 0, 4: 0}, 8, 8, cfg)[1] > 0             # untried exits get tried
    layer, k = plan({2: 10, 4: 300}, {2: 40, 4: 30}, 8, 8, cfg)
    assert layer == 4 and k >= 3
    assert plan({2: 300, 4: 300}, {2: 30, 4: 30}, 8, 8, cfg)[0] == 2     # same acceptance: the cheaper exit
    assert plan({2: 2, 4: 5}, {2: 300, 4: 300}, 8, 8, cfg) == (0, 0)     # both poor: plain AR steps
    assert plan({2: 300}, {2: 3}, 8, 3, cfg) == (2, 3)                    # never beyond the step's k
    assert default_exits(8) == (2, 4, 6) and default_exits(2) == (1,)


def test_early_exit_drafts_the_first_layers_greedy_continuation(tiny_pair):
    target = load_model(ModelConfig(tiny_pair.target))
    session = target.session(64)
    seq = [5, 9, 13, 7, 21]
    session.forward(seq[:-1])
    cfg = EarlyExitConfig(exit_layers=(1,), explore=10.0)
    proposer = EarlyExitProposer(session, target.num_layers, SamplingParams(), None, cfg)
    draft = proposer.propose(seq, k=4)
    assert session.length == len(seq) - 1 and draft.probs is None and len(draft.tokens) == 4
    reference = target.session(64)                   # a separate cache running only the first layer
    want, ctx = [], list(seq)
    reference.forward(ctx[:-1], exit_layer=1)
    for _ in range(4):
        want.append(int(reference.forward([ctx[-1]], exit_layer=1)[-1].argmax()))
        ctx.append(want[-1])
    assert draft.tokens == want
    with pytest.raises(RuntimeError, match="target cache"):
        proposer.propose(seq + [1], k=2)              # out of step with the cache: an arm error, not silence


def test_early_exit_never_touches_the_shared_model(tiny_pair):
    engine = make_engine(tiny_pair)
    model = engine.target
    shape = (model.num_layers, model.vocab_size, model.max_context)

    def probe() -> torch.Tensor:                      # any change to weights or config changes these logits
        return model.session(16).forward([5, 9, 13, 7])

    before = probe()
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ar = engine.generate(Request(prompt="def f(x):", params=params, method="ar"))
    ee = engine.generate(Request(prompt="def f(x):", params=params, method="early_exit"))
    assert ee.token_ids == ar.token_ids and ee.stats.fallback is None and ee.stats.drafted > 0
    assert torch.equal(probe(), before) and (model.num_layers, model.vocab_size, model.max_context) == shape


def test_early_exit_tracks_acceptance_per_exit(tiny_pair):
    target = load_model(ModelConfig(tiny_pair.target))
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    session = target.session(128)
    ctx = ArmContext(target=target, params=params, target_session=session)
    proposer = build("early_exit", ctx)
    stats = DecodeStats()
    list(decode(session, proposer, [5, 9, 13, 7, 21], params, None, frozenset(), 128, 8, stats))
    rates = proposer.acceptance()
    assert set(rates) == set(default_exits(target.num_layers))
    tried = [r for r in rates.values() if not math.isnan(r)]
    assert tried and all(0 <= r <= 1 for r in tried) and stats.drafts > 0


def test_early_exit_refuses_a_model_that_cannot_exit_early(tiny_pair):
    engine = make_engine(tiny_pair, lean=False)
    with pytest.raises(RequestError, match="exit early"):
        engine.generate(Request(prompt="hello", params=SamplingParams(max_tokens=4), method="early_exit"))
    target = load_model(ModelConfig(tiny_pair.target))
    with pytest.raises(RequestError, match="target cache"):
        build("early_exit", ArmContext(target=target, params=SamplingParams()))
