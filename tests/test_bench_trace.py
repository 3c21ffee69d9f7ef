"""`metaspec bench serve --trace mixed` on the tiny seeded pair (engine backend): the trace is the stated mix and
reproducible, every (policy, level) and the whole trace are reported, the table and the PNG are written.
Nothing here times anything."""

from __future__ import annotations

import json
import random

import pytest

from metaspec.bench.trace import TraceConfig, TraceMix, build_trace, clear_tables, quota, run_trace
from metaspec.bench.trace_report import AUTO, format_trace, write_trace
from metaspec.workers.scheduler import SchedulerConfig

from .conftest import data_dir, make_engine

MIX = TraceMix(n_requests=12, max_tokens=((4, 0.5), (8, 0.5)), max_prompt_tokens=48, seed=3)


def test_quota_deals_the_stated_shares_exactly():
    values = quota(((0.0, 0.6), (0.7, 0.25), (1.0, 0.15)), 20, random.Random(0))
    assert sorted(values) == [0.0] * 12 + [0.7] * 5 + [1.0] * 3
    assert len(quota((("a", 1 / 3), ("b", 1 / 3), ("c", 1 / 3)), 4, random.Random(0))) == 4


def test_the_trace_is_the_stated_mix_and_reproducible(tiny_pair):
    from transformers import AutoTokenizer

    if data_dir() is None:
        pytest.skip("the shared evaluation data is not on this machine")
    tok = AutoTokenizer.from_pretrained(tiny_pair.target)
    mix = TraceMix(n_requests=48)
    a, b = build_trace(mix, tok, data_dir()), build_trace(mix, tok, data_dir())
    assert a == b
    cats = [r.category for r in a]
    assert cats.count("humaneval") == cats.count("gsm8k") == cats.count("json_schema") == 8
    assert all(cats.count(g) == 4 for g in ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"))
    assert [r.temperature for r in a].count(0.0) == 29 and sorted({r.max_tokens for r in a}) == [32, 64, 128]
    assert all((r.schema is not None) == (r.category == "json_schema") for r in a)
    assert all(json.loads(r.schema) for r in a if r.schema)
    assert len({r.prompt_id for r in a}) == 48


@pytest.fixture(scope="module")
def trace_result(tiny_pair):
    if data_dir() is None:
        pytest.skip("the shared evaluation data is not on this machine")
    engine = make_engine(tiny_pair, batch=SchedulerConfig(max_batch=2, slot_tokens=256))
    try:
        cfg = TraceConfig(policies=(AUTO, "pld", "ar"), concurrency=(1, 2), mix=MIX, data_dir=str(data_dir()),
                          progress=False)
        resets = []

        def reset():                                  # the engine backend's own reset, counted
            resets.append(clear_tables(engine.resources))
        result = run_trace(cfg, engine=engine, reset=reset)
        yield result | {"resets": resets}
    finally:
        engine.close()


def test_one_record_per_policy_and_level_and_the_whole_trace(trace_result, tmp_path):
    records = trace_result["records"]
    keys = sorted((r["policy"], str(r["concurrency"])) for r in records)
    assert keys == sorted((p, lv) for p in (AUTO, "pld", "ar") for lv in ("1", "2", "all"))
    for r in records:
        assert r["output_tokens_per_s"] > 0 and r["failed"] == 0
        assert r["tpot_ms"]["p50"] <= r["tpot_ms"]["p99"]
    for policy in (AUTO, "pld", "ar"):
        levels = [r for r in records if r["policy"] == policy and r["concurrency"] != "all"]
        whole = next(r for r in records if r["policy"] == policy and r["concurrency"] == "all")
        assert whole["output_tokens"] == sum(r["output_tokens"] for r in levels)
        assert whole["output_tokens_per_s"] == pytest.approx(whole["output_tokens"] / whole["wall_s"])
    greedy_free = [r for r in trace_result["runs"] if r["policy"] == "ar"]
    assert all(r["completed"] == MIX.n_requests for r in greedy_free)
    assert set(trace_result["ratios"]) == {"1", "2", "all"}
    assert trace_result["trace"]["constrained"] == 2
    paths = write_trace(trace_result, tmp_path)
    assert json.loads(paths["json"].read_text())["records"] == json.loads(json.dumps(records))
    assert paths["png"].stat().st_size > 1000
    text = format_trace(trace_result)
    assert "auto / best fixed" in text and "all" in text and "tables emptied before every pass: yes" in text


def test_every_pass_starts_from_empty_tables(trace_result):
    # once before each of the 3 policies x 2 levels, on both tables (what a reset drops: tests/workers)
    resets = trace_result["resets"]
    assert len(resets) == 6 and trace_result["trace"]["tables_reset"] is True
    assert all(set(r) == {"ngram_table", "adjacency_table"} for r in resets)


def test_repeats_interleave_the_policies_and_keep_each_pass(tmp_path):
    # run_policies' own bookkeeping, with a sender that takes a set time per token (no model: the order of the
    # passes and what is pooled from them is what is under test)
    from metaspec.bench.load import Trace
    from metaspec.bench.trace import TraceRequest, pass_order, repeat_tag, run_policies
    from metaspec.bench.trace_report import pass_ratios, ratios, summarize

    assert [pass_order(["a", "b", "c"], 1, k) for k in range(3)] == [["b", "c", "a"], ["a", "c", "b"],
                                                                     ["b", "c", "a"]]
    assert [repeat_tag("r1", k) for k in range(3)] == ["r1", "r1.1", "r1.2"]
    order, resets = [], []
    tokens = {("auto", 0): 4, ("auto", 1): 2, ("ar", 0): 2, ("ar", 1): 2}     # auto's 2nd pass emits less

    def make_send(policy, level, k):
        order.append((level, policy, k))

        def send(r):
            t = Trace(0.0)
            for j in range(tokens[(policy, k)]):
                t.chunk(1, t=0.01 * (j + 1))
            return t
        return send
    requests = [TraceRequest(i, f"p{i}", "qa", (1, 2), 0.0, 4) for i in range(3)]
    runs = run_policies(make_send, ["auto", "ar"], requests, (1, 2), reset=lambda: resets.append(1), repeats=2)
    assert order == [(1, "auto", 0), (1, "ar", 0), (1, "ar", 1), (1, "auto", 1),
                     (2, "ar", 0), (2, "auto", 0), (2, "auto", 1), (2, "ar", 1)]
    assert len(resets) == 8 and len(runs) == 4
    for r in runs:
        assert [p["repeat"] for p in r["passes"]] == [0, 1] and r["completed"] == 6
        assert r["output_tokens"] == sum(p["output_tokens"] for p in r["passes"])
        assert r["wall_s"] == pytest.approx(sum(p["wall_s"] for p in r["passes"]))
    auto1 = next(r for r in runs if r["policy"] == "auto" and r["concurrency"] == 1)
    assert [p["output_tokens"] for p in auto1["passes"]] == [12, 6]
    records = summarize(runs)
    whole = {r["policy"]: r for r in records if r["concurrency"] == "all"}
    assert [p["output_tokens"] for p in whole["auto"]["passes"]] == [24, 12]
    by_repeat = pass_ratios(whole["auto"], whole["ar"])
    assert len(by_repeat) == 2
    assert by_repeat == pytest.approx([p["output_tokens_per_s"] / q["output_tokens_per_s"] for p, q in
                                       zip(whole["auto"]["passes"], whole["ar"]["passes"])])
    rs = ratios(records)
    assert rs["all"]["auto_vs_ar_by_repeat"] == by_repeat and rs["1"]["best_fixed"] == "ar"
    assert pass_ratios(auto1, None) == []
