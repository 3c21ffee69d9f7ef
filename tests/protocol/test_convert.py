"""protobuf <-> dataclasses: round trips, request validation, lenient parsing, and stubs in sync with the .proto."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from metaspec.protocol import convert
from metaspec.protocol import metaspec_pb2 as pb
from metaspec.protocol.regenerate import HERE, OUTPUTS, generate
from metaspec.protocol.types import (Constraint, Health, MethodInfo, PoolDescription, PoolHealth, Reply,
                                     ServiceInfo, Undecodable)
from metaspec.workers.types import RequestError


def test_defaults_apply_when_fields_are_unset():
    call = convert.call_from_proto(convert.make_request("hello"), default_max_tokens=77)
    r = call.request
    assert r.prompt == "hello" and r.prompt_ids is None and r.method is None
    assert (r.params.max_tokens, r.params.top_p, r.params.temperature, r.params.seed) == (77, 1.0, 0.0, None)
    assert r.constraint is None and call.request_id == ""


def test_every_field_reaches_the_request():
    msg = convert.make_request([5, 6, 7], temperature=0.7, top_k=20, top_p=0.9, max_tokens=33, stop=["\n\n"],
                               seed=2**40, method="pld", constraint=Constraint("regex", "[a-z]+"),
                               request_id="abc", ignore_eos=True)
    msg = pb.GenerateRequest.FromString(msg.SerializeToString())       # through the wire format
    call = convert.call_from_proto(msg, default_max_tokens=128)
    p = call.request.params
    assert call.request.prompt_ids == (5, 6, 7) and call.request.prompt is None and call.request.method == "pld"
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens, p.stop, p.seed, p.ignore_eos) == \
        (0.7, 20, 0.9, 33, ("\n\n",), 2**40, True)
    assert call.request.constraint == Constraint("regex", "[a-z]+") and call.request_id == "abc"
    aligned = convert.make_request("x", constraint=Constraint("grammar", 'start: "a"', aligned=True))
    assert convert.call_from_proto(aligned, 16).request.constraint.aligned


@pytest.mark.parametrize("prompt, fields, message", [
    ("", {}, "prompt is empty"),
    ([], {}, "prompt is empty"),
    ("hi", {"max_tokens": 0}, "max_tokens must be an integer > 0"),
    ("hi", {"max_tokens": -5}, "max_tokens must be an integer > 0"),
    ("hi", {"temperature": -0.1}, "temperature must be a number >= 0"),
    ("hi", {"temperature": math.nan}, "temperature must be a number >= 0"),
    ("hi", {"top_p": math.nan}, r"top_p must be in \(0, 1\]"),
    ("hi", {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ("hi", {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ("hi", {"top_k": -1}, "top_k must be an integer >= 0"),
    ("hi", {"stop": [""]}, "stop strings must be non-empty"),
])
def test_bad_values_raise_request_errors(prompt, fields, message):
    with pytest.raises(RequestError, match=message):
        convert.call_from_proto(convert.make_request(prompt, **fields), default_max_tokens=16)


@pytest.mark.parametrize("source", ["", "   "])
def test_an_empty_constraint_is_refused(source):
    msg = convert.make_request("hi")
    assert convert.call_from_proto(msg, 16).request.constraint is None        # no constraint set
    msg.constraint.regex = source                                             # set, but empty
    with pytest.raises(RequestError, match="constraint source must be a non-empty string"):
        convert.call_from_proto(msg, 16)


def test_a_message_without_a_prompt_is_refused():
    with pytest.raises(RequestError, match="set `text` or `token_ids`"):
        convert.call_from_proto(pb.GenerateRequest(max_tokens=3), default_max_tokens=16)


def test_reply_round_trip():
    reply = Reply(text="héllo", token_ids=(1, 2), finish_reason="stop", method="sps", pool="cpu", reason="fixed",
                  scores={"cpu/sps": 120.5}, selector_version="v1",
                  acceptance={"acceptance_length": 2.5, "acceptance_rate": 0.75, "steps": 4, "drafts": 4,
                              "drafted": 8, "accepted": 6},
                  timings={"ttft_s": 0.01, "wall_s": 0.2, "tokens_per_s": 10.0, "worker_wall_s": 0.19,
                           "prefill_s": 0.005},
                  fallback="", request_id="r", prompt_tokens=3, completion_tokens=2)
    wire = convert.reply_to_proto(reply).SerializeToString()
    assert convert.reply_from_proto(pb.GenerateReply.FromString(wire)) == reply
    chunk = Reply(text="a", token_ids=(9,), request_id="r")
    assert convert.reply_from_proto(convert.reply_to_proto(chunk)) == chunk     # no stats on a chunk


def test_health_and_service_info_round_trip():
    health = Health(False, (PoolHealth("a", True), PoolHealth("b", False, "ActorDiedError")))
    assert convert.health_from_proto(convert.health_to_proto(health)) == health
    info = ServiceInfo((MethodInfo("sps", "draft model", ("drafter",)),),
                       (PoolDescription("cpu", ("ar", "sps"), {"accelerator": "cpu"}, "/t", "/d", 2, 1024),),
                       "fixed", 2048, 128)
    assert convert.service_info_from_proto(convert.service_info_to_proto(info)) == info


def test_invalid_utf8_becomes_an_undecodable_then_a_request_error():
    raw = b"\x0a\x02\xff\xfe"                                  # field 1 (text), 2 bytes that are not UTF-8
    with pytest.raises(Exception, match="UTF-8"):
        pb.GenerateRequest.FromString(raw)                      # what gRPC's own deserializer would hit
    parsed = convert._lenient(pb.GenerateRequest)(raw)
    assert isinstance(parsed, Undecodable) and parsed.type_name == "metaspec.v1.GenerateRequest"
    with pytest.raises(RequestError, match="not a valid metaspec.v1.GenerateRequest: .*UTF-8"):
        convert.call_from_proto(parsed, default_max_tokens=16)


def test_committed_stubs_match_the_proto(tmp_path):
    """Editing metaspec.proto without `python -m metaspec.protocol.regenerate` fails here."""
    for path in generate(tmp_path):
        assert path.read_text() == (HERE / path.name).read_text(), f"{path.name} is stale: regenerate the stubs"
    assert set(OUTPUTS) == {p.name for p in map(Path, generate(tmp_path))}
