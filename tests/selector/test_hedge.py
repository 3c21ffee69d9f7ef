"""The hedge (selector/hedge.py): a level's best fixed arm is kept unless another arm is predicted more than a
margin faster. Fitted on out-of-fold predictions it stays at margin 0 for a model that knows the winners and
grows for one that does not, and splits a level by sampling where greedy and sampled requests favour different
arms; the selector routes by it, the retrain writes it, a model file's hedge is checked."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from metaspec.selector.evaluate import argmax_policy, fit_hedge, fixed_policy, policy_metrics
from metaspec.selector.features import load_features
from metaspec.selector.hedge import check, choose, default_for
from metaspec.selector.model import SelectorModel
from metaspec.selector.retrain import RetrainConfig, retrain, routable
from metaspec.selector.selector import Selector, SelectorConfig
from metaspec.selector.train import build_table, by_request, design, fit_model
from metaspec.selector.types import PoolInfo

from .synth import HARDWARE, synthetic_load_outcomes


@pytest.fixture(scope="module")
def table():
    return build_table(synthetic_load_outcomes(24, seed=1))


def test_the_levels_arm_is_kept_within_the_margin_and_left_beyond_it():
    hedge = {"margin": 0.1, "defaults": {"1": "pld", "16": "ar"}}
    assert choose([4.0, 4.05, 3.0], ["pld", "sps", "ar"], [1, 1, 1], hedge) == 0
    assert choose([4.0, 4.2, 3.0], ["pld", "sps", "ar"], [1, 1, 1], hedge) == 1
    assert choose([4.0, 4.05, 3.0], ["pld", "sps", "ar"], [1, 1, 1], None) == 1          # no hedge: argmax
    assert choose([4.0, 4.05], ["pld", "sps"], [16, 16], hedge) == 1                    # 16's arm not a candidate
    # two pools: the default arm on the pool predicted faster, each pool judged at its own level
    assert choose([3.0, 3.2, 3.25], ["ar", "ar", "sps"], [16, 16, 16], hedge) == 1
    assert choose([3.0, 3.25], ["ar", "sps"], [1, 16], hedge) == 1                       # ar is 16's arm, not 1's
    assert default_for(hedge["defaults"], 4) == "pld" and default_for(hedge["defaults"], 8) == "ar"
    assert default_for(hedge["defaults"], 32) == "ar" and default_for({}, 4) is None
    assert check(hedge) is None and check(None) is None
    for bad in ([1], {"margin": -1.0}, {"margin": float("inf")}, {"margin": True}, {"defaults": {"0": "ar"}},
                {"defaults": {"4": 3}}, {"defaults": [("4", "ar")]}, {"defaults": {"4/fast": "ar"}},
                {"defaults": {"4/": "ar"}}, {"defaults": {"/greedy": "ar"}}, {"defaults": {4: "ar"}}):
        assert check(bad), bad


def test_a_hedge_with_sampling_cells_keeps_the_arm_of_the_requests_sampling():
    hedge = {"margin": 0.1, "defaults": {"1/greedy": "pld", "1/sampled": "sps", "16/greedy": "ar"}}
    assert check(hedge) is None
    assert choose([4.05, 4.0], ["pld", "sps"], [1, 1], hedge, greedy=False) == 1
    assert choose([4.0, 4.05], ["pld", "sps"], [1, 1], hedge, greedy=True) == 0
    assert default_for(hedge["defaults"], 16, greedy=False) == "sps"      # the nearest level with sampled cells
    assert default_for(hedge["defaults"], 4, greedy=True) == "pld"
    assert default_for(hedge["defaults"], 4) is None                      # no level-only cells, no sampling given
    assert default_for({"4": "ar"}, 4, greedy=True) == "ar"               # level cells serve either sampling


def test_fitted_on_a_model_that_knows_the_winners_the_margin_is_zero(table):
    hedge = fit_hedge(table, np.log(table.tps))           # predictions that are the measurements
    assert hedge["margin"] == 0.0 and hedge["oof_oracle_frac"]["level:0"] == pytest.approx(1.0)
    assert hedge["defaults"]["16"] == "ar"                 # the planted load: at 16 every draft costs the batch


def test_fitted_on_a_model_that_knows_nothing_it_keeps_each_levels_arm_and_routes_better(table):
    noise = np.random.default_rng(0).normal(0.0, 0.5, len(table)) + 4.0
    hedge = fit_hedge(table, noise)
    assert hedge["margin"] >= 0.5
    requests = by_request(table)
    plain = policy_metrics(table, requests, argmax_policy(table, requests, noise))["oracle_frac"]
    hedged = policy_metrics(table, requests, argmax_policy(table, requests, noise, hedge))["oracle_frac"]
    assert hedged > plain + 0.05, (hedged, plain)


def split_by_sampling(outcomes):
    """pld twice as fast on greedy requests and half as fast on sampled ones: the best arm of a level depends on
    the request's sampling."""
    def planted(o):
        gain = (2.0 if o.temperature == 0 else 0.5) if o.method == "pld" else 1.0
        return dataclasses.replace(o, tokens_per_s=o.tokens_per_s * gain, wall_s=o.wall_s / gain)
    return [planted(o) for o in outcomes]


def test_where_sampling_splits_the_winners_a_noise_model_is_hedged_by_level_and_sampling():
    table = build_table(split_by_sampling(synthetic_load_outcomes(24, seed=2)))
    noise = np.random.default_rng(1).normal(0.0, 0.5, len(table)) + 4.0
    hedge = fit_hedge(table, noise)
    assert hedge["defaults"]["1/greedy"] == "pld" and hedge["defaults"]["1/sampled"] == "sps", hedge
    assert all("/" in k for k in hedge["defaults"]) and hedge["margin"] >= 0.5
    fracs = hedge["oof_oracle_frac"]
    assert max(v for k, v in fracs.items() if k.startswith("level/")) > max(
        v for k, v in fracs.items() if k.startswith("level:")) + 0.05, fracs
    requests = by_request(table)
    hedged = policy_metrics(table, requests, argmax_policy(table, requests, noise, hedge))["oracle_frac"]
    by_level = {"margin": hedge["margin"], "defaults": {k.partition("/")[0]: v for k, v in hedge["defaults"].items()
                                                         if k.endswith("/greedy")}}
    assert hedged > policy_metrics(table, requests, argmax_policy(table, requests, noise, by_level))["oracle_frac"]


def test_the_selector_routes_by_the_files_hedge(table, tmp_path):
    model = fit_model(table, "rf")
    path = tmp_path / "m.skops"
    model.meta["hedge"] = {"margin": 1.0, "defaults": {"1": "ar", "16": "sps"}}
    model.save(path, design(table, model.methods)[0][:8])
    selector = Selector.load(path, SelectorConfig(epsilon=0.0))
    ids = list(range(1, 200)) * 2                                     # repeats itself: pld is predicted fastest
    idle = PoolInfo("cpu", ("ar", "sps", "pld"), HARDWARE)
    busy = PoolInfo("cpu", ("ar", "sps", "pld"), HARDWARE, batch=load_features(15, 0, 1, 16))
    from metaspec.selector.features import RequestInput

    request = RequestInput(prompt_ids=tuple(ids), max_tokens=64)
    assert (c := selector.choose(request, [idle])).method == "ar" and c.reason == "model: the level's arm (hedge)"
    assert selector.choose(request, [busy]).method == "sps"
    model.meta["hedge"] = {"margin": 1.0, "defaults": {"1/greedy": "ar", "1/sampled": "sps"}}
    model.save(path, design(table, model.methods)[0][:8])
    by_sampling = Selector.load(path, SelectorConfig(epsilon=0.0))
    sampled = RequestInput(prompt_ids=tuple(ids), max_tokens=64, temperature=1.0)
    assert by_sampling.choose(request, [idle]).method == "ar" and by_sampling.choose(sampled, [idle]).method == "sps"
    model.meta.pop("hedge")
    model.save(path, design(table, model.methods)[0][:8])
    plain = Selector.load(path, SelectorConfig(epsilon=0.0)).choose(request, [idle])
    assert plain.reason == "model" and plain.method == max(plain.scores, key=plain.scores.get).split("/")[1]


def test_retrain_writes_the_hedge_and_scores_the_held_out_prompts_under_it(tmp_path):
    data = tmp_path / "load.jsonl"
    data.write_text("".join(o.to_json() + "\n" for o in synthetic_load_outcomes(30, seed=3)))
    report = retrain([data], None, tmp_path / "out.skops", RetrainConfig(kinds=("rf",), n_splits=3))
    assert report["written"] and report["hedge"]["defaults"]["16/greedy" if "16/greedy" in report["hedge"][
        "defaults"] else "16"] == "ar"
    assert report["unroutable"] == 30 * 2              # sps on the sampled requests at 4 and 16 clients
    assert report["unhedged_score"] is not None and 0 < report["new_score"] <= 1.0
    assert SelectorModel.load(tmp_path / "out.skops").hedge["margin"] == report["hedge"]["margin"]
    off = retrain([data], None, tmp_path / "off.skops", RetrainConfig(kinds=("rf",), n_splits=3, hedge=False))
    assert off["hedge"] is None and SelectorModel.load(tmp_path / "off.skops").hedge is None
    assert off["new_score"] == pytest.approx(report["unhedged_score"])


def test_the_retrain_drops_rows_the_router_cannot_choose_and_still_counts_those_requests():
    from collections import Counter

    table = build_table(synthetic_load_outcomes(12, seed=4))
    cut = routable(table)
    rows = lambda t: Counter(zip(t.method.tolist(), t.greedy.tolist(), t.concurrency.tolist()))  # noqa: E731
    assert rows(table) - rows(cut) == Counter({("sps", False, 4): 12, ("sps", False, 16): 12})
    assert len(routable(table, caps_sampled_drafts=True)) == len(table)     # the pools cap sampled drafts
    requests = by_request(cut)
    assert len(requests) == len(by_request(table))      # complete on the arms the router may choose
    busy_sampled = [k for k in requests if k.rsplit("|", 1)[1] != "c1" and "|1.0|" in k]
    assert busy_sampled and all("cpu/sps" not in requests[k] for k in busy_sampled)
    weights = fixed_policy(requests, "cpu/sps")         # where sps cannot serve, the router's fallback: AR
    assert all(weights[k] == {"cpu/ar": 1.0} for k in busy_sampled)
    assert all(w == {"cpu/sps": 1.0} for k, w in weights.items() if k not in busy_sampled)
