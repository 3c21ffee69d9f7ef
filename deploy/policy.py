"""How the router picks (pool, method) until the learned selector lands, and the request checks around it.

A policy is any object with `choose(request, pools) -> Choice` (the learned `selector.Selector` has the same
shape); `pick` applies the request's method override first, so every policy gets it for free.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from metaspec.protocol.types import GenerateCall
from metaspec.selector.live import LiveConfig, LiveSelector
from metaspec.selector.rules import DEFAULT_ARMS, ArmSpec
from metaspec.selector.selector import SelectorConfig
from metaspec.selector.types import Choice, PoolInfo
from metaspec.workers.request import Request, RequestError

from .config import PoolSpec, RouterModel, RouterSpec

logger = logging.getLogger("ray.serve")
# The Router's user_config (see reconfigure): the selector's settings, and access (keys rotate, quotas change)
USER_CONFIG_KEYS = ("selector", "explore", "selector_check_s", "api_key_hashes", "api_keys_file", "keys_version",
                    "key_quota", "quotas")


class Policy(Protocol):
    version: str

    def choose(self, request: Request, pools: Sequence[PoolInfo]) -> Choice: ...


class FixedPolicy:
    """The least-loaded pool that can run the first method of `methods` any pool runs.

    >>> FixedPolicy(("sps", "ar")).choose(request, [PoolInfo("cpu", ("ar", "pld", "sps"))])
    Choice(pool='cpu', method='sps', reason='fixed', ...)
    """

    version = "fixed"

    def __init__(self, methods: Sequence[str]) -> None:
        if not methods:
            raise ValueError("FixedPolicy needs at least one method")
        self.methods = tuple(methods)

    def choose(self, request: Request, pools: Sequence[PoolInfo]) -> Choice:
        for method in self.methods:
            able = [p for p in pools if method in p.methods]
            if able:
                return Choice(least_loaded(able).name, method, "fixed", features=cheap_features(request),
                              selector_version=self.version)
        raise RequestError(f"no pool can run any of {list(self.methods)}")


def pick(policy: Policy, request: Request, pools: Sequence[PoolInfo],
         arms: Mapping[str, ArmSpec] = DEFAULT_ARMS) -> Choice:
    """The request's method override if it names one (reason "override"), else the policy's choice. `arms`: the
    registry's table (`selector.rules`)."""
    if request.method is None:
        return policy.choose(request, pools)
    known = arms
    if request.method not in known:
        raise RequestError(f"unknown method {request.method!r}; known: {', '.join(sorted(known))}")
    able = [p for p in pools if request.method in p.methods]
    if not able:
        raise RequestError(f"method {request.method!r} is not available on any pool "
                           f"(it needs: {', '.join(sorted(known[request.method].requires)) or 'nothing'})")
    pool = least_loaded(able)
    features = policy.features_for(request, pool) if hasattr(policy, "features_for") else cheap_features(request)
    return Choice(pool.name, request.method, "override", features=features,
                  selector_version=getattr(policy, "version", "unknown"))


def least_loaded(pools: Sequence[PoolInfo]) -> PoolInfo:
    return min(pools, key=lambda p: p.load)


def cheap_features(request: Request) -> dict[str, float]:
    """What the fixed policy records about a request (the learned selector records its own features)."""
    p = request.params   # a text prompt is measured in characters (the router adds its ids; they do not count)
    size = float(len(request.prompt) if request.prompt is not None else len(request.prompt_ids or ()))
    return {"prompt_size": size, "max_tokens": float(p.max_tokens), "temperature": float(p.temperature),
            "has_constraint": float(request.constraint is not None)}


def check_call(call: GenerateCall, max_tokens_limit: int, max_prompt_chars: int) -> None:
    """Deployment limits on a converted request; raises RequestError. (Constraints compile in the worker.)"""
    params, prompt = call.request.params, call.request.prompt
    if params.max_tokens > max_tokens_limit:
        raise RequestError(f"max_tokens must be <= {max_tokens_limit}, got {params.max_tokens}")
    if prompt is not None and len(prompt) > max_prompt_chars:
        raise RequestError(f"prompt has {len(prompt)} characters; the limit is {max_prompt_chars}")


# ---- the learnt selector behind the router ------------------------------------------------------------------

def live_config(spec: RouterSpec) -> LiveConfig:
    return LiveConfig(None if spec.selector == "default" else spec.selector, spec.selector_check_s,
                      SelectorConfig(epsilon=spec.explore))


def make_policy(spec: RouterSpec, pools: Sequence[PoolSpec], tokenizer=None,
                ngram_hit_rate: Callable[[Sequence[int]], float] | None = None,
                arms: Mapping[str, ArmSpec] = DEFAULT_ARMS) -> Policy:
    """The fixed policy, or the learnt selector following its file (`LiveSelector`), with the pools' tokenizer
    for its prompt features and the shared n-gram table's tail hit rate (without one that feature is 0)."""
    if spec.selector == "fixed":
        return FixedPolicy(spec.methods)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(pools[0].tokenizer or pools[0].target)
    return LiveSelector(live_config(spec), arms, ngram_hit_rate=ngram_hit_rate, tokenizer=tokenizer, log=logger)


def user_config(spec: RouterSpec) -> dict[str, Any]:
    """The Router deployment's user_config: what Serve changes in place (`reconfigure`), without a restart."""
    data = dataclasses.asdict(spec)
    return {k: list(data[k]) if isinstance(data[k], tuple) else data[k] for k in USER_CONFIG_KEYS}


def apply_user_config(spec: RouterSpec, config: Mapping[str, Any] | None) -> RouterSpec:
    """`spec` with a (partial) user_config applied, validated like the YAML; raises ValueError on a bad one."""
    config = dict(config or {})
    if unknown := sorted(set(config) - set(USER_CONFIG_KEYS)):
        raise ValueError(f"Router user_config keys {unknown} cannot change in place; allowed: {list(USER_CONFIG_KEYS)}")
    return RouterModel.model_validate(dataclasses.asdict(spec) | config).to_spec()


class NgramMirror:
    """A read-only local copy of a pool's shared n-gram table, followed from Redis by the store's own syncer
    thread, so the router's `ngram_table_hit` feature sees what the workers learnt. Lookups never touch Redis.

    >>> mirror = NgramMirror.for_pool(pool_spec)         # None when the pool's tables are not in Redis
    >>> mirror.hit_rate(prompt_ids)                      # share of the prompt's tail the table continues
    0.25
    """

    def __init__(self, store_cfg, fingerprint: str, vocab_size: int) -> None:
        from metaspec.selector.features import ngram_tail_hit_rate
        from metaspec.workers.store import Keys, NgramTable, worker_id
        from metaspec.workers.store.sync import Syncer

        self.table = NgramTable(store_cfg.ngram, vocab_size)
        self.syncer = Syncer(store_cfg, Keys.for_fingerprint(fingerprint), [self.table], f"router:{worker_id()}")
        self.hit_rate = ngram_tail_hit_rate(self.table)   # the same hook `metaspec collect` trains with

    @classmethod
    def for_pool(cls, pool: PoolSpec) -> "NgramMirror | None":
        if pool.tables is None or pool.tables.redis_url is None:
            return None
        from metaspec.workers.store import fingerprint

        from .app import store_config   # the pool's own store settings (app imports this module: import late)

        vocab_size = json.loads((Path(pool.target) / "config.json").read_text())["vocab_size"]
        return cls(store_config(pool.tables), fingerprint(pool.target, pool.tokenizer), vocab_size)

    def close(self) -> None:
        self.syncer.close()


def mirror_pool(pools: Sequence[PoolSpec]) -> PoolSpec | None:
    """The pool whose shared table feeds the feature: the first one in Redis with the first pool's tokenizer."""
    tokenizer = pools[0].tokenizer or pools[0].target
    return next((p for p in pools if p.tables is not None and p.tables.redis_url is not None
                 and (p.tokenizer or p.target) == tokenizer), None)
