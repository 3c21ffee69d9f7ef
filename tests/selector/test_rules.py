"""Hard rules: a table of (pool, method, constraint) cases with the expected verdict and reason."""

from __future__ import annotations

import pytest

from metaspec.selector.rules import DEFAULT_ARMS, ArmSpec, allowed, arm_specs, candidates, specs_from_registry
from metaspec.selector.types import PoolInfo

FULL = PoolInfo("gpu", ("ar", "sps", "pld", "pearl"), {"devices": 2, "resources": "drafter,ngram_store"})
ONE_DEVICE = PoolInfo("cpu", ("ar", "sps", "pld", "pearl"), {"devices": 1})
NO_DRAFTER = PoolInfo("lean", ("ar", "sps", "pld"), {"resources": "ngram_store"})
OTHER_TOKENIZER = PoolInfo("mixed", ("ar", "sps", "pld"), {"tokenizer": "llama", "drafter_tokenizer": "gpt2"})
SAME_TOKENIZER = PoolInfo("same", ("ar", "sps"), {"tokenizer": "bpe8k", "drafter_tokenizer": "bpe8k"})
AR_ONLY = PoolInfo("bare", (), {})
BUSY_SECOND = PoolInfo("busy", ("ar", "pearl"), {"devices": 2, "idle_devices": 0})
NO_CONSTRAINT_ARMS = dict(DEFAULT_ARMS) | {"pld": ArmSpec(constraint_capable=False)}

CASES = [
    # pool, method, has_constraint, arms table, allowed, reason fragment
    (FULL, "ar", False, DEFAULT_ARMS, True, "always allowed"),
    (AR_ONLY, "ar", True, DEFAULT_ARMS, True, "always allowed"),
    (FULL, "sps", False, DEFAULT_ARMS, True, "ok"),
    (FULL, "pearl", False, DEFAULT_ARMS, True, "ok"),
    (ONE_DEVICE, "pearl", False, DEFAULT_ARMS, False, "idle second device"),
    (BUSY_SECOND, "pearl", False, DEFAULT_ARMS, False, "idle second device"),
    (NO_DRAFTER, "sps", False, DEFAULT_ARMS, False, "needs drafter"),
    (NO_DRAFTER, "pld", False, DEFAULT_ARMS, True, "ok"),
    (OTHER_TOKENIZER, "sps", False, DEFAULT_ARMS, False, "does not share the target's tokenizer"),
    (OTHER_TOKENIZER, "pld", False, DEFAULT_ARMS, True, "ok"),
    (SAME_TOKENIZER, "sps", False, DEFAULT_ARMS, True, "ok"),
    (AR_ONLY, "pld", False, DEFAULT_ARMS, False, "not installed on pool bare"),
    (FULL, "medusa", False, DEFAULT_ARMS, False, "not a known arm"),
    (FULL, "pld", True, DEFAULT_ARMS, True, "ok"),
    (FULL, "pld", True, NO_CONSTRAINT_ARMS, False, "cannot run under a constraint"),
    (FULL, "pld", False, NO_CONSTRAINT_ARMS, True, "ok"),
]


@pytest.mark.parametrize("pool, method, constraint, arms, ok, reason", CASES,
                         ids=[f"{c[0].name}-{c[1]}-{'c' if c[2] else 'nc'}" for c in CASES])
def test_rule_table(pool, method, constraint, arms, ok, reason):
    got_ok, got_reason = allowed(method, pool, constraint, arms)
    assert (got_ok, reason in got_reason) == (ok, True), got_reason


def test_candidates_always_include_ar_on_every_pool():
    pairs, refused = candidates([AR_ONLY, ONE_DEVICE, NO_DRAFTER], has_constraint=False)
    assert {(p.name, m) for p, m in pairs} == {("bare", "ar"), ("cpu", "ar"), ("cpu", "sps"), ("cpu", "pld"),
                                               ("lean", "ar"), ("lean", "pld")}
    assert set(refused) == {"cpu/pearl", "lean/sps"}


def test_the_rules_table_is_the_registry():
    """Fails when the rules' view of an arm would disagree with the workers' registry: same arms, same
    requirements (the worker resources and placement needs the registry declares, nothing added), same
    descriptions."""
    from metaspec.workers.registry import arms

    registry, table = arms(), specs_from_registry()
    assert set(table) == set(registry) == set(DEFAULT_ARMS) and {"ar", "sps", "pld", "pearl"} <= set(table)
    for name, arm in registry.items():
        assert table[name].requires == arm.requires | arm.placement, name
        assert not arm.placement & arm.requires, f"{name}: a placement need is not a worker resource"
        assert DEFAULT_ARMS[name] == table[name] and table[name].description == arm.description, name
    assert "drafter" in table["sps"].requires and "second_device" in table["pearl"].requires


def test_the_router_gets_the_registry_table_as_data():
    """The app builder reads the registry and binds the table into the Router (which never imports it), and the
    workers' torch-free `registered_methods()` shape converts to the same table."""
    from metaspec.deploy.app import build_app
    from metaspec.workers.worker import registered_methods

    app = build_app({"pools": [{"name": "p", "target": "/t", "drafter": ""}]})
    assert app._bound_deployment.init_kwargs["arms"] == specs_from_registry()
    assert arm_specs(registered_methods()) == specs_from_registry()


BUSY = PoolInfo("cpu", ("ar", "sps", "early_exit", "pld", "ngram_store"), {"devices": 1}, batch={"load_running": 3.0})
IDLE = PoolInfo("cpu", BUSY.methods, {"devices": 1}, batch={"load_running": 0.0})
CUTS = PoolInfo("cpu", BUSY.methods, {"devices": 1, "caps_sampled_drafts": 1.0}, batch={"load_running": 3.0})


@pytest.mark.parametrize("pool, sampled, refused", [(BUSY, True, {"sps", "early_exit"}), (BUSY, False, set()),
                                                    (IDLE, True, set()), (IDLE, False, set()), (CUTS, True, set())])
def test_a_sampled_request_drafts_from_a_distribution_only_on_an_idle_pool(pool, sampled, refused):
    """sps and early_exit draft a sampled request's tokens from a distribution the budget never cuts, so every
    batchmate waits for them: on a pool with requests running, a sampled request is not sent there; greedy ones
    (whose drafts the budget prices against the batch), an idle pool and a pool whose budget caps sampled drafts
    too are unaffected. The table arms never."""
    pairs, why = candidates([pool], has_constraint=False, sampled=sampled)
    assert set(pool.methods) - {m for _, m in pairs} == refused
    assert {k.split("/")[1] for k in why} == refused
    assert all("never cut" in why[f"cpu/{m}"] and "3 running" in why[f"cpu/{m}"] for m in refused)
    assert {m for m, a in DEFAULT_ARMS.items() if "alone_when_sampled" in a.requires} == {"sps", "early_exit"}


def test_the_fixed_selector_falls_back_to_ar_for_a_sampled_request_on_a_busy_pool():
    from metaspec.selector.features import RequestInput
    from metaspec.selector.selector import FixedSelector, SelectorConfig

    selector = FixedSelector(SelectorConfig(epsilon=0.0, fixed_method="sps"))
    hot, cold = (RequestInput(prompt_ids=(5, 6, 7), temperature=t) for t in (0.7, 0.0))
    assert selector.choose(hot, [IDLE]).method == "sps" and selector.choose(cold, [BUSY]).method == "sps"
    busy = selector.choose(hot, [BUSY])
    assert (busy.method, busy.reason) == ("ar", "rule: sps not allowed on any pool")
