"""Hard rules applied before any learning: which (pool, method) pairs may serve a request, each with a reason.

A rule is a pure function `(method, arm, pool, request) -> str | None` that returns why the pair is refused, or
None. `allowed` runs them in order; AR is always allowed (it needs nothing but the target every worker holds).

>>> pool = PoolInfo("cpu", ("ar", "sps", "pearl"), {"devices": 1})
>>> allowed("pearl", pool, has_constraint=False)
(False, 'pearl needs an idle second device; pool cpu has 1')
>>> allowed("ar", pool, has_constraint=True)
(True, 'ar is always allowed')
>>> busy = PoolInfo("cpu", ("ar", "sps"), batch={"load_running": 3.0})
>>> allowed("sps", busy, has_constraint=False, sampled=True, arms={"sps": ArmSpec(frozenset({"alone_when_sampled"}))})
(False, "sps's sampled drafts are never cut, and every one of pool cpu's 3 running requests would wait for them")
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from .types import PoolInfo


@dataclass(frozen=True)
class ArmSpec:
    """What the router must know about an arm to rule on it, read from the workers' registry."""

    requires: frozenset[str] = frozenset()    # resources the arm cannot run without ("drafter", "ngram_table"...)
    constraint_capable: bool = True           # may run under a grammar constraint (every arm, for now)
    description: str = ""                     # the registry's one line (ListMethods, GET /v1/models)
    drafts: str = "none"                      # what its drafts cost the batch: "none", "lookup" or "model"


ALWAYS_ALLOWED = "ar"


def arm_specs(registered: Mapping[str, tuple[str, Iterable[str], Iterable[str], str]]) -> dict[str, ArmSpec]:
    """The rules' table from `name -> (description, requires, placement, drafts)`, the shape of
    `workers.worker.registered_methods()`: an arm's requirements are its worker resources plus where the router
    must send it (the registry's `placement`, e.g. PEARL's "second_device"). Pure and torch-free: the router gets
    this table as data (deploy/app.py reads the registry when it builds).

    >>> spec = arm_specs({"pearl": ("parallel drafting", ("drafter",), ("second_device",), "model")})["pearl"]
    >>> sorted(spec.requires), spec.drafts
    (['drafter', 'second_device'], 'model')
    """
    return {name: ArmSpec(frozenset(requires) | frozenset(placement), description=description, drafts=drafts)
            for name, (description, requires, placement, drafts) in registered.items()}


@functools.cache
def specs_from_registry() -> dict[str, ArmSpec]:
    """The arm table read from the workers' registry (imports torch: the app builder and offline tools only)."""
    from metaspec.workers.registry import arms

    return arm_specs({name: (arm.description, arm.requires, arm.placement, arm.drafts) for name, arm in arms().items()})


class _RegistryArms(Mapping[str, ArmSpec]):
    """`specs_from_registry()`, read on first use: the default table of the selector and the rules."""

    def __getitem__(self, name: str) -> ArmSpec:
        return specs_from_registry()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(specs_from_registry())

    def __len__(self) -> int:
        return len(specs_from_registry())


DEFAULT_ARMS: Mapping[str, ArmSpec] = _RegistryArms()   # no hand-kept copy: the registry is the one source


@dataclass(frozen=True)
class RequestFacts:
    """What the rules know of the request: whether a grammar constrains it, whether it samples."""

    has_constraint: bool = False
    sampled: bool = False


Rule = Callable[[str, ArmSpec | None, PoolInfo, RequestFacts], "str | None"]
PLACEMENTS = frozenset({"second_device", "alone_when_sampled"})   # placement needs (not worker resources)


def _known(method: str, arm: ArmSpec | None, pool: PoolInfo, facts: RequestFacts) -> str | None:
    return None if arm is not None else f"{method} is not a known arm"


def _installed(method: str, arm: ArmSpec | None, pool: PoolInfo, facts: RequestFacts) -> str | None:
    return None if method in pool.methods else f"{method} is not installed on pool {pool.name}"


def _resources(method: str, arm: ArmSpec | None, pool: PoolInfo, facts: RequestFacts) -> str | None:
    have = pool.hardware.get("resources")
    if have is None:                          # the profile does not list them: trust `methods`
        return None
    missing = sorted(r for r in arm.requires - PLACEMENTS if r not in str(have).split(","))
    return f"{method} needs {', '.join(missing)}, which pool {pool.name} lacks" if missing else None


def _tokenizer(method: str, arm: ArmSpec | None, pool: PoolInfo, facts: RequestFacts) -> str | None:
    if "drafter" not in arm.requires:
        return None
    target, drafter = pool.hardware.get("tokenizer"), pool.hardware.get("drafter_tokenizer")
    if target is None or drafter is None or target == drafter:
        return None
    return f"{method}'s drafter on pool {pool.name} does not share the target's tokenizer"


def _constraint(method: str, arm: ArmSpec | None, pool: PoolInfo, facts: RequestFacts) -> str | None:
    return None if not facts.has_constraint or arm.constraint_capable else f"{method} cannot run under a constraint"


def _second_device(method: str, arm: ArmSpec | None, pool: PoolInfo, facts: RequestFacts) -> str | None:
    if "second_device" not in arm.requires:
        return None
    idle = float(pool.hardware.get("idle_devices", float(pool.hardware.get("devices", 1)) - 1))
    return None if idle >= 1 else f"{method} needs an idle second device; pool {pool.name} has {idle + 1:g}"


def _alone_when_sampled(method: str, arm: ArmSpec | None, pool: PoolInfo, facts: RequestFacts) -> str | None:
    """A sampled request's drafts from a distribution (sps's drafter, early_exit's shallow layers) are never cut by
    the draft budget (a batch-dependent cut would change its sample), and every request batched with it waits for
    each drafted token each step: measured through the service, each such batchmate added 22-32 ms per token
    (early_exit) to requests decoding at ~12 ms per token (docs/benchmarks.md, "what batchmates cost"). The
    request's own tokens/s, which the model predicts, does not show that. So such an arm serves a sampled
    request only on a pool with nothing else running, unless the pool's budget caps sampled drafts too
    (`cap_sampled_drafts`); a client naming the arm still gets it."""
    if not facts.sampled or "alone_when_sampled" not in arm.requires or pool.hardware.get("caps_sampled_drafts"):
        return None
    running = float(pool.batch.get("load_running", 0.0)) if pool.batch else 0.0
    if running < 1:
        return None
    return (f"{method}'s sampled drafts are never cut, and every one of pool {pool.name}'s {running:g} running "
            "requests would wait for them")


RULES: tuple[Rule, ...] = (_known, _installed, _resources, _tokenizer, _constraint, _second_device,
                           _alone_when_sampled)


def allowed(method: str, pool: PoolInfo, has_constraint: bool, arms: Mapping[str, ArmSpec] = DEFAULT_ARMS,
            sampled: bool = False) -> tuple[bool, str]:
    """(True, "ok") when `method` may serve this request on `pool`, else (False, the first rule's reason)."""
    if method == ALWAYS_ALLOWED:
        return True, f"{ALWAYS_ALLOWED} is always allowed"
    arm, facts = arms.get(method), RequestFacts(has_constraint, sampled)
    for rule in RULES:
        if (reason := rule(method, arm, pool, facts)) is not None:
            return False, reason
    return True, "ok"


def candidates(pools: list[PoolInfo], has_constraint: bool, arms: Mapping[str, ArmSpec] = DEFAULT_ARMS,
               sampled: bool = False) -> tuple[list[tuple[PoolInfo, str]], dict[str, str]]:
    """Every allowed (pool, method) pair (AR on every pool), and the refusal reason per "pool/method"."""
    ok, refused = [], {}
    for pool in pools:
        for method in dict.fromkeys((ALWAYS_ALLOWED, *pool.methods)):
            good, reason = allowed(method, pool, has_constraint, arms, sampled)
            if good:
                ok.append((pool, method))
            else:
                refused[f"{pool.name}/{method}"] = reason
    return ok, refused
