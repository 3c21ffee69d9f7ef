"""`metaspec collect` on the tiny seeded pair: every arm on every prompt at every concurrency level, temperature
and constraint setting, records the selector can train on."""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import pytest

from metaspec.cli import main
from metaspec.selector.features import LOAD_FEATURES, POOL_FEATURES, REQUEST_FEATURES
from metaspec.selector.train import build_table, by_request, load_outcomes
from metaspec.workers.registry import arms

from ..conftest import data_dir

ARMS = "ar,sps,pld,ngram_store"


@pytest.fixture(scope="module")
def collected(tiny_pair, tmp_path_factory):
    if data_dir() is None:
        pytest.skip("evaluation prompts not found (../shared/data next to the clone)")
    out = tmp_path_factory.mktemp("collect") / "collect.jsonl"
    rc = main(["collect", "--target", tiny_pair.target, "--drafter", tiny_pair.drafter, "--dtype", "float32",
               "--threads", "1", "--categories", "qa,humaneval,json_schema", "--n-per-category", "2",
               "--max-tokens", "4,6", "--temperatures", "0,0.8", "--concurrency", "1,3", "--arms", ARMS,
               "--data-dir", str(data_dir()), "--out", str(out)])
    assert rc == 0
    outcomes, bad = load_outcomes([out])
    assert bad == 0
    return outcomes


def test_every_arm_serves_every_request_at_every_level(collected):
    assert {o.method for o in collected} == set(ARMS.split(","))
    per_request = Counter((o.prompt_id, o.temperature, o.concurrency) for o in collected)
    prompts = {o.prompt_id for o in collected}
    assert len(prompts) == 6 and len(per_request) == 6 * 2 * 2 and set(per_request.values()) == {4}
    assert {o.category for o in collected} == {"qa", "humaneval", "json_schema"}
    assert {o.concurrency for o in collected} == {1, 3}
    table = build_table(collected)
    assert len(table) == len(collected) and len(by_request(table)) == 24
    assert set(table.concurrency.tolist()) == {1, 3}


def test_records_carry_the_load_and_the_request(collected):
    for o in collected:
        assert o.source == "collect" and o.status == "OK" and o.tokens_per_s > 0 and o.wall_s > 0
        assert o.max_tokens in (4, 6) and 1 <= o.completion_tokens <= o.max_tokens
        assert set(REQUEST_FEATURES) | set(POOL_FEATURES) <= set(o.features)
        assert o.features["temperature"] == o.temperature
        assert o.features["load_running"] == o.concurrency - 1 and o.features["load_waiting"] == 0
        drafts = arms()[o.method].drafts                   # its batch-mates ran its own arm
        assert o.features["load_model_drafting"] == (o.concurrency - 1) * (drafts == "model")
        assert o.features["load_lookup_drafting"] == (o.concurrency - 1) * (drafts == "lookup")
        assert 0 <= o.features["load_kv_used"] < 1 and o.batch_mean >= 1
        assert o.has_constraint == (o.category == "json_schema") == bool(o.features["has_constraint"])
        assert o.acceptance_length >= 1.0
    assert set(LOAD_FEATURES) <= set(POOL_FEATURES)
    assert all(o.completion_tokens == o.max_tokens for o in collected if not o.has_constraint)
    assert all(o.acceptance_length == 1.0 for o in collected if o.method == "ar")
    # the batch really was shared: requests collected at level 3 saw more than one request per step on average
    assert max(o.batch_mean for o in collected if o.concurrency == 3) > 1.5
    assert all(o.batch_mean == 1 for o in collected if o.concurrency == 1)


def test_max_tokens_vary_and_seeds_are_kept_across_arms(collected):
    assert {o.max_tokens for o in collected} == {4, 6}
    lengths = defaultdict(set)
    for o in collected:
        lengths[(o.prompt_id, o.temperature, o.concurrency)].add(o.max_tokens)
    assert all(len(v) == 1 for v in lengths.values())   # every arm of a request was asked for the same length


def test_run_batch_times_each_request_by_its_own_events(tiny_pair):
    """A request that ends early is not charged for the wait on the one listed before it."""
    from metaspec.collect import run_batch
    from metaspec.workers.engine import Engine, EngineConfig, Request
    from metaspec.workers.model import ModelConfig
    from metaspec.workers.types import SamplingParams

    engine = Engine(EngineConfig(ModelConfig(tiny_pair.target, "float32", threads=1), default_method="ar"))
    try:
        ids = tuple(range(5, 25))
        requests = [Request(prompt_ids=ids, params=SamplingParams(max_tokens=n, ignore_eos=True)) for n in (40, 2)]
        t0 = time.perf_counter()
        long, short = run_batch(engine, requests)
        total = time.perf_counter() - t0
        assert len(long.token_ids) == 40 and len(short.token_ids) == 2
        assert short.wall_s < long.wall_s <= total and short.ttft_s <= short.wall_s
    finally:
        engine.close()
