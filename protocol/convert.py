"""The only module that touches protobuf types: generated messages <-> the frozen dataclasses of `types.py`.

Request validation that needs nothing but the message happens here (SamplingParams raises RequestError on a
bad value); limits that depend on the deployment (max_tokens ceiling, context window) are checked by the router
and the worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from metaspec.workers.engine import Request
from metaspec.workers.types import RequestError, SamplingParams

from . import metaspec_pb2 as pb
from .types import (Constraint, GenerateCall, Health, MethodInfo, PoolDescription, PoolHealth, Reply,
                    ServiceInfo, Undecodable)

SERVICE = "metaspec.v1.MetaSpec"

# ---- requests -----------------------------------------------------------------------------------------------

def call_from_proto(msg: pb.GenerateRequest, default_max_tokens: int) -> GenerateCall:
    """GenerateRequest -> GenerateCall; raises RequestError on a value no deployment could serve."""
    if isinstance(msg, Undecodable):
        raise RequestError(f"the request is not a valid {msg.type_name}: {msg.error}")
    which = msg.WhichOneof("prompt")
    if which is None:
        raise RequestError("prompt is empty: set `text` or `token_ids`")
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
