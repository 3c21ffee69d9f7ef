"""The batchmates bench on the tiny pair: every configuration runs, the staying requests' greedy tokens do not
depend on their batchmates' arms (greedy or sampled), and the summary is relative to the all-table batch."""

from __future__ import annotations

import json

import pytest

from metaspec.bench.batchmates import ALONE, BatchmatesConfig, plot, run, table
from tests.conftest import make_engine


def test_batchmates_run_interleaved_and_leave_the_staying_outputs_alone(tiny_pair, tmp_path):
    from metaspec.workers.scheduler import SchedulerConfig

    cfg = BatchmatesConfig(table_arm="pld", mate_arms=("sps", "early_exit"), batch=4, mates=1, max_tokens=12,
                           repeats=2)
    engine = make_engine(tiny_pair, batch=SchedulerConfig(max_batch=4, draft_budget=True))
    try:
        texts = [f"def f{i}(x):\n    return x + {i}\n\ndef f{i}(x):\n    return" for i in range(4)]
        rep = run(cfg, engine, texts)
        with pytest.raises(ValueError, match="4 prompts needed"):
            run(cfg, engine, texts[:3])
    finally:
        engine.close()
    assert rep["stay_outputs_identical"] is True
    assert list(rep["summary"]) == [ALONE, "+1 sps", "+1 sps sampled", "+1 early_exit", "+1 early_exit sampled"]
    assert len(rep["runs"]) == 2 * 5 and [r["config"] for r in rep["runs"][:5]] == list(rep["summary"])
    assert rep["summary"][ALONE]["stay_vs_alone"] == 1.0
    assert all(s["stay_tokens_per_s"] > 0 and s["batch_tokens_per_s"] > 0 for s in rep["summary"].values())
    assert "identical in every configuration: True" in table(rep)
    plot(json.loads(json.dumps(rep)), tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 5_000


def test_a_config_without_mates_is_refused():
    with pytest.raises(ValueError):
        BatchmatesConfig(batch=4, mates=4)
