"""The registry of arms: each file under `workers/proposers/` registers one factory by name."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from .kv import SlotPool
from .model import Model, Session
from .types import Proposer, RequestError, SamplingParams


@dataclass(frozen=True)
class ArmContext:
    """What a factory may use to build one request's proposer. Heavy objects are shared, never mutated."""

    target: Model                                  # the target (weights shared by all requests)
    params: SamplingParams                         # the request's sampling parameters
    seed: int = 0                                  # the request's seed (drafters sample on its DRAFT stream)
    drafter: Model | None = None                   # a small draft model with the target's tokenizer
    target_session: Session | None = None          # the request's target KV cache (self-speculation)
    drafter_pool: SlotPool | None = None           # the replica's drafter KV pool (None: a private session)
    resources: dict[str, Any] = field(default_factory=dict)  # further shared objects by name (n-gram store...)


@dataclass(frozen=True)
class Arm:
    name: str                                      # registered method name
    factory: Callable[[ArmContext], Proposer]      # builds a per-request proposer
    requires: frozenset[str]                       # resources the arm cannot run without ("drafter", ...)
    description: str                               # one line for ListMethods / --help
    placement: frozenset[str] = frozenset()        # what the router must find on a pool to send it there, which
                                                   # no worker resource says ("second_device": an idle one)
    drafts: str = "none"                           # what its drafts cost the batch (DRAFT_KINDS)


DRAFT_KINDS = ("none", "lookup", "model")          # no drafts (AR); drafts looked up in a table or the context;
                                                   # drafts from a model forward (a drafter, the target's layers)


_ARMS: dict[str, Arm] = {}


def register(name: str, *, drafts: str, requires: tuple[str, ...] = (), description: str = "",
             placement: tuple[str, ...] = ()):
    """Decorator: `@register("pld", drafts="lookup")` over a factory `(ArmContext) -> Proposer`. The registry is
    the one table of arms: the selector's rules read `requires` and `placement` from it, and the router counts
    the running requests by `drafts` for the selector's load features (selector/rules.specs_from_registry)."""
    if drafts not in DRAFT_KINDS:
        raise ValueError(f"arm {name!r}: drafts={drafts!r}, not one of {DRAFT_KINDS}")

    def wrap(factory: Callable[[ArmContext], Proposer]):
        if name in _ARMS:
            raise ValueError(f"arm {name!r} registered twice")
        _ARMS[name] = Arm(name, factory, frozenset(requires), description or (factory.__doc__ or "").strip(),
                          frozenset(placement), drafts)
        return factory

    return wrap


def _load_all() -> None:
    from . import proposers

    for info in pkgutil.iter_modules(proposers.__path__):
        importlib.import_module(f"{proposers.__name__}.{info.name}")


def arms() -> dict[str, Arm]:
    """Every registered arm by name."""
    _load_all()
    return dict(_ARMS)


def build(method: str, ctx: ArmContext) -> Proposer:
    """Build one request's proposer for `method`.

    >>> proposer = build("pld", ArmContext(target=model, params=SamplingParams()))
    >>> proposer.propose([5, 6, 7, 5, 6], k=2).tokens
    [7, 5]
    """
    table = arms()
    if method not in table:
        raise RequestError(f"unknown method {method!r}; known: {', '.join(sorted(table))}")
    arm = table[method]
    have = {name for name in arm.requires if getattr(ctx, name, None) is not None or name in ctx.resources}
    if missing := arm.requires - have:
        raise RequestError(f"method {method!r} needs {', '.join(sorted(missing))}, which this worker lacks")
    return arm.factory(ctx)
