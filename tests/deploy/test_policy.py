"""The fixed policy, the override rule and the deployment-limit checks (a table of cases each)."""

from __future__ import annotations

import pytest

from metaspec.deploy.policy import FixedPolicy, check_call, pick
from metaspec.protocol.types import GenerateCall
from metaspec.selector.types import PoolInfo
from metaspec.workers.engine import Request
from metaspec.workers.types import RequestError, SamplingParams

POOLS = [PoolInfo("big", ("ar", "pld", "sps"), load=0.5), PoolInfo("small", ("ar", "pld"), load=0.1),
         PoolInfo("busy", ("ar", "pld", "sps"), load=0.9)]


def req(method: str | None = None, **params) -> Request:
    return Request(prompt="hello there", params=SamplingParams(**params), method=method)


@pytest.mark.parametrize("methods, method, pool, reason", [
    (("sps", "pld", "ar"), None, "big", "fixed"),        # sps on the least loaded pool that has it
    (("pld", "ar"), None, "small", "fixed"),             # pld everywhere: least loaded overall
    (("tree", "ar"), None, "small", "fixed"),            # an arm no pool runs is skipped
    (("sps",), "pld", "small", "override"),              # the request's method wins
    (("pld",), "sps", "big", "override"),
])
def test_choices(methods, method, pool, reason):
    choice = pick(FixedPolicy(methods), req(method), POOLS)
    assert (choice.pool, choice.method, choice.reason) == (pool, method or choice.method, reason)
    assert choice.selector_version == "fixed" and choice.features["prompt_size"] == len("hello there")


def test_unknown_or_unavailable_method_is_a_request_error():
    with pytest.raises(RequestError, match="unknown method 'nope'; known: .*ar"):
        pick(FixedPolicy(("ar",)), req("nope"), POOLS)
    with pytest.raises(RequestError, match="'sps' is not available on any pool .*drafter"):
        pick(FixedPolicy(("ar",)), req("sps"), [PoolInfo("small", ("ar", "pld"))])
    with pytest.raises(RequestError, match="no pool can run"):
        FixedPolicy(("sps",)).choose(req(), [PoolInfo("small", ("ar", "pld"))])


def test_any_object_with_choose_is_a_policy():
    class Always:
        version = "test"

        def choose(self, request, pools):
            return FixedPolicy(("ar",)).choose(request, pools)

    assert pick(Always(), req(), POOLS).method == "ar"
    assert pick(Always(), req("pld"), POOLS).selector_version == "test"


@pytest.mark.parametrize("call, message", [
    (GenerateCall(req(max_tokens=300)), "max_tokens must be <= 256"),
    (GenerateCall(Request(prompt="x" * 1001)), "1001 characters; the limit is 1000"),
])
def test_deployment_limits(call, message):
    with pytest.raises(RequestError, match=message):
        check_call(call, max_tokens_limit=256, max_prompt_chars=1000)


def test_a_request_within_limits_passes():
    check_call(GenerateCall(req(max_tokens=256)), max_tokens_limit=256, max_prompt_chars=1000)


def test_the_learnt_selector_plugs_in_behind_the_same_interface(tiny_pair):
    """`selector: <file>` in the config; a file that cannot be loaded leaves the selector's fixed fallback."""
    from metaspec.deploy.config import PoolSpec, RouterSpec
    from metaspec.deploy.router import make_policy

    pools = (PoolSpec("big", tiny_pair.target, tiny_pair.drafter),)
    assert isinstance(make_policy(RouterSpec(), pools), FixedPolicy)
    learnt = make_policy(RouterSpec(selector="/nonexistent/selector.skops", explore=0.0), pools)
    choice = pick(learnt, req(), POOLS)
    assert choice.pool in {"big", "small", "busy"} and choice.features      # features recorded for retraining
    named = pick(learnt, req("pld"), POOLS)
    assert named.reason == "override"
    # a client naming the arm gets the same features recorded: named-arm runs are training data too (they were
    # not, and a loop training on "every logged request" used only the routed 1 in 8)
    from metaspec.selector.train import BASE_FEATURES

    assert set(BASE_FEATURES) <= set(named.features) and named.features == {**choice.features, **{
        k: v for k, v in named.features.items() if k.startswith("pool_") or k.startswith("load_")}}


# ---- the Router's user_config (what `serve deploy` changes in place) -----------------------------------------

@pytest.mark.parametrize("config, error", [
    ({"selector": "/srv/selector.skops"}, None),
    ({"explore": 0.2, "selector_check_s": 0}, None),
    ({}, None),
    ({"explore": 1.5}, "less than or equal to 1"),
    ({"selector_check_s": -1}, "greater than or equal to 0"),
    ({"selector": ""}, "at least 1 character"),
    ({"max_tokens_limit": 8}, "cannot change in place"),
])
def test_user_config_changes_only_the_selector_settings(config, error):
    from metaspec.deploy.config import RouterSpec
    from metaspec.deploy.policy import apply_user_config, user_config

    spec = RouterSpec(selector="default", methods=("pld", "ar"), api_key_hashes=("a" * 64,))
    assert apply_user_config(spec, user_config(spec)) == spec
    if error:
        with pytest.raises(ValueError, match=error):
            apply_user_config(spec, config)
        return
    new = apply_user_config(spec, config)
    assert {k: getattr(new, k) for k in config} == config
    assert new.methods == spec.methods and new.api_key_hashes == spec.api_key_hashes


def test_the_router_mirror_follows_the_workers_table_through_redis():
    """Real Redis (127.0.0.1:6379): what a worker's table learnt reaches the router's read-only copy."""
    import uuid

    from metaspec.deploy.policy import NgramMirror
    from metaspec.workers.store import RedisConfig, SharedTables, StoreConfig
    from metaspec.workers.store.sync import make_client

    cfg = StoreConfig(redis=RedisConfig(url="redis://127.0.0.1:6379/0"), sync_interval_s=3600)
    fp = f"test-mirror-{uuid.uuid4().hex[:8]}"
    worker = SharedTables(cfg, fp, vocab_size=100)
    mirror = NgramMirror(cfg, fp, vocab_size=100)
    try:
        prompt = [1, 2, 3, 4, 5, 6, 7, 8]
        assert mirror.hit_rate(prompt) == 0.0
        worker.ngram.learn([], prompt + [9])
        if not worker.flush():
            pytest.skip("no Redis at 127.0.0.1:6379")
        assert mirror.syncer.sync(force=True)
        assert mirror.hit_rate(prompt) == 1.0                # every 3-token context of the tail continues
        assert mirror.hit_rate([50, 51, 52, 53]) == 0.0
        assert not mirror.table.pending                       # a mirror never has anything to push
    finally:
        worker.close()
        mirror.close()
        r = make_client(cfg.redis)
        keys = list(r.scan_iter(f"*{fp}*"))
        if keys:
            r.delete(*keys)
        r.close()
