"""The soak's checks (metaspec/bench/soak_report.py) on made-up calls and samples: each failure it must name."""

from __future__ import annotations

import math

from metaspec.bench.soak import Call, SoakConfig, Timeline
from metaspec.bench.soak_report import report, table

CFG = SoakConfig(duration_s=60.0, deadline_s=10.0, slack_s=5.0, kill_grace_s=5.0)


def _timeline(worker_end_mib: float = 510.0) -> Timeline:
    tl = Timeline()
    tl.events = {"redis_restart": 20.0, "replica_kill": 30.0, "load_end": 60.0}
    tl.rss = [(t, 1, "worker", 500.0 if t <= 20 else worker_end_mib) for t in (5.0, 20.0, 40.0, 60.0)]
    tl.rss += [(t, 2, "worker", 300.0 + t) for t in (35.0, 60.0)]          # the replacement: not held to it
    tl.redis_keys = [(5.0, 4), (21.0, -1), (25.0, 4)]
    tl.tables = [(10.0, {"connected": True, "syncs": 3, "errors": 0, "ngram_contexts": 700}),
                 (40.0, {"connected": True, "syncs": 9, "errors": 1, "ngram_contexts": 2100}),
                 (59.0, {"connected": False, "syncs": 0, "errors": 0, "ngram_contexts": 1900})]   # a fresh replica
    return tl


def _calls() -> list[Call]:
    out = [Call(f"m{i}", "mixed", t, t + 1.0, "OK", True) for i, t in enumerate((1.0, 25.0, 45.0))]
    out.append(Call("k", "mixed", 28.0, 30.5, "UNAVAILABLE"))                    # in flight at the kill
    out.append(Call("h", "ids_negative", 2.0, 2.1, "INVALID_ARGUMENT"))
    return out


def _failed(rep: dict) -> set[str]:
    return {c["name"] for c in rep["checks"] if not c["ok"]}


def test_a_clean_soak_passes_and_prints():
    rep = report(CFG, _calls(), _timeline(), 0, {"m0", "m1", "m2"})
    assert rep["passed"], table(rep)
    assert rep["tables"]["connected_at_end"] and rep["tables"]["refilled_after_s"] == 5.0
    assert "[PASS] memory_flat" in table(rep)
    assert rep["ngram_contexts"] == {"warm": 700, "end": 1900, "max": 2100}    # what the router's mirror holds


def test_the_plot_draws_the_table_size_beside_rss(tmp_path):
    from metaspec.bench.soak_report import write

    write(report(CFG, _calls(), _timeline(), 0, {"m0", "m1", "m2"}), tmp_path)
    assert (tmp_path / "soak.png").stat().st_size > 10_000 and (tmp_path / "soak.json").is_file()


def test_each_fault_fails_its_check():
    calls = _calls() + [Call("i", "schema_nested", 3.0, 3.2, "INTERNAL"),
                        Call("u", "mixed", 50.0, 50.5, "UNAVAILABLE"),              # long after the kill
                        Call("d", "mixed", 40.0, 50.0, "DEADLINE_EXCEEDED"),
                        Call("open", "mixed", 41.0, math.nan),
                        Call("ok", "regex_bad", 4.0, 4.1, "OK", True)]                # a hostile one served
    rep = report(CFG, calls, _timeline(worker_end_mib=700.0), 0, {"m0", "m2"})      # m1's outcome is missing
    assert _failed(rep) == {"no_internal", "no_hung", "expected_codes", "acknowledged_on_disk", "memory_flat"}
    assert not rep["passed"]
