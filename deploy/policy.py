"""How the router picks (pool, method) until the learned selector lands, and the request checks around it.

A policy is any object with `choose(request, pools) -> Choice` (the learned `selector.Selector` has the same
shape); `pick` applies the request's method override first, so every policy gets it for free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from metaspec.protocol.types import GenerateCall
from metaspec.selector.types import Choice, PoolInfo
from metaspec.workers.engine import Request
from metaspec.workers.registry import arms
from metaspec.workers.types import RequestError


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


def pick(policy: Policy, request: Request, pools: Sequence[PoolInfo]) -> Choice:
    """The request's method override if it names one (reason "override"), else the policy's choice."""
    if request.method is None:
        return policy.choose(request, pools)
    known = arms()
    if request.method not in known:
        raise RequestError(f"unknown method {request.method!r}; known: {', '.join(sorted(known))}")
    able = [p for p in pools if request.method in p.methods]
    if not able:
        raise RequestError(f"method {request.method!r} is not available on any pool "
                           f"(it needs: {', '.join(sorted(known[request.method].requires)) or 'nothing'})")
    return Choice(least_loaded(able).name, request.method, "override", features=cheap_features(request),
                  selector_version=getattr(policy, "version", "unknown"))


def least_loaded(pools: Sequence[PoolInfo]) -> PoolInfo:
    return min(pools, key=lambda p: p.load)


def cheap_features(request: Request) -> dict[str, float]:
    """What the fixed policy records about a request (the learned selector records its own features)."""
    p = request.params
    size = float(len(request.prompt or "") if request.prompt_ids is None else len(request.prompt_ids))
    return {"prompt_size": size, "max_tokens": float(p.max_tokens), "temperature": float(p.temperature),
            "has_constraint": float(request.constraint is not None)}


def check_call(call: GenerateCall, max_tokens_limit: int, max_prompt_chars: int) -> None:
    """Deployment limits on a converted request; raises RequestError. (Constraints compile in the worker.)"""
    params, prompt = call.request.params, call.request.prompt
    if params.max_tokens > max_tokens_limit:
        raise RequestError(f"max_tokens must be <= {max_tokens_limit}, got {params.max_tokens}")
    if prompt is not None and len(prompt) > max_prompt_chars:
        raise RequestError(f"prompt has {len(prompt)} characters; the limit is {max_prompt_chars}")
