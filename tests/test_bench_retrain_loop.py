"""The retraining loop's pure parts: request ids, which outcomes a round trains on, the oracle estimate, the
round bookkeeping and the report. (The loop itself starts Ray Serve on the shipped models: it is run for real,
docs/benchmarks.md, not here.)"""

from __future__ import annotations

import pytest
import yaml

from metaspec.bench.retrain_loop import LoopConfig, _pools, compare, loop_yaml, oracle_estimate, parse_request_id, \
    round_summary, training_records
from metaspec.bench.retrain_loop_report import format_loop, plot_loop


def outcome(rid: str, wall_s: float, reason: str = "fixed", tokens: int = 10, status: str = "OK") -> dict:
    return {"request_id": rid, "wall_s": wall_s, "reason": reason, "completion_tokens": tokens, "status": status}


def test_request_ids_parse_and_probes_do_not():
    assert parse_request_id("r0/c4/pld/17") == {"round": "r0", "concurrency": 4, "policy": "pld", "index": 17}
    assert parse_request_id("probe/v1/0") is None and parse_request_id("abc") is None
    assert parse_request_id("r1/cx/auto/3") is None


def test_a_round_trains_on_routed_trace_requests_unless_told_all():
    records = [outcome("r0/c1/auto/0", 1.0, "fixed"), outcome("r0/c1/auto/1", 1.0, "explore"),
               outcome("r0/c1/pld/0", 1.0, "override"), outcome("probe/v/0", 0.1, "model"),
               outcome("r0/c1/auto/2", 1.0, "fixed", status="CANCELLED")]
    assert [r["request_id"] for r in training_records(records, "routed")] == ["r0/c1/auto/0", "r0/c1/auto/1"]
    assert len(training_records(records, "all")) == 3


def test_the_oracle_runs_each_request_with_its_fastest_arm():
    # level 1: arm a is best overall (2 s total) but b wins request 1: oracle latency 1.0 + 0.5 = 1.5 s
    records = [outcome("r0/c1/a/0", 1.0), outcome("r0/c1/a/1", 1.0), outcome("r0/c1/b/0", 2.0),
               outcome("r0/c1/b/1", 0.5), outcome("r0/c1/auto/0", 0.1), outcome("r1/c1/a/0", 0.1)]
    est = oracle_estimate(records, {1: {"a": 100.0, "b": 60.0}})
    assert est["1"]["best_fixed"] == "a" and est["1"]["latency_ratio"] == pytest.approx(2.0 / 1.5)
    assert est["1"]["oracle_tokens_per_s"] == pytest.approx(100.0 * 2.0 / 1.5)
    assert est["1"]["oracle_arms"] == {"a": 1, "b": 1} and est["1"]["requests"] == 2
    assert est["all"]["oracle_tokens_per_s"] == pytest.approx(est["1"]["oracle_tokens_per_s"])
    # an arm that is fastest everywhere: the oracle is that arm
    same = oracle_estimate([outcome("r0/c2/a/0", 1.0), outcome("r0/c2/b/0", 3.0)], {2: {"a": 50.0, "b": 20.0}})
    assert same["2"]["oracle_tokens_per_s"] == pytest.approx(50.0)


def _trace(auto: dict, fixed: dict, methods: dict) -> dict:
    recs = [{"policy": "auto", "concurrency": lv, "output_tokens_per_s": t, "tpot_ms": {"p50": 1.0, "p99": 2.0}}
            for lv, t in auto.items()]
    recs += [{"policy": arm, "concurrency": lv, "output_tokens_per_s": t, "tpot_ms": {"p50": 1.0, "p99": 2.0}}
             for arm, by in fixed.items() for lv, t in by.items()]
    runs = [{"policy": "auto", "concurrency": 1, "methods": methods, "explored": 2,
             "selector_versions": {"fixed": sum(methods.values())}}]
    return {"records": recs, "runs": runs}


def test_rounds_compare_auto_with_the_same_rounds_best_fixed_arm_and_the_oracle(tmp_path):
    r0 = round_summary(0, _trace({1: 80.0, "all": 80.0}, {"pld": {1: 100.0, "all": 100.0}}, {"sps": 8, "pld": 2}),
                       None, "fixed", None)
    r1 = round_summary(1, _trace({1: 120.0, "all": 120.0}, {"pld": {1: 110.0, "all": 110.0}}, {"pld": 10}),
                       {"written": True, "version": "v1", "kind": "rf", "training_records": 10}, "v1", 1.5)
    assert r0["routed_methods"] == {"sps": 8, "pld": 2} and r0["explored"] == 2
    rows = compare([r0, r1], {"1": "pld", "all": "pld"}, {"1": {"oracle_tokens_per_s": 150.0},
                                                          "all": {"oracle_tokens_per_s": 150.0}})
    by = {(r["round"], r["concurrency"]): r for r in rows}
    assert by[(0, "1")]["auto_vs_best_fixed"] == pytest.approx(0.8)
    assert by[(1, "1")]["auto_vs_best_fixed"] == pytest.approx(120 / 110)
    assert by[(1, "all")]["auto_vs_oracle"] == pytest.approx(0.8)
    result = {"config": {"concurrency": [1], "explore": 0.2, "train_on": "routed"},
              "machine": {"cpu_model": "cpu", "load_avg_1_5_15": [1.0, 1.0, 1.0]}, "trace": {"n": 10},
              "round0_records": [{"policy": "auto", "concurrency": 1, "output_tokens_per_s": 80.0,
                                  "tpot_ms": {"p50": 1.0, "p99": 2.0}}],
              "rounds": [r0, r1], "comparison": rows, "oracle": {"1": {"oracle_arms": {"pld": 3}}}}
    text = format_loop(result)
    assert "v1" in text and "written=True" in text
    plot_loop(result, tmp_path / "loop.png")
    assert (tmp_path / "loop.png").stat().st_size > 1000


def test_the_service_starts_with_no_selector_file_and_exploration_on(tmp_path):
    path = loop_yaml(None, tmp_path, LoopConfig(explore=0.3, check_s=0.5))
    router = yaml.safe_load(path.read_text())["applications"][0]["args"]["router"]
    assert router["selector"] == str(tmp_path / "selector.skops") and not (tmp_path / "selector.skops").exists()
    assert router["explore"] == 0.3 and router["selector_check_s"] == 0.5
    assert [p["name"] for p in _pools(path)] == ["cpu"]           # the pools the loop's service runs


def test_a_rounds_repeats_give_auto_vs_fixed_repeat_by_repeat(tmp_path):
    def passes(*tps):
        return [{"repeat": k, "output_tokens": 10 * t, "wall_s": 10.0, "output_tokens_per_s": t,
                 "canary_ms": 2.0 + k, "busy_frac": 0.9, "steal_frac": 0.01 * k} for k, t in enumerate(tps)]
    trace = _trace({1: 105.0}, {"pld": {1: 100.0}, "ar": {1: 70.0}}, {"pld": 4})
    trace["records"][0]["passes"] = passes(90.0, 120.0)          # auto
    trace["records"][1]["passes"] = passes(100.0, 100.0)         # pld
    rd = round_summary(1, trace, None, "v1", None)
    row, = compare([rd], {"1": "pld"}, {})
    assert row["auto_vs_best_fixed"] == pytest.approx(1.05)
    assert row["auto_vs_best_fixed_by_repeat"] == pytest.approx([0.9, 1.2])
    assert row["auto_vs_ar"] == pytest.approx(1.5)                  # ar measured in the same round
    result = {"config": {"concurrency": [1], "explore": 0.2, "train_on": "all"},
              "machine": {"cpu_model": "cpu", "load_avg_1_5_15": [1.0, 1.0, 1.0]}, "trace": {"n": 10},
              "round0_records": trace["records"], "rounds": [rd], "comparison": [row], "oracle": {}}
    text = format_loop(result)
    assert "(0.90-1.20 over 2 repeats)" in text
    assert "round 1 machine: canary 2.00-3.00 ms over 4 passes, steal <= 1.0%, busy 90-90%" in text
    plot_loop(result, tmp_path / "loop.png")                      # each repeat's pass drawn beside the pooled
    assert (tmp_path / "loop.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="repeats"):
        LoopConfig(repeats=0)
