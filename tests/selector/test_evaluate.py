"""eval-selector on a table with a load-dependent planted winner: slices by concurrency and temperature, the
best fixed arm per slice, regret against the oracle; load features reach the choice; old records stay readable."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from metaspec.cli import main
from metaspec.selector.evaluate import cross_validated, slice_requests
from metaspec.selector.features import (FEATURE_VERSION, IDLE_LOAD, LOAD_FEATURES, POOL_FEATURES,
                                        inflight_load_features, load_features, pool_features, request_features,
                                        upgrade, worker_load_features)
from metaspec.selector.report import format_table
from metaspec.selector.selector import Selector, SelectorConfig
from metaspec.selector.train import BASE_FEATURES, build_table, by_request, fit_model
from metaspec.selector.types import Outcome, PoolInfo

from .synth import HARDWARE, synthetic_load_outcomes, synthetic_outcomes


@pytest.fixture(scope="module")
def outcomes():
    return synthetic_load_outcomes(24, seed=0)


@pytest.fixture(scope="module")
def result(outcomes):
    return cross_validated(build_table(outcomes), kinds=("rf", "gb", "ridge"), n_splits=4)


def test_load_features_are_pure_and_bounded():
    assert load_features(0, 0, 16, 16) == IDLE_LOAD and tuple(IDLE_LOAD) == LOAD_FEATURES
    busy = load_features(running=20, waiting=3, slots_free=-2, slots=16)
    assert busy["load_running"] == 20 and busy["load_waiting"] == 3 and busy["load_kv_used"] == 1.0
    assert load_features(-1, -1, 5, 0)["load_running"] == 0.0          # nonsense counters do not go negative
    stats = SimpleNamespace(running=3, waiting=1, steps=9)             # WorkerCounters today: no slot counts
    assert worker_load_features(stats, slots=16) == load_features(3, 1, 13, 16)
    full = SimpleNamespace(running=3, waiting=0, slots_free=10, slots=16)
    assert worker_load_features(full) == load_features(3, 0, 10, 16)
    assert inflight_load_features(40, 2, 16) == load_features(16, 4, 0, 16)
    assert inflight_load_features(3, 1, 16) == load_features(3, 0, 13, 16)
    # the drafting mix: a kind's running share is its share of what is in flight, and never above the running
    mixed = inflight_load_features(40, 2, 16, {"model": 10, "lookup": 30, "none": 0})
    assert (mixed["load_model_drafting"], mixed["load_lookup_drafting"]) == (4.0, 12.0)
    assert load_features(2, 0, 14, 16, {"model": 5})["load_model_drafting"] == 2.0
    assert inflight_load_features(0, 1, 16, {"model": 0}) == IDLE_LOAD
    assert set(LOAD_FEATURES) <= set(POOL_FEATURES)
    assert pool_features(HARDWARE, 0.2, {"load_running": 5.0})["load_running"] == 5.0
    assert pool_features(HARDWARE, 0.2)["load_running"] == 0.0


def test_version_1_records_are_read_as_idle_and_unknown_versions_skipped():
    old = synthetic_outcomes(4)
    v1 = [Outcome(**{**o.__dict__, "features": {k: v for k, v in o.features.items() if k not in LOAD_FEATURES}
                     | {"feature_version": 1.0}}) for o in old]
    line = v1[0].to_json()
    assert "concurrency" not in json.loads(line)["features"]
    assert upgrade(v1[0].features)["load_running"] == 0.0
    assert upgrade({"feature_version": 99.0}) is None
    table = build_table([Outcome.from_json(o.to_json()) for o in v1])
    assert len(table) == len(v1) and table.skipped == 0 and set(table.concurrency.tolist()) == {1}
    alien = Outcome(**{**old[0].__dict__, "features": {**old[0].features, "feature_version": 99.0}})
    assert build_table([alien]).skipped == 1
    assert FEATURE_VERSION == 3


def test_version_2_collect_records_get_their_own_arm_as_the_batchs_and_service_records_are_skipped():
    """Version 2 lacked the drafting mix. Collect ran one arm a batch, so its batch-mates drafted as the record's
    own arm does (the registry's `drafts`); a service's batch-mates are not recorded, so its record is dropped."""
    v3 = synthetic_load_outcomes(2, levels=(4,), temperatures=(0.0,))
    v2 = [Outcome(**{**o.__dict__, "features": {k: v for k, v in o.features.items() if not k.endswith("_drafting")}
                     | {"feature_version": 2.0}}) for o in v3]
    table = build_table(v2)
    assert len(table) == len(v2) and table.skipped == 0
    col = {k: table.base[:, i] for i, k in enumerate(BASE_FEATURES)}
    drafts = {"ar": (0.0, 0.0), "sps": (0.0, 3.0), "pld": (3.0, 0.0)}     # (lookup, model) of 3 batch-mates
    assert [drafts[m] for m in table.method] == list(zip(col["load_lookup_drafting"], col["load_model_drafting"]))
    served = [Outcome(**{**o.__dict__, "source": "service"}) for o in v2]
    assert build_table(served).skipped == len(served)


def test_the_batchs_drafting_mix_changes_the_choice():
    """A planted winner that depends only on what the batch-mates draft with (same running count): among 3
    model-drafting peers sps slows (its drafter forward queues behind theirs) and pld wins; among AR peers sps
    wins. The selector must tell the two batches apart from load_model_drafting alone."""
    from metaspec.selector.features import RequestInput

    rng = np.random.default_rng(0)
    out = []
    for p in range(40):
        ids = [int(t) for t in rng.integers(5, 500, 60)]
        req = request_features(RequestInput(ids, " ".join(map(str, ids)), 64))
        for peers in ("none", "model"):
            feats = req | pool_features(HARDWARE, 0.2, load_features(3, 0, 13, 16, {peers: 3})) | {
                "feature_version": float(FEATURE_VERSION)}
            for m in ("sps", "pld"):
                tps = {("sps", "none"): 150, ("pld", "none"): 100, ("sps", "model"): 70, ("pld", "model"): 100}[
                    (m, peers)] * float(rng.uniform(0.95, 1.05))
                out.append(Outcome(request_id=f"r{p}/{m}/{peers}", ts=0.0, source="collect", pool="cpu", method=m,
                                   status="OK", features=feats, prompt_id=f"p{p}", completion_tokens=64,
                                   wall_s=64 / tps, tokens_per_s=tps, max_tokens=64, concurrency=4))
    selector = Selector(fit_model(build_table(out), "gb"), SelectorConfig(epsilon=0))
    ids = list(range(100, 160))
    inp = RequestInput(ids, " ".join(map(str, ids)), 64)

    def pick(peers: str) -> str:
        pool = PoolInfo("cpu", ("sps", "pld"), HARDWARE, 0.2, load_features(3, 0, 13, 16, {peers: 3}))
        return selector.choose(inp, [pool]).method

    assert (pick("none"), pick("model")) == ("sps", "pld")


def test_slices_cover_every_level_and_temperature(outcomes, result):
    table = build_table(outcomes)
    parts = slice_requests(table, by_request(table), "concurrency")
    assert list(parts) == ["c=1", "c=4", "c=16"] and sum(map(len, parts.values())) == result["requests"]
    assert list(result["per_concurrency"]) == ["c=1", "c=4", "c=16"]
    assert list(result["per_temperature"]) == ["t=0", "t=1"]
    # the best fixed arm differs by level: a drafting arm when alone, AR when the batch is full
    assert result["per_concurrency"]["c=1"]["best_fixed"]["arm"] != "cpu/ar"
    assert result["per_concurrency"]["c=16"]["best_fixed"]["arm"] == "cpu/ar"
    for block in (*result["per_concurrency"].values(), *result["per_temperature"].values()):
        for name in ("rf", "gb", "ridge", "oracle", "always_ar", "random", f"fixed:{result['best_fixed_arm']}"):
            assert block[name]["requests"] > 0 and block[name]["mean_regret_tps"] >= -1e-9
        assert block["oracle"]["mean_regret_tps"] == 0 and block["oracle"]["oracle_frac"] == pytest.approx(1)


def test_the_selector_beats_every_fixed_arm_by_knowing_the_load(result):
    o, fixed = result["overall"], f"fixed:{result['best_fixed_arm']}"
    best = result["best_kind"]
    assert o[best]["tokens_per_s"] > 1.1 * o[fixed]["tokens_per_s"]
    for block in result["per_concurrency"].values():
        assert block[best]["tokens_per_s"] >= 0.97 * block["best_fixed"]["tokens_per_s"]
        assert block[best]["oracle_frac"] > 0.93


def test_report_has_a_row_per_slice(result):
    text = format_table(result)
    for row in ("overall", "plain", "repetitive", "c=1", "c=4", "c=16", "t=0", "t=1", "regret", "slice-best"):
        assert row in text


def test_a_pools_batch_load_reaches_the_choice(outcomes):
    from metaspec.selector.features import RequestInput

    model = fit_model(build_table(outcomes), "rf")
    selector = Selector(model, SelectorConfig(epsilon=0))   # exploration would pick at random
    ids = list(range(50))
    inp = RequestInput(ids, " ".join(map(str, ids)), 64)
    idle = PoolInfo("cpu", ("ar", "sps", "pld"), HARDWARE)
    busy = PoolInfo("cpu", ("ar", "sps", "pld"), HARDWARE, 0.8, load_features(15, 0, 1, 16))
    assert selector.choose(inp, [idle]).method != "ar"
    choice = selector.choose(inp, [busy])
    assert choice.method == "ar" and choice.features["load_running"] == 15.0


def test_eval_selector_cli_writes_the_slices(outcomes, tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text("".join(o.to_json() + "\n" for o in outcomes))
    out = tmp_path / "eval"
    assert main(["eval-selector", "--outcomes", str(path), "--kinds", "rf,ridge", "--folds", "3", "--no-loco",
                 "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert {"per_category", "per_concurrency", "per_temperature"} <= set(result)
    assert "c=16" in (out / "table.txt").read_text() and (out / "routing.png").stat().st_size > 0
    assert np.isfinite(result["per_concurrency"]["c=4"]["rf"]["mean_regret_tps"])
