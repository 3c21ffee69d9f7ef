"""`metaspec collect` on the tiny seeded pair: every arm on every prompt, records the selector can train on."""

from __future__ import annotations

from collections import Counter

import pytest

from metaspec.cli import main
from metaspec.selector.features import POOL_FEATURES, REQUEST_FEATURES
from metaspec.selector.train import build_table, by_request, load_outcomes

from ..conftest import data_dir


def test_collect_writes_outcomes_for_every_arm(tiny_pair, tmp_path):
    if data_dir() is None:
        pytest.skip("evaluation prompts not found (../shared/data next to the clone)")
    out = tmp_path / "collect.jsonl"
    rc = main(["collect", "--target", tiny_pair.target, "--drafter", tiny_pair.drafter, "--dtype", "float32",
               "--threads", "1", "--categories", "qa,humaneval,json_schema", "--n-per-category", "2",
               "--max-tokens", "6", "--temperatures", "0,0.8", "--data-dir", str(data_dir()), "--out", str(out)])
    assert rc == 0
    outcomes, bad = load_outcomes([out])
    assert bad == 0
    methods = {o.method for o in outcomes}
    assert {"ar", "sps", "pld"} <= methods
    per_request = Counter((o.prompt_id, o.temperature) for o in outcomes)
    assert len(per_request) == 3 * 2 * 2 and set(per_request.values()) == {len(methods)}
    assert {o.category for o in outcomes} == {"qa", "humaneval", "json_schema"}
    for o in outcomes:
        assert o.source == "collect" and o.status == "OK" and o.tokens_per_s > 0
        assert o.completion_tokens == 6 and o.max_tokens == 6
        assert set(REQUEST_FEATURES) | set(POOL_FEATURES) <= set(o.features)
        assert o.features["temperature"] == o.temperature
        assert o.acceptance_length >= 1.0
    assert all(o.acceptance_length == 1.0 for o in outcomes if o.method == "ar")
    table = build_table(outcomes)
    assert len(table) == len(outcomes) and len(by_request(table)) == 12
