"""The OpenAI HTTP convention, as pure functions: a request body -> `HttpCall`, a `Reply` -> a response body.

Nothing here touches Ray, Starlette or a model; `openai_http.py` is the transport around it. Fields follow the
OpenAI API (`/v1/completions`, `/v1/chat/completions`) plus vLLM's extras (`top_k`, `ignore_eos`,
`structured_outputs: {json | regex | grammar}`) and metaspec's own object:

    {"model": "metaspec", "prompt": "def add(a, b):", "max_tokens": 32,
     "metaspec": {"method": "pld", "timeout_s": 5.0}}

Every response carries `metaspec` (method, pool, the selector's reason...) and `metrics.speculative_decoding`
(vLLM's counter names, per request). A field that is set but not supported is refused with 400, never ignored.

>>> http = parse_completion({"model": "metaspec", "prompt": "hi", "max_tokens": 4}, "metaspec")
>>> call = to_call(http, default_max_tokens=16)      # protocol.convert's validation, as for gRPC
>>> (call.request.prompt, call.request.params.max_tokens, http.stream)
('hi', 4, False)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from metaspec.protocol.types import Constraint, GenerateCall, Reply
from metaspec.workers.request import RequestError

# gRPC status name (what the router maps every failure to) -> (HTTP status, OpenAI error type)
HTTP_STATUS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "CANCELLED": (499, "cancelled"),
}
# Fields with a value that means "not asked for": accepted at that value, refused otherwise.
_NEUTRAL: dict[str, tuple[Any, ...]] = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False, 0),
                                         "top_logprobs": (0,), "presence_penalty": (0, 0.0),
                                         "frequency_penalty": (0, 0.0), "logit_bias": ({},), "suffix": ("",),
                                         "parallel_tool_calls": (False,), "tools": ([],), "functions": ([],),
                                         "tool_choice": ("none",)}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "user",
           "response_format", "top_k", "ignore_eos", "structured_outputs", "metaspec", *_NEUTRAL}
COMPLETION_FIELDS = frozenset(_COMMON | {"prompt"})
CHAT_FIELDS = frozenset(_COMMON | {"messages", "max_completion_tokens"})
METASPEC_FIELDS = ("method", "timeout_s")


class ApiError(Exception):
    """An HTTP error answered as an OpenAI error object (`code` is the gRPC status name it stands for)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, (500, ""))[0]

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.param)


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """{"error": {message, type, param, code}} — the OpenAI error object."""
    kind = HTTP_STATUS.get(code, (500, "internal_error"))[1]
    return {"error": {"message": message, "type": kind, "param": param, "code": code.lower()}}


@dataclass(frozen=True)
class HttpCall:
    """One parsed completion or chat request: the gRPC request message it stands for, and the HTTP-only parts.

    The message goes through `protocol.convert.call_from_proto` like any gRPC request (`to_call`), so both
    transports share one validation (limits, sampling values, constraint sizes) and one conversion.
    """

    message: Any                             # metaspec.v1.GenerateRequest (for chat: the prompt set by `to_call`)
    model: str                               # the model name the client asked for (echoed back)
    stream: bool = False
    include_usage: bool = False              # stream_options.include_usage: a last chunk with usage
    timeout_s: float | None = None           # metaspec.timeout_s: end-to-end deadline (504 past it)
    messages: tuple[dict[str, str], ...] = ()  # chat: {role, content}; rendered by the router's chat template


def to_call(http: HttpCall, default_max_tokens: int, prompt: str | None = None) -> GenerateCall:
    """The router's GenerateCall (raises RequestError like a gRPC request would); `prompt`: the rendered chat."""
    from metaspec.protocol import convert

    msg = http.message
    if prompt is not None:
        msg = type(msg)()
        msg.CopyFrom(http.message)
        msg.text = prompt
    return convert.call_from_proto(msg, default_max_tokens)


def parse_completion(body: Any, served_model: str) -> HttpCall:
    """POST /v1/completions' body -> HttpCall; raises ApiError (400, 404) with the offending field."""
    body = _object(body, COMPLETION_FIELDS)
    prompt, prompt_ids = _prompt(body.get("prompt"))
    return _call(body, served_model, _max_tokens(body, ("max_tokens",)), prompt, prompt_ids)


def parse_chat(body: Any, served_model: str) -> HttpCall:
    """POST /v1/chat/completions' body -> HttpCall with `messages` set (the prompt is rendered later)."""
    body = _object(body, CHAT_FIELDS)
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    return _call(body, served_model, max_tokens, "", None, _messages(body.get("messages")))


def _object(body: Any, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError("INVALID_ARGUMENT", "the request body must be a JSON object")
    if unknown := sorted(set(body) - allowed):
        raise ApiError("INVALID_ARGUMENT", f"unsupported field(s): {', '.join(unknown)}", unknown[0])
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] is not None and body[name] not in neutral:
            raise ApiError("INVALID_ARGUMENT", f"{name}={body[name]!r} is not supported (only {neutral[0]!r})", name)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ApiError("INVALID_ARGUMENT", "model is required (GET /v1/models lists it)", "model")
    return body


def _call(body: dict[str, Any], served_model: str, max_tokens: int | None, prompt: str,
          prompt_ids: tuple[int, ...] | None,
          messages: tuple[dict[str, str], ...] = ()) -> HttpCall:
    if body["model"] != served_model:
        raise ApiError("NOT_FOUND", f"the model {body['model']!r} does not exist; this service serves "
                                    f"{served_model!r}", "model")
    extra = _metaspec(body.get("metaspec"))
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ApiError("INVALID_ARGUMENT", "stream_options must be {include_usage: bool} and needs stream: true",
                       "stream_options")
    from metaspec.protocol import convert

    try:
        message = convert.make_request(
            list(prompt_ids) if prompt_ids is not None else prompt, temperature=_number(body, "temperature", 1.0),
            top_k=_typed(body, "top_k", int, 0), top_p=_number(body, "top_p", 1.0), max_tokens=max_tokens,
            stop=_stop(body.get("stop")), seed=_typed(body, "seed", int, None), method=extra.get("method") or "",
            constraint=constraint_of(body), ignore_eos=_typed(body, "ignore_eos", bool, False))
    except RequestError as exc:
        raise ApiError("INVALID_ARGUMENT", str(exc)) from None
    except (ValueError, TypeError) as exc:      # out of the wire type's range (seed < 0, top_k >= 2**31...)
        raise ApiError("INVALID_ARGUMENT", f"a value is out of range: {exc}") from None
    timeout = extra.get("timeout_s")
    return HttpCall(message, body["model"], stream, bool((options or {}).get("include_usage")),
                    float(timeout) if timeout is not None else None, messages)


def _metaspec(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or (unknown := sorted(set(value) - set(METASPEC_FIELDS))):
        got = f"unknown {unknown}" if isinstance(value, dict) else repr(value)
        raise ApiError("INVALID_ARGUMENT", f"metaspec must be an object with fields {list(METASPEC_FIELDS)} "
                                           f"(got {got})", "metaspec")
    if value.get("method") is not None and not isinstance(value["method"], str):
        raise ApiError("INVALID_ARGUMENT", "metaspec.method must be a method name (GET /v1/models lists them)",
                       "metaspec.method")
    t = value.get("timeout_s")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or math.isinf(t)):
        raise ApiError("INVALID_ARGUMENT", f"metaspec.timeout_s must be a number > 0, got {t!r}", "metaspec.timeout_s")
    return value


def _typed(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError("INVALID_ARGUMENT", f"{name} must be {kind.__name__}, got {value!r}", name)
    return value


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError("INVALID_ARGUMENT", f"{name} must be a number, got {value!r}", name)
    return float(value)


def _max_tokens(body: dict[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        if body.get(name) is not None:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ApiError("INVALID_ARGUMENT", f"{name} must be an integer > 0, got {value!r}", name)
            return value
    return None


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise ApiError("INVALID_ARGUMENT", "stop must be a string or a list of at most 4 strings", "stop")
    return tuple(stops)


def _prompt(value: Any) -> tuple[str, tuple[int, ...] | None]:
    """A string, a list of one string, or a list of token ids (one prompt: n=1 and no batching)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return value, None
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return "", tuple(value)
    raise ApiError("INVALID_ARGUMENT", "prompt must be one string or one list of token ids (no batches)", "prompt")


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ApiError("INVALID_ARGUMENT", "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant") or \
                set(m) - {"role", "content", "name"}:
            raise ApiError("INVALID_ARGUMENT", f"messages[{i}]: only system, user and assistant messages with "
                                               "text content are supported", f"messages[{i}]")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": _text(m.get("content"), i)})
    return tuple(out)


def _text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError("INVALID_ARGUMENT", f"messages[{i}].content must be text (a string or text parts)",
                   f"messages[{i}].content")


def constraint_of(body: Mapping[str, Any]) -> Constraint | None:
    """response_format (json_schema / json_object) or vLLM's structured_outputs -> the llguidance constraint."""
    fmt, extra = body.get("response_format"), body.get("structured_outputs")
    if fmt is not None and extra is not None and fmt.get("type") != "text":
        raise ApiError("INVALID_ARGUMENT", "set response_format or structured_outputs, not both", "structured_outputs")
    if extra is not None:
        return _structured(extra)
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_schema", '{"type": "object"}')
    if kind == "json_schema" and isinstance(fmt.get("json_schema"), dict) and "schema" in fmt["json_schema"]:
        return Constraint("json_schema", _schema_text(fmt["json_schema"]["schema"]))
    raise ApiError("INVALID_ARGUMENT", "response_format must be {type: text | json_object | json_schema} (json_schema "
                                       "with {name, schema})", "response_format")


def _structured(extra: Any) -> Constraint:
    kinds = {"json": "json_schema", "regex": "regex", "grammar": "grammar"}
    if not isinstance(extra, dict) or len(extra) != 1 or next(iter(extra)) not in kinds:
        raise ApiError("INVALID_ARGUMENT", "structured_outputs must hold exactly one of json, regex, grammar "
                                           f"(got {sorted(extra) if isinstance(extra, dict) else extra!r})",
                       "structured_outputs")
    (name, source), = extra.items()
    text = _schema_text(source) if name == "json" else source
    if not isinstance(text, str):
        raise ApiError("INVALID_ARGUMENT", f"structured_outputs.{name} must be a string", f"structured_outputs.{name}")
    return Constraint(kinds[name], text)


def _schema_text(schema: Any) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    raise ApiError("INVALID_ARGUMENT", "a JSON schema must be an object (or its JSON text)", "response_format")


# ---- responses ----------------------------------------------------------------------------------------------

def speculative_decoding(acceptance: Mapping[str, float]) -> dict[str, float]:
    """The reply's acceptance counters under vLLM's spec-decode names (mean acceptance length counts the bonus)."""
    return {"mean_acceptance_length": float(acceptance.get("acceptance_length", 1.0)),
            "draft_acceptance_rate": float(acceptance.get("acceptance_rate", 0.0)),
            "num_drafts": int(acceptance.get("drafts", 0)), "num_draft_tokens": int(acceptance.get("drafted", 0)),
            "num_accepted_tokens": int(acceptance.get("accepted", 0)), "num_steps": int(acceptance.get("steps", 0))}


def metaspec_fields(reply: Reply) -> dict[str, Any]:
    """What metaspec adds to every response: the choice, why, and the request's timings and speculation."""
    return {"metaspec": {"method": reply.method, "pool": reply.pool, "reason": reply.reason,
                         "selector_version": reply.selector_version, "scores": dict(reply.scores),
                         "fallback": reply.fallback, "request_id": reply.request_id, "timings": dict(reply.timings)},
            "metrics": {"speculative_decoding": speculative_decoding(reply.acceptance)}}


def usage(reply: Reply) -> dict[str, int]:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def response_body(http: HttpCall, reply: Reply, chat: bool, created: int | None = None) -> dict[str, Any]:
    """The unary answer (the whole `reply`) as a text_completion or chat.completion object."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": reply.finish_reason, "logprobs": None}
    choice |= {"message": {"role": "assistant", "content": reply.text}} if chat else {"text": reply.text}
    return {"id": _id(reply.request_id, chat), "object": "chat.completion" if chat else "text_completion",
            "created": created or int(time.time()), "model": http.model, "choices": [choice],
            "usage": usage(reply)} | metaspec_fields(reply)


def chunk_body(http: HttpCall, rid: str, created: int, chat: bool, text: str = "", finish_reason: str | None = None,
               first: bool = False) -> dict[str, Any]:
    """One streamed chunk: a text delta (the first chat chunk also names the role) or the finishing one."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if chat:
        choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
    else:
        choice["text"] = text
    return {"id": _id(rid, chat), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": http.model, "choices": [choice]}


def final_chunks(http: HttpCall, reply: Reply, created: int, chat: bool) -> list[dict[str, Any]]:
    """The chunk with finish_reason (and metaspec's fields), then the usage chunk if the client asked for it."""
    last = chunk_body(http, reply.request_id, created, chat, finish_reason=reply.finish_reason) | metaspec_fields(reply)
    if not http.include_usage:
        return [last]
    tail = {k: v for k, v in chunk_body(http, reply.request_id, created, chat).items() if k != "choices"}
    return [last | {"usage": None}, tail | {"choices": [], "usage": usage(reply)}]


def sse(data: Mapping[str, Any] | str) -> bytes:
    """One server-sent event: `data: {...}` (or `data: [DONE]`) and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def _id(rid: str, chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
