"""What the gRPC API carries, as frozen dataclasses: the rest of the code never sees a protobuf message.

`protocol/convert.py` is the only module that maps these to and from the generated protobuf types. A call carries
the engine's `Request` (`workers/request.py`, torch-free): this layer imports no torch and no engine module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metaspec.workers.request import ConstraintSpec as Constraint   # kind, source, aligned
from metaspec.workers.request import Request


@dataclass(frozen=True)
class GenerateCall:
    """One Generate/GenerateStream request as the router sees it."""

    request: Request                          # prompt, sampling parameters, method override, constraint
    request_id: str = ""                      # client's id; "" = the router makes one


@dataclass(frozen=True)
class Reply:
    """One GenerateReply: the whole answer (unary), or one chunk / the final message of a stream."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str = ""                   # "" on every stream message but the last
    method: str = ""
    pool: str = ""
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    selector_version: str = ""
    acceptance: dict[str, float] = field(default_factory=dict)  # acceptance_length, acceptance_rate, steps...
    timings: dict[str, float] = field(default_factory=dict)     # ttft_s, wall_s, tokens_per_s, worker_wall_s...
    fallback: str = ""
    request_id: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class PoolHealth:
    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class Health:
    serving: bool
    pools: tuple[PoolHealth, ...] = ()


@dataclass(frozen=True)
class MethodInfo:
    name: str
    description: str
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class PoolDescription:
    name: str
    methods: tuple[str, ...]
    hardware: dict[str, str] = field(default_factory=dict)
    target: str = ""
    drafter: str = ""
    num_replicas: int = 1
    max_context: int = 0


@dataclass(frozen=True)
class ServiceInfo:
    """ListMethods' answer."""

    methods: tuple[MethodInfo, ...]
    pools: tuple[PoolDescription, ...]
    selector_version: str
    max_tokens_limit: int
    default_max_tokens: int


@dataclass(frozen=True)
class Undecodable:
    """Bytes that did not parse as the RPC's request message (e.g. a string field with invalid UTF-8)."""

    type_name: str            # the protobuf message type expected
    error: str                # the parser's complaint
