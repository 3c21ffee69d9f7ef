"""The OpenAI-compatible HTTP API, answered by the Router deployment itself (Serve's HTTP ingress beside gRPC).

    POST /v1/completions   POST /v1/chat/completions   GET /v1/models   GET /health

The request takes the gRPC path: the same key check, `Router.choose` (limits, selector, override), `Router.run` /
`Router.stream` (worker, outcome log, metrics); only the wire format differs (`openai_protocol.py`). A failure
before the first token keeps its HTTP status even for `stream: true` (the first item is awaited before the 200
goes out); one after it ends the event stream with an error event, then `data: [DONE]`.

>>> client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
>>> client.completions.create(model="metaspec", prompt="def add(a, b):", max_tokens=32).metaspec["method"]
'sps'
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from metaspec.protocol.types import Reply

from .openai_protocol import (ApiError, HttpCall, chunk_body, error_body, final_chunks, parse_chat, parse_completion,
                              response_body, sse, to_call)
from .status import status_of

if TYPE_CHECKING:
    from .router import Receipt, Router

logger = logging.getLogger("ray.serve")
BEARER_HINT = "send it as `Authorization: Bearer <key>`"
# The chat template of a tokenizer that brings none (the shipped one): plain role-tagged turns, which a model
# trained on code, docs and man pages continues as text. Tokenizers with their own template use theirs.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


async def handle(router: "Router", request: HttpRequest) -> Response:
    """One HTTP request -> its response; every failure is an OpenAI error object with its HTTP status."""
    path = _path(request)
    try:
        if path == "/health" and request.method == "GET":
            return await _health(router, request)
        if path not in ("/v1/completions", "/v1/chat/completions", "/v1/models"):
            raise ApiError("NOT_FOUND", f"no route {request.method} {path}; this service answers POST "
                                        "/v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health")
        want = "GET" if path == "/v1/models" else "POST"
        if request.method != want:
            return _error(405, "INVALID_ARGUMENT", f"{path} takes {want}, not {request.method}")
        peer = request.client.host if request.client else "?"
        key = router.check_key(_bearer(request), peer, BEARER_HINT)
        if path == "/v1/models":
            return JSONResponse(await _models(router))
        return await _generate(router, request, key, chat=path.endswith("chat/completions"))
    except ApiError as exc:
        router.metrics.rejected(exc.code)
        return JSONResponse(exc.body(), status_code=exc.http_status)
    except Exception as exc:
        return _status_response(router, exc)


async def _generate(router: "Router", request: HttpRequest, key: str | None, chat: bool) -> Response:
    from .router import Receipt

    t0 = time.perf_counter()
    spec = router.spec
    http = (parse_chat if chat else parse_completion)(await _json(request), spec.served_model_name)
    prompt = await router.chat_template.render(http.messages) if chat else None
    call = to_call(http, spec.default_max_tokens, prompt)
    router.access.admit(key)                 # this key's quota (429 when used up)
    call, choice, rid = await router.choose(call)
    receipt = Receipt(key=key)
    if not http.stream:
        reply = await router.run(call, choice, rid, t0, http.timeout_s, receipt)
        return JSONResponse(_receipted(response_body(http, reply, chat), receipt))
    replies = router.stream(call, choice, rid, t0, http.timeout_s, receipt)
    try:
        first = await anext(replies)         # a failure before the first token keeps its HTTP status
    except BaseException:
        await replies.aclose()
        raise
    return StreamingResponse(_events(router, http, first, replies, chat, receipt), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _events(router: "Router", http: HttpCall, first: Reply, replies: AsyncIterator[Reply],
                  chat: bool, receipt: "Receipt") -> AsyncIterator[bytes]:
    """Server-sent events: text deltas, the finishing chunk (with metaspec's fields), usage if asked, [DONE]."""
    created, rid = int(time.time()), first.request_id
    async with aclosing(replies):
        try:
            if chat:
                yield sse(chunk_body(http, rid, created, chat, first=True))
            reply = first
            while not reply.finish_reason:
                if reply.text:
                    yield sse(chunk_body(http, rid, created, chat, reply.text))
                reply = await anext(replies)
            for body in final_chunks(http, reply, created, chat):
                yield sse(_receipted(body, receipt))
        except Exception as exc:                 # after the 200: the error is the stream's last event
            status = router.refused(status_of(exc))
            yield sse(error_body(status.code.name, status.message))
    yield sse("[DONE]")


async def _models(router: "Router") -> dict[str, Any]:
    info = await router.service_info()
    context = max((p.max_context for p in info.pools), default=0)
    meta = {"methods": {m.name: {"description": m.description, "requires": list(m.requires)} for m in info.methods},
            "pools": {p.name: {"methods": list(p.methods), "hardware": p.hardware, "num_replicas": p.num_replicas}
                      for p in info.pools},
            "selector_version": info.selector_version, "max_tokens_limit": info.max_tokens_limit}
    return {"object": "list", "data": [{"id": router.spec.served_model_name, "object": "model", "created": 0,
                                        "owned_by": "metaspec", "max_model_len": context, "metaspec": meta}]}


async def _health(router: "Router", request: HttpRequest) -> Response:
    """With API keys configured and none valid given: a bare liveness answer (the router is up), nothing about
    pools. Otherwise every pool's health and the outcome log's counters."""
    try:
        router.check_key(_bearer(request), request.client.host if request.client else "?", BEARER_HINT)
    except Exception:
        return JSONResponse({"status": "alive"})
    health = await router.health()
    body = {"status": "ok" if health.serving else "unavailable",
            "pools": [{"name": p.name, "ok": p.ok, "detail": p.detail} for p in health.pools],
            "outcome_log": router.log_stats()}
    return JSONResponse(body, status_code=200 if health.serving else 503)


def _receipted(body: dict[str, Any], receipt: "Receipt") -> dict[str, Any]:
    """`metaspec.outcome_recorded` on the body that carries metaspec's fields (false: the log could not take it)."""
    if "metaspec" in body and receipt.outcome_recorded is not None:
        body["metaspec"]["outcome_recorded"] = receipt.outcome_recorded
    return body


class ChatTemplate:
    """The first pool's tokenizer's chat template (DEFAULT_CHAT_TEMPLATE when it has none), loaded on first use.

    >>> await ChatTemplate("metaspec/checkpoints/target").render([{"role": "user", "content": "hi"}])
    'User: hi\\nAssistant:'
    """

    def __init__(self, tokenizer_dir: str) -> None:
        self.tokenizer_dir = tokenizer_dir
        self._tokenizer: Any = None

    async def render(self, messages: Sequence[dict[str, str]]) -> str:
        if self._tokenizer is None:
            self._tokenizer = await asyncio.to_thread(_load_tokenizer, self.tokenizer_dir)
        tok = self._tokenizer
        try:
            return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                           chat_template=None if tok.chat_template else DEFAULT_CHAT_TEMPLATE)
        except Exception as exc:                 # the model's own template refused the conversation
            from jinja2 import TemplateError

            why = f": {exc}" if isinstance(exc, TemplateError) else f" ({type(exc).__name__})"   # the template's own
            raise ApiError("INVALID_ARGUMENT", f"the chat template refused these messages{why}"[:500],     # words only
                           "messages") from None


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# ---- small pieces -------------------------------------------------------------------------------------------

def _path(request: HttpRequest) -> str:
    path, root = request.scope.get("path", "/"), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return "/" + path.strip("/")


def _bearer(request: HttpRequest) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, key = value.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


async def _json(request: HttpRequest) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise ApiError("INVALID_ARGUMENT", f"the request body is not JSON: {exc}") from None


def _status_response(router: "Router", exc: BaseException) -> Response:
    status = router.refused(status_of(exc))
    if status.code.name == "INTERNAL":
        logger.exception("HTTP request failed", exc_info=exc)
    body = error_body(status.code.name, status.message)
    return JSONResponse(body, status_code=ApiError(status.code.name, "").http_status)


def _error(http_status: int, code: str, message: str) -> Response:
    return JSONResponse(error_body(code, message), status_code=http_status)
