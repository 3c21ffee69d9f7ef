"""The router <-> worker records (workers/request.py): the stats record is typed, versioned and checked on arrival."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from metaspec.workers.request import STATS_SCHEMA, DecodeStats, RequestStats, Result


def test_the_stats_record_is_the_decode_counters_frozen():
    counters = DecodeStats(steps=5, drafts=4, drafted=12, accepted=6, emitted=11, fallback="arm broke",
                           draft_hist={3: 4, 0: 1}, batch_sum=15, budget_cut=2)
    stats = RequestStats.of(counters)
    assert (stats.steps, stats.accepted, stats.fallback, stats.budget_cut) == (5, 6, "arm broke", 2)
    assert stats.acceptance_length == counters.acceptance_length == 2.5
    assert stats.acceptance_rate == counters.acceptance_rate == 0.5 and stats.batch_mean == 3.0
    assert stats.draft_hist == ((0, 1), (3, 4)) and stats.schema == STATS_SCHEMA
    assert {f.name for f in dataclasses.fields(DecodeStats)} | {"schema"} == {
        f.name for f in dataclasses.fields(RequestStats)}, "a counter the record does not carry"
    assert stats.to_dict()["draft_hist"] == {0: 1, 3: 4} and stats.to_dict()["acceptance_length"] == 2.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.steps = 0


def test_the_record_crosses_a_pickle_and_is_checked_there():
    result = Result("x", [1, 2], "length", "pld", 3, 0.1, 0.2, RequestStats.of(DecodeStats(steps=2, emitted=2)))
    assert pickle.loads(pickle.dumps(result)) == result          # what Ray does between worker and router
    other = RequestStats(steps=2)
    object.__setattr__(other, "schema", STATS_SCHEMA + 1)        # a worker of another version
    with pytest.raises(ValueError, match="schema"):
        pickle.loads(pickle.dumps(other))
    with pytest.raises(ValueError, match="steps"):
        RequestStats(steps=-1)
    with pytest.raises(ValueError, match="schema"):
        RequestStats(schema=0)
