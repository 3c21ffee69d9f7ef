"""The only module that touches protobuf types: generated messages <-> the frozen dataclasses of `types.py`.

Request validation that needs nothing but the message happens here, before any tokenisation or decode work:
`check_limits` holds every field to `RequestLimits` (sizes counted on the message itself, nesting depth of
constraint sources found by a linear scan, never by a recursive parser) and raises RequestError
(INVALID_ARGUMENT) naming the field and the limit. Limits that depend on the deployment (max_tokens ceiling,
vocabulary, context window) are checked by the router (`check_token_ids` with the pools' vocabulary) and the
worker.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from metaspec.workers.request import Request, RequestError, SamplingParams

from . import metaspec_pb2 as pb
from .types import (Constraint, GenerateCall, Health, MethodInfo, PoolDescription, PoolHealth, Reply,
                    ServiceInfo, Undecodable)

SERVICE = "metaspec.v1.MetaSpec"

# ---- requests -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RequestLimits:
    """What one GenerateRequest may hold; anything outside is INVALID_ARGUMENT before work is spent on it.

    gRPC itself caps a whole message at 4 MiB (the server's default max_receive_message_length).
    """

    max_prompt_chars: int = 1_000_000     # `text`: characters, counted before tokenising (the router's own
                                          # max_prompt_chars may be lower)
    max_prompt_ids: int = 262_144         # `token_ids.ids`: ids; each must be >= 0 (and < vocab: check_token_ids)
    min_temperature: float = 1e-3         # `temperature`: 0 = greedy, else finite in [min, max]; a vanishing
                                          # value is refused rather than rounded to greedy (1e-300 would turn
                                          # logits / T into inf and the softmax into NaN)
    max_temperature: float = 100.0        # above this the distribution is uniform to float precision anyway
    max_top_k: int = 1 << 20              # `top_k`: 0 = no cut; a cut above the vocabulary is no cut
    max_stop_strings: int = 16            # `stop`: how many stop strings
    max_stop_chars: int = 256             # `stop`: characters in one stop string
    max_method_chars: int = 64            # `method`: an arm name
    max_request_id_chars: int = 256       # `request_id`: printable characters only (it is logged)
    max_constraint_chars: int = 256_000   # `constraint.*`: characters of a schema / regex / grammar source
    max_constraint_depth: int = 128       # `constraint.*`: bracket nesting of a JSON schema ({ [), a regex or a
                                          # grammar (( [ {), found by a linear scan (no recursive parse)


DEFAULT_LIMITS = RequestLimits()


def call_from_proto(msg: pb.GenerateRequest, default_max_tokens: int, limits: RequestLimits = DEFAULT_LIMITS,
                    vocab_size: int | None = None) -> GenerateCall:
    """GenerateRequest -> GenerateCall; raises RequestError on a value no deployment could serve.

    `vocab_size` (the pools' vocabulary, when the caller knows it) also bounds token ids from above.
    """
    if isinstance(msg, Undecodable):
        raise RequestError(f"the request is not a valid {msg.type_name}: {msg.error}")
    which = msg.WhichOneof("prompt")
    if which is None:
        raise RequestError("prompt is empty: set `text` or `token_ids`")
    check_limits(msg, limits, vocab_size)
    prompt = msg.text if which == "text" else None
    prompt_ids = tuple(msg.token_ids.ids) if which == "token_ids" else None
    if not prompt and not prompt_ids:
        raise RequestError("prompt is empty")
    params = SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else default_max_tokens,
        stop=tuple(msg.stop),
        seed=msg.seed if msg.HasField("seed") else None,
        ignore_eos=msg.ignore_eos,
    )
    request = Request(prompt=prompt, prompt_ids=prompt_ids, params=params, method=msg.method or None,
                      constraint=constraint_from_proto(msg.constraint))
    return GenerateCall(request, msg.request_id)


def check_limits(msg: pb.GenerateRequest, limits: RequestLimits = DEFAULT_LIMITS,
                 vocab_size: int | None = None) -> None:
    """Every field of `msg` against `limits`; raises RequestError naming the field and the limit.

    >>> check_limits(make_request("hi", stop=["x"] * 17))
    Traceback (most recent call last):
    ...
    metaspec.workers.errors.RequestError: stop: at most 16 stop strings, got 17
    """
    lim = limits
    _at_most("text", "characters", len(msg.text), lim.max_prompt_chars)
    _at_most("token_ids", "ids", len(msg.token_ids.ids), lim.max_prompt_ids)
    check_token_ids(msg.token_ids.ids, vocab_size)
    check_temperature(msg.temperature, lim)
    if not 0 <= msg.top_k <= lim.max_top_k:
        raise RequestError(f"top_k must be an integer >= 0 and at most {lim.max_top_k}, got {msg.top_k}")
    if msg.HasField("top_p") and not math.isfinite(msg.top_p):
        raise RequestError(f"top_p must be in (0, 1], got {msg.top_p}")
    _at_most("stop", "stop strings", len(msg.stop), lim.max_stop_strings)
    for i, s in enumerate(msg.stop):
        _at_most(f"stop[{i}]", "characters", len(s), lim.max_stop_chars)
    _at_most("method", "characters", len(msg.method), lim.max_method_chars)
    _at_most("request_id", "characters", len(msg.request_id), lim.max_request_id_chars)
    if not msg.request_id.isprintable():
        raise RequestError("request_id must hold printable characters only (no control characters or newlines)")
    kind = msg.constraint.WhichOneof("kind")
    if kind is not None:
        source = getattr(msg.constraint, kind)
        _at_most(f"constraint.{kind}", "characters", len(source), lim.max_constraint_chars)
        depth = nesting_depth(source, kind, stop_at=lim.max_constraint_depth + 1)
        if depth > lim.max_constraint_depth:
            raise RequestError(f"constraint.{kind}: nesting deeper than {lim.max_constraint_depth} levels")


def check_temperature(temperature: float, limits: RequestLimits = DEFAULT_LIMITS) -> None:
    """0 (greedy) or a finite value in [min_temperature, max_temperature]; raises RequestError otherwise."""
    t = temperature
    if t == 0 or (math.isfinite(t) and limits.min_temperature <= t <= limits.max_temperature):
        return
    raise RequestError(f"temperature must be a number >= 0: 0 (greedy) or finite in "
                       f"[{limits.min_temperature:g}, {limits.max_temperature:g}], got {t!r}")


def check_token_ids(ids: Sequence[int] | None, vocab_size: int | None = None) -> None:
    """Every id in [0, vocab_size) (only >= 0 when the vocabulary is unknown); raises RequestError.

    The router knows the vocabulary from its pools' WorkerInfo and calls this before choosing an arm.
    """
    if not ids:
        return
    low, high = min(ids), max(ids)
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        where = list(ids).index(bad)
        bound = "vocab_size" if vocab_size is None else vocab_size
        raise RequestError(f"prompt_ids must be token ids in [0, {bound}), got {bad} at position {where} "
                           f"(field token_ids)")


def nesting_depth(source: str, kind: str = "json_schema", stop_at: int | None = None) -> int:
    """Deepest bracket nesting of a constraint source, in one linear scan (no recursive parse).

    json_schema: { [ outside JSON strings. regex: ( [ { with a character class counting once. grammar: ( [ {
    outside "literals". Backslash escapes never count. `stop_at` returns as soon as that depth is reached.

    >>> nesting_depth('{"a": [{"b": "[[["}]}'), nesting_depth("(a(b)[(]))", "regex")
    (3, 2)
    """
    opens, closes = ("{[", "}]") if kind == "json_schema" else ("([{", ")]}")
    quotes, classes = ('"' if kind != "regex" else ""), kind == "regex"
    depth = deepest = 0
    in_quote = escaped = in_class = False
    for ch in source:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_quote:
            in_quote = ch != '"'
        elif in_class:
            in_class = ch != "]"
            depth -= not in_class
        elif ch in quotes:
            in_quote = True
        elif ch in opens:
            depth += 1
            deepest = max(deepest, depth)
            in_class = classes and ch == "["
            if stop_at is not None and deepest >= stop_at:
                return deepest
        elif ch in closes:
            depth = max(0, depth - 1)
    return deepest


def _at_most(field: str, unit: str, size: int, limit: int) -> None:
    if size > limit:
        raise RequestError(f"{field}: at most {limit} {unit}, got {size}")


def constraint_from_proto(msg: pb.Constraint) -> Constraint | None:
    """None when no kind is set; raises RequestError on an empty source (compiling happens in the worker)."""
    kind = msg.WhichOneof("kind")
    return None if kind is None else Constraint(kind, getattr(msg, kind), aligned=msg.aligned)


def make_request(prompt: str | Sequence[int], *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float | None = None, max_tokens: int | None = None, stop: Sequence[str] = (),
                 seed: int | None = None, method: str = "", constraint: Constraint | None = None,
                 request_id: str = "", ignore_eos: bool = False) -> pb.GenerateRequest:
    """The client's direction. No validation here: the service answers bad values with INVALID_ARGUMENT."""
    msg = pb.GenerateRequest(temperature=temperature, top_k=top_k, stop=list(stop), method=method or "",
                             request_id=request_id, ignore_eos=ignore_eos)
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        msg.token_ids.ids.extend(prompt)
    if top_p is not None:
        msg.top_p = top_p
    if max_tokens is not None:
        msg.max_tokens = max_tokens
    if seed is not None:
        msg.seed = seed
    if constraint is not None:
        setattr(msg.constraint, constraint.kind, constraint.source)
        msg.constraint.aligned = constraint.aligned
    return msg


# ---- replies ------------------------------------------------------------------------------------------------

_ACCEPTANCE = ("acceptance_length", "acceptance_rate", "steps", "drafts", "drafted", "accepted")
_TIMINGS = ("ttft_s", "wall_s", "tokens_per_s", "worker_wall_s", "prefill_s")


def reply_to_proto(reply: Reply) -> pb.GenerateReply:
    msg = pb.GenerateReply(text=reply.text, token_ids=list(reply.token_ids), finish_reason=reply.finish_reason,
                           method=reply.method, pool=reply.pool, reason=reply.reason, scores=reply.scores,
                           selector_version=reply.selector_version, fallback=reply.fallback,
                           request_id=reply.request_id, prompt_tokens=reply.prompt_tokens,
                           completion_tokens=reply.completion_tokens)
    if reply.acceptance:
        msg.acceptance.CopyFrom(pb.Acceptance(**{k: reply.acceptance[k] for k in _ACCEPTANCE if k in reply.acceptance}))
    if reply.timings:
        msg.timings.CopyFrom(pb.Timings(**{k: reply.timings[k] for k in _TIMINGS if k in reply.timings}))
    return msg


def reply_from_proto(msg: pb.GenerateReply) -> Reply:
    acceptance = {k: getattr(msg.acceptance, k) for k in _ACCEPTANCE} if msg.HasField("acceptance") else {}
    timings = {k: getattr(msg.timings, k) for k in _TIMINGS} if msg.HasField("timings") else {}
    return Reply(text=msg.text, token_ids=tuple(msg.token_ids), finish_reason=msg.finish_reason,
                 method=msg.method, pool=msg.pool, reason=msg.reason, scores=dict(msg.scores),
                 selector_version=msg.selector_version, acceptance=acceptance, timings=timings,
                 fallback=msg.fallback, request_id=msg.request_id, prompt_tokens=msg.prompt_tokens,
                 completion_tokens=msg.completion_tokens)


# ---- health and service description -------------------------------------------------------------------------

def health_request() -> pb.HealthRequest:
    return pb.HealthRequest()


def list_methods_request() -> pb.ListMethodsRequest:
    return pb.ListMethodsRequest()


def health_to_proto(health: Health) -> pb.HealthReply:
    return pb.HealthReply(serving=health.serving,
                          pools=[pb.PoolHealth(name=p.name, ok=p.ok, detail=p.detail) for p in health.pools])


def health_from_proto(msg: pb.HealthReply) -> Health:
    return Health(msg.serving, tuple(PoolHealth(p.name, p.ok, p.detail) for p in msg.pools))


def service_info_to_proto(info: ServiceInfo) -> pb.ListMethodsReply:
    return pb.ListMethodsReply(
        methods=[pb.MethodInfo(name=m.name, description=m.description, requires=list(m.requires))
                 for m in info.methods],
        pools=[pb.PoolInfo(name=p.name, methods=list(p.methods), hardware=p.hardware, target=p.target,
                           drafter=p.drafter, num_replicas=p.num_replicas, max_context=p.max_context)
               for p in info.pools],
        selector_version=info.selector_version, max_tokens_limit=info.max_tokens_limit,
        default_max_tokens=info.default_max_tokens)


def service_info_from_proto(msg: pb.ListMethodsReply) -> ServiceInfo:
    return ServiceInfo(
        methods=tuple(MethodInfo(m.name, m.description, tuple(m.requires)) for m in msg.methods),
        pools=tuple(PoolDescription(p.name, tuple(p.methods), dict(p.hardware), p.target, p.drafter,
                                    p.num_replicas, p.max_context) for p in msg.pools),
        selector_version=msg.selector_version, max_tokens_limit=msg.max_tokens_limit,
        default_max_tokens=msg.default_max_tokens)


# ---- server registration ------------------------------------------------------------------------------------

def add_MetaSpecServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 (gRPC's naming)
    """The generated `metaspec_pb2_grpc.add_MetaSpecServicer_to_server`, with lenient request parsing.

    gRPC answers a request its deserializer cannot parse (a `string` field holding invalid UTF-8, garbage
    bytes) with UNKNOWN "Unexpected DecodeError". Here such bytes reach the servicer as an `Undecodable`, which
    `call_from_proto` turns into INVALID_ARGUMENT with the parser's message. This is the function the Serve
    config names in grpc_servicer_functions.
    """
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, _lenient(pb.GenerateRequest), pb.GenerateReply.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, _lenient(pb.GenerateRequest), pb.GenerateReply.SerializeToString),
        "Health": grpc.unary_unary_rpc_method_handler(
            servicer.Health, _lenient(pb.HealthRequest), pb.HealthReply.SerializeToString),
        "ListMethods": grpc.unary_unary_rpc_method_handler(
            servicer.ListMethods, _lenient(pb.ListMethodsRequest), pb.ListMethodsReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, handlers)


def _lenient(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_type.DESCRIPTOR.full_name, str(exc).replace("Error parsing message with type "
                                                                                    f"'{message_type.DESCRIPTOR.full_name}': ", ""))
    return parse
