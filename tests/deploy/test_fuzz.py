"""Property-based fuzzing of every GenerateRequest field through a real gRPC channel into the running app.

Whatever Hypothesis builds (numbers at their extremes, ids on either side of the vocabulary, odd text, random
constraints and methods), the answer is OK or INVALID_ARGUMENT / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED, never
INTERNAL (or anything else), and the service keeps serving. The app is test_service's (direct ingress only).
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaspec.protocol import metaspec_pb2 as pb
from metaspec.protocol.client import API_KEY_HEADER

from .test_service import KEY, client, redis_server, service   # noqa: F401 (fixtures)

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_TIMEOUT_S = 20.0          # a request the fuzzer makes slow ends as DEADLINE_EXCEEDED, which is allowed
INT32 = st.integers(-(2 ** 31), 2 ** 31 - 1)
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-300, 1e-3, 1.0, 100.0]))
TEXT = st.text(max_size=300) | st.sampled_from(["", " ", "def add(a, b):", "x" * 25_000, "\x00\ud7ff\U0010ffff"])
METHODS = st.sampled_from(["", "ar", "pld", "sps", "ngram_store", "recycling", "pearl", "early_exit", "warp",
                           "AR", " ar", "x" * 300]) | st.text(max_size=20)
CONSTRAINT_SOURCES = {
    "json_schema": st.sampled_from(['{"type": "integer"}', '{"type": "string", "maxLength": 3}', "{", "[]",
                                    '{"type": 12}', '{"$ref": "#"}', "[" * 3000 + "]" * 3000,
                                    '{"properties": ' * 500 + "{}" + "}" * 500]) | st.text(max_size=50),
    "regex": st.sampled_from(["[0-9]{3}", "(a", "(a*)*b", "a{1000000}", ".*", ""]) | st.text(max_size=30),
    "grammar": st.sampled_from(["start: \"a\"+", "start: start", "", "%%%"]) | st.text(max_size=30),
}


@st.composite
def requests(draw) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(temperature=draw(FLOATS), top_k=draw(st.integers(-5, 70) | INT32),
                             stop=draw(st.lists(st.text(max_size=8), max_size=4) | st.just(["a"] * 2000)),
                             method=draw(METHODS), request_id=draw(st.text(max_size=40) | st.just("r" * 300)),
                             ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):
        msg.text = draw(TEXT)
    else:
        ids = st.integers(-3, 600) | INT32
        msg.token_ids.ids.extend(draw(st.lists(ids, max_size=40) | st.just([5] * 1100)))
    if draw(st.booleans()):
        msg.top_p = draw(FLOATS)
    if draw(st.booleans()):      # mostly short answers: the fuzzer's budget goes to many requests, not long ones
        msg.max_tokens = draw(st.integers(-3, 6) | st.sampled_from([0, 601, 2 ** 31 - 1]))
    if draw(st.booleans()):
        msg.seed = draw(st.integers(0, 2 ** 64 - 1))
    if draw(st.integers(0, 3)) == 0:
        kind = draw(st.sampled_from(sorted(CONSTRAINT_SOURCES)))
        setattr(msg.constraint, kind, draw(CONSTRAINT_SOURCES[kind]))
        msg.constraint.aligned = draw(st.booleans())
    return msg


def _status(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("service", ["direct"], indirect=True)
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(msg=requests(), stream=st.booleans())
def test_no_request_gets_internal_and_the_service_keeps_serving(service, client, msg, stream):
    meta = ((API_KEY_HEADER, KEY),)
    if stream:
        code = _status(lambda: list(client.stub.GenerateStream(msg, timeout=CALL_TIMEOUT_S, metadata=meta)))
    else:
        code = _status(lambda: client.stub.Generate(msg, timeout=CALL_TIMEOUT_S, metadata=meta))
    assert code in ALLOWED, (code, msg)
    assert client.generate("still serving?", max_tokens=1, timeout_s=60).completion_tokens == 1
