"""The learnt selector: picks the planted winner on prompts it never saw, explores when asked, falls back cleanly."""

from __future__ import annotations

import numpy as np
import pytest

from metaspec.selector.features import RequestInput
from metaspec.selector.selector import FixedSelector, Selector, SelectorConfig, load_selector
from metaspec.selector.train import build_table, fit_model
from metaspec.selector.types import PoolInfo

from .synth import HARDWARE, planted_winner, prompt_ids, synthetic_outcomes

POOL = PoolInfo("cpu", ("ar", "sps", "pld"), HARDWARE)


@pytest.fixture(scope="module")
def model():
    return fit_model(build_table(synthetic_outcomes(120, seed=1)), "rf")


def _request(repetitive: bool, seed: int) -> RequestInput:
    rng = np.random.default_rng(seed)
    ids = prompt_ids(rng, repetitive, int(rng.integers(20, 300)))
    return RequestInput(ids, " ".join(f"w{t}" for t in ids[:200]), 64)


@pytest.mark.parametrize("kind", ["rf", "gb", "knn", "ridge"])
def test_every_kind_picks_the_planted_winner_on_unseen_prompts(kind):
    selector = Selector(fit_model(build_table(synthetic_outcomes(120, seed=1)), kind), SelectorConfig(epsilon=0))
    held_out = synthetic_outcomes(40, seed=2)[::3]                   # new prompts: one record per prompt
    chosen = [selector.choose(_request(o.category == "repetitive", 1000 + i), [POOL]).method
              for i, o in enumerate(held_out)]
    wanted = [planted_winner(o) for o in held_out]
    assert np.mean([c == w for c, w in zip(chosen, wanted)]) >= 0.9, list(zip(chosen, wanted))


def test_choice_carries_scores_features_and_version(model):
    choice = Selector(model, SelectorConfig(epsilon=0)).choose(_request(True, 5), [POOL])
    assert (choice.pool, choice.method, choice.reason, choice.explored) == ("cpu", "pld", "model", False)
    assert set(choice.scores) == {"cpu/ar", "cpu/sps", "cpu/pld"}
    assert max(choice.scores, key=choice.scores.get) == "cpu/pld"
    assert choice.features["rep3"] > 0.5 and choice.features["pool_accel=cpu"] == 1.0
    assert choice.features["feature_version"] >= 1 and choice.selector_version == model.version


def test_rules_come_before_the_model(model):
    only_ar = PoolInfo("bare", ("ar",), HARDWARE)
    no_pld = PoolInfo("nopld", ("ar", "sps"), HARDWARE)
    choice = Selector(model, SelectorConfig(epsilon=1.0)).choose(_request(True, 5), [only_ar])
    assert (choice.method, choice.explored) == ("ar", False) and choice.reason.startswith("rule: only ar")
    choice = Selector(model, SelectorConfig(epsilon=0)).choose(_request(True, 5), [no_pld])
    assert choice.method == "sps" and "nopld/pld" not in choice.scores


def test_exploration_share_is_configurable(model):
    def explored(eps: float) -> list:
        sel = Selector(model, SelectorConfig(epsilon=eps, seed=3))
        return [sel.choose(_request(True, i), [POOL]) for i in range(200)]

    assert not any(c.explored for c in explored(0.0))
    picks = explored(0.3)
    share = np.mean([c.explored for c in picks])
    assert 0.15 < share < 0.45
    assert all(c.reason == "explore" and c.method != "pld" for c in picks if c.explored)
    assert {c.method for c in picks if c.explored} == {"ar", "sps"}
    with pytest.raises(ValueError):
        SelectorConfig(epsilon=1.5)


def test_fixed_selector_and_fallback(tmp_path):
    fixed = FixedSelector(SelectorConfig(epsilon=0, fixed_method="sps"))
    busy, idle = PoolInfo("a", ("ar", "sps"), load=0.9), PoolInfo("b", ("ar", "sps"), load=0.1)
    choice = fixed.choose(_request(False, 1), [busy, idle])
    assert (choice.pool, choice.method, choice.reason) == ("b", "sps", "fixed")
    assert choice.features["rep3"] >= 0                               # logged so the first model can train
    assert fixed.choose(_request(False, 1), [PoolInfo("c", ("ar", "pld"))]).method == "ar"
    bad = tmp_path / "bad.skops"
    bad.write_bytes(b"not a model")
    kept, error = load_selector(bad, current=fixed)
    assert kept is fixed and "corrupted" in error
    fresh, error = load_selector(bad)
    assert isinstance(fresh, FixedSelector) and error


def test_accepts_the_engines_request(model, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from metaspec.selector.features import request_features, request_input
    from metaspec.workers.engine import Request
    from metaspec.workers.types import SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    text = "def f(x):\n    return x + 1\n" * 4
    params = SamplingParams(temperature=0.5, top_p=0.9, max_tokens=33)
    ids = tok.encode(text, add_special_tokens=False)
    by_text, by_ids = Request(prompt=text, params=params), Request(prompt_ids=tuple(ids), params=params)
    exact = request_features(RequestInput(ids, text, 33, 0.5, 0.9))
    assert request_features(request_input(by_text, tok)) == exact
    assert request_features(request_input(by_ids, tok))["rep3"] == exact["rep3"]
    assert request_input(by_text).prompt_ids                      # no tokenizer: word-level pseudo ids
    selector = Selector(model, SelectorConfig(epsilon=0), tokenizer=tok)
    choice = selector.choose(by_text, (POOL,))
    assert choice.method in ("ar", "sps", "pld") and choice.features["temperature"] == 0.5
