"""`metaspec bench serve` on the tiny seeded pair: the engine backend at two concurrency levels and two methods.

Nothing here times anything: the records' fields and their consistency, the table and the PNG are checked.
"""

from __future__ import annotations

import json

import pytest

from metaspec.bench import report
from metaspec.bench.load import Trace, arrival_offsets, closed_loop
from metaspec.bench.serve import ServeConfig, format_result, run_serve, write_outputs
from metaspec.workers.scheduler import SchedulerConfig

from .conftest import data_dir, make_engine

LATENCY = ("mean", "p50", "p99")


@pytest.fixture(scope="module")
def serve_result(tiny_pair):
    if data_dir() is None:
        pytest.skip("the shared evaluation data is not on this machine")
    engine = make_engine(tiny_pair, batch=SchedulerConfig(max_batch=2, slot_tokens=160, draft_guard=False))
    try:
        cfg = ServeConfig(methods=("ar", "pld"), concurrency=(1, 2), num_prompts=4, max_tokens=8, repeats=2,
                          max_prompt_tokens=64, data_dir=str(data_dir()), progress=False)
        yield run_serve(cfg, engine=engine)
    finally:
        engine.close()


def test_one_record_per_method_and_concurrency_with_the_issue_fields(serve_result):
    records = serve_result["records"]
    assert sorted((r["method"], r["concurrency"]) for r in records) == [("ar", 1), ("ar", 2), ("pld", 1), ("pld", 2)]
    for r in records:
        assert set(report.FIELDS) <= set(r)
        assert r["request_throughput"] > 0 and r["output_tokens_per_s"] > 0
        for key in report.LATENCIES:
            assert set(r[key]) == set(LATENCY) and r[key]["p50"] <= r[key]["p99"]
        assert r["failed"] == 0 and r["repeats"] == 2
        assert r["output_tokens"] == 2 * 4 * 8                  # EOS ignored: every request emits max_tokens
        assert r["max_batch_seen"] <= r["concurrency"] and r["steps"] > 0


def test_runs_are_consistent_with_the_records(serve_result):
    runs = [r for r in serve_result["runs"] if r["engine"] == "metaspec"]
    assert len(runs) == 2 * 2 * 2                               # repeats x levels x methods
    for run in runs:
        assert run["completed"] == 4
        assert run["output_tokens_per_s"] == pytest.approx(run["output_tokens"] / run["wall_s"])
        assert run["request_throughput"] == pytest.approx(run["completed"] / run["wall_s"])
        assert sum(int(b) * n for b, n in run["batch_hist"].items()) <= run["tokens_scored"]
    ar1 = [r for r in runs if r["method"] == "ar" and r["concurrency"] == 1]
    assert all(r["max_batch_seen"] == 1 and r["acceptance_length"] == 1.0 for r in ar1)
    ratios = serve_result["ratios"]["ar_vs_ar_at_1"]
    assert ratios["1"] == pytest.approx(1.0) and ratios["2"] > 0
    assert serve_result["memory"]["kv_pool"]["slots"] == 2


def test_writes_json_table_and_png(serve_result, tmp_path):
    paths = write_outputs(serve_result, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert [r["method"] for r in data["records"]] == [r["method"] for r in serve_result["records"]]
    assert paths["png"].stat().st_size > 1000 and paths["png"].read_bytes()[:4] == b"\x89PNG"
    text = format_result(serve_result)
    assert "out tok/s" in text and "pld" in text and "ar @2 / ar @1" in text


def test_metrics_of_hand_made_traces():
    a = Trace(0.0, t_chunks=[0.1, 0.2, 0.4], n_chunks=[1, 2, 1])   # ttft 100 ms, 4 tokens over 300 ms
    b = Trace(0.0, error="boom")
    m = report.run_metrics([a, b], wall_s=2.0)
    assert (m["completed"], m["failed"], m["output_tokens"]) == (1, 1, 4)
    assert m["output_tokens_per_s"] == 2.0 and m["request_throughput"] == 0.5
    assert m["ttft_ms"]["p50"] == pytest.approx(100) and m["tpot_ms"]["p50"] == pytest.approx(100)
    assert sorted(report.samples([a])["itl_ms"]) == pytest.approx([100, 200])
    assert report.percentile([1, 2, 3, 4], 50) == 2.5 and report.percentile([], 50) is None


def test_closed_loop_keeps_at_most_n_in_flight_and_poisson_offsets_increase():
    import threading
    import time

    live, peak, lock = [0], [0], threading.Lock()

    def send(r):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.01)
        with lock:
            live[0] -= 1
        return Trace(0.0, t_chunks=[0.01], n_chunks=[1])

    traces, _ = closed_loop(send, list(range(12)), concurrency=3)
    assert len(traces) == 12 and peak[0] <= 3
    offsets = arrival_offsets(20, 10.0, seed=0)
    assert offsets[0] == 0.0 and all(b > a for a, b in zip(offsets, offsets[1:]))


def test_a_method_may_carry_an_arms_settings():
    from metaspec.bench.backends import arm_variant

    assert arm_variant("pearl:lanes=1") == ("pearl", {"lanes": 1}) and arm_variant("sps") == ("sps", {})
    assert arm_variant("sps:guard=1") == ("sps", {"guard": 1})
    assert arm_variant("pearl:lanes=2,guard=1") == ("pearl", {"lanes": 2, "guard": 1})
    for bad in ("pearl:lanes=0", "pearl:lanes=x", "pearl:gamma=2", "sps:lanes=2", "pearl:lanes", "sps:guard=2"):
        with pytest.raises(ValueError, match="not a setting"):
            arm_variant(bad)


def test_guard_variant_runs_its_load_with_one_draft_guard(tiny_pair):
    """"sps:guard=1" loads run with the draft guard (one, kept across them, as a replica keeps its own); a plain
    "sps" load runs as the engine was built (here without one)."""
    from metaspec.bench.backends import EngineBackend
    from metaspec.bench.load import ServeRequest

    with pytest.raises(ValueError, match="needs the draft budget"):
        engine = make_engine(tiny_pair)
        try:
            EngineBackend(engine).sender("sps:guard=1", 12, True)
        finally:
            engine.close()
    engine = make_engine(tiny_pair, batch=SchedulerConfig(draft_budget=True, guard_from_batch=1))
    try:
        backend = EngineBackend(engine)
        request = ServeRequest("p", "c", "text", tuple(range(5, 25)))
        plain = backend.sender("sps", 12, True)(request)
        assert engine.scheduler.guard is None
        guarded = backend.sender("sps:guard=1", 12, True)(request)
        guard = engine.scheduler.guard
        assert guard is not None and guard.rate(1) != (None, None)     # it measured the steps of that load
        backend.sender("sps:guard=1", 12, True)
        assert engine.scheduler.guard is guard
        backend.sender("sps", 12, True)
        assert engine.scheduler.guard is None
        assert plain.tokens == guarded.tokens == 12
    finally:
        engine.close()


def test_pearl_lanes_variant_sets_the_drafter_for_its_load(tiny_pair):
    from metaspec.bench.backends import EngineBackend
    from metaspec.bench.load import ServeRequest
    from metaspec.workers.pearl import PearlConfig

    engine = make_engine(tiny_pair)
    try:
        backend = EngineBackend(engine)
        request = ServeRequest("p", "c", "text", tuple(range(5, 25)))
        trace = backend.sender("pearl:lanes=2", 12, True)(request)
        assert engine.resources["pearl_config"] == PearlConfig(lanes=2)
        assert trace.tokens == 12 and trace.drafts > 0          # it ran pearl, with drafts
        backend.sender("pearl", 12, True)
        assert engine.resources["pearl_config"] == PearlConfig()  # a plain name gets the defaults back
    finally:
        engine.close()
