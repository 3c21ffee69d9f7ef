"""A short `metaspec soak` (metaspec/bench/soak.py) on the tiny pair: mixed and hostile load through real gRPC into a
real Serve app, Redis killed and restarted, a worker replica killed, and the soak's own checks (no INTERNAL, no hung
request, hostile requests refused, acknowledged outcomes on disk, memory flat, the tables back after Redis).

Deadlines are generous and nothing here asserts a speed: on a loaded 2-core machine requests are slow, not wrong.
"""

from __future__ import annotations

import json

from metaspec.bench.soak import SoakConfig, redis_command, run
from metaspec.bench.soak_report import table
from metaspec.deploy.app import LOW_LATENCY_ENV, ServeOptions
from metaspec.deploy.config import load_app_config

from .conftest import QUICK_SHUTDOWN, stop_serve


def test_a_short_soak_passes_every_check(ray_local, tiny_pair, tmp_path):
    # 54 s is no steady state: a replica's RSS still climbs after 18 s (and the survivor of the kill takes twice
    # the load), so the memory bound here only catches a runaway; `metaspec soak` holds 10 min to 10% / 64 MiB.
    cfg = SoakConfig(duration_s=54.0, concurrency=6, hostile_per_s=1.0, max_tokens=24, sample_s=2.0,
                     deadline_s=180.0, kill_grace_s=60.0, rss_growth_frac=0.5, rss_growth_mib=256.0,
                     app="metaspec-soak-test")
    base = load_app_config({
        "pools": [{"name": "a", "target": tiny_pair.target, "drafter": tiny_pair.drafter, "num_replicas": 2}],
        "router": {"selector": "default", "max_prompt_chars": 20_000, "outcome_dir": str(tmp_path / "unused")}})
    try:
        rep = run(cfg, base, ServeOptions(controller_env=QUICK_SHUTDOWN | LOW_LATENCY_ENV), tmp_path)
    finally:
        stop_serve()
    assert rep["passed"], table(rep)
    assert {"redis_restart", "replica_kill", "load_end"} <= set(rep["events_s"]) and "DecodeWorker-a#" in rep["killed"]
    assert rep["mixed_codes"]["OK"] > 0 and rep["acknowledged"] > 0
    assert set(rep["hostile_by_case"]) >= {"ids_negative", "temperature_nan", "schema_nested", "message_oversized"}
    saved = json.loads((tmp_path / "soak.json").read_text())
    assert saved["passed"] and (tmp_path / "soak.png").stat().st_size > 0
    assert redis_command(rep["redis_port"], "PING") is None                 # its redis-server is gone
