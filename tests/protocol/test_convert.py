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


# ---- limits: every field bounded before any tokenisation or decode work -------------------------------------

LIMITS = convert.RequestLimits()


def _refused(msg, fragment: str, **kw) -> str:
    with pytest.raises(RequestError) as err:
        convert.call_from_proto(msg, default_max_tokens=16, **kw)
    assert fragment in str(err.value), str(err.value)
    return str(err.value)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-4, math.inf, -math.inf, math.nan, 1e300, -0.5])
def test_vanishing_huge_and_non_finite_temperatures_are_refused(temperature):
    message = _refused(convert.make_request("hi", temperature=temperature), "temperature must be a number >= 0")
    assert "[0.001, 100]" in message


@pytest.mark.parametrize("temperature", [0.0, 1e-3, 0.7, 100.0])
def test_greedy_and_ordinary_temperatures_pass(temperature):
    call = convert.call_from_proto(convert.make_request("hi", temperature=temperature), 16)
    assert call.request.params.temperature == temperature


def test_token_ids_are_bounded_on_both_sides():
    _refused(convert.make_request([5, -1]), "prompt_ids must be token ids in [0, vocab_size), got -1 at position 1")
    _refused(convert.make_request([5, -2**31]), "got -2147483648")
    _refused(convert.make_request([1, 2, 512]), "prompt_ids must be token ids in [0, 512), got 512 at position 2",
             vocab_size=512)
    assert convert.call_from_proto(convert.make_request([0, 511]), 16, vocab_size=512).request.prompt_ids == (0, 511)
    convert.check_token_ids(None, 8)                               # a text prompt has no ids to check
    with pytest.raises(RequestError, match=r"\[0, 8\)"):
        convert.check_token_ids((3, 9), 8)


def test_prompt_sizes_are_counted_before_tokenising():
    small = convert.RequestLimits(max_prompt_chars=10, max_prompt_ids=4)
    _refused(convert.make_request("x" * 11), "text: at most 10 characters, got 11", limits=small)
    _refused(convert.make_request([1] * 5), "token_ids: at most 4 ids, got 5", limits=small)
    assert convert.call_from_proto(convert.make_request("x" * 10), 16, limits=small).request.prompt == "x" * 10
    _refused(convert.make_request("x" * (LIMITS.max_prompt_chars + 1)), "at most 1000000 characters")


def test_stop_strings_are_bounded_in_count_and_length():
    _refused(convert.make_request("hi", stop=["a"] * (LIMITS.max_stop_strings + 1)), "stop: at most 16 stop strings")
    _refused(convert.make_request("hi", stop=["a", "b" * 257]), "stop[1]: at most 256 characters, got 257")
    million = convert.make_request("hi", stop=["ab"] * 1_000_000)    # fits in one 4 MiB message
    _refused(pb.GenerateRequest.FromString(million.SerializeToString()), "got 1000000")
    assert convert.call_from_proto(convert.make_request("hi", stop=["x"] * 16), 16).request.params.stop == ("x",) * 16


def test_request_id_method_and_top_k_are_bounded():
    _refused(convert.make_request("hi", request_id="r" * 257), "request_id: at most 256 characters, got 257")
    _refused(convert.make_request("hi", request_id="a\nforged log line"), "request_id must hold printable")
    _refused(convert.make_request("hi", method="m" * 65), "method: at most 64 characters")
    _refused(convert.make_request("hi", top_k=2**31 - 1), f"at most {LIMITS.max_top_k}")
    assert convert.call_from_proto(convert.make_request("hi", request_id="req-1 é"), 16).request_id == "req-1 é"


def _nested_schema(levels: int) -> str:
    return '{"type": "array", "items": ' * levels + '{"type": "integer"}' + "}" * levels


def test_a_schema_nested_2000_levels_is_invalid_argument_not_recursion_error():
    msg = convert.make_request("hi", constraint=Constraint("json_schema", _nested_schema(2000)))
    _refused(msg, "constraint.json_schema: nesting deeper than 128 levels")
    ok = convert.make_request("hi", constraint=Constraint("json_schema", _nested_schema(60)))   # depth 121
    assert convert.call_from_proto(ok, 16).request.constraint.kind == "json_schema"


@pytest.mark.parametrize("kind, source", [("regex", "(" * 200 + "a" + ")" * 200),
                                          ("grammar", 'start: ' + "(" * 200 + '"a"' + ")" * 200),
                                          ("json_schema", "[" * 100_000)])
def test_deep_regexes_and_grammars_are_refused(kind, source):
    _refused(convert.make_request("hi", constraint=Constraint(kind, source)), f"constraint.{kind}: nesting deeper")


def test_constraint_sources_are_bounded_in_size():
    small = convert.RequestLimits(max_constraint_chars=100)
    _refused(convert.make_request("hi", constraint=Constraint("regex", "a" * 101)),
             "constraint.regex: at most 100 characters, got 101", limits=small)


def test_nesting_depth_ignores_brackets_in_strings_escapes_and_classes():
    assert convert.nesting_depth('{"a": "{{{[[[", "b": [1, {"c": "\\"{"}]}') == 3
    assert convert.nesting_depth(r"\(\(\(a[(((]", "regex") == 1
    assert convert.nesting_depth('start: "((((" (a | "[[")', "grammar") == 1
    assert convert.nesting_depth("[" * 10_000, "json_schema", stop_at=5) == 5


def test_the_limits_are_one_frozen_dataclass_with_a_default_each():
    import dataclasses

    assert dataclasses.fields(convert.RequestLimits) and convert.RequestLimits.__dataclass_params__.frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        LIMITS.max_stop_strings = 10**6


def test_any_field_values_give_a_call_or_a_request_error():
    hypothesis = pytest.importorskip("hypothesis")
    given, settings, st = hypothesis.given, hypothesis.settings, hypothesis.strategies

    floats = st.floats(allow_nan=True, allow_infinity=True)
    int32 = st.integers(-2**31, 2**31 - 1)

    @settings(max_examples=300, deadline=None)
    @given(prompt=st.one_of(st.text(max_size=40), st.lists(int32, max_size=20)), temperature=floats,
           top_k=int32, top_p=st.none() | floats, max_tokens=st.none() | int32,
           stop=st.lists(st.text(max_size=300), max_size=20), request_id=st.text(max_size=300),
           method=st.text(max_size=80), kind=st.sampled_from([None, "json_schema", "regex", "grammar"]),
           source=st.text(alphabet='{}[]()"\\ ab:', max_size=400))
    def check(prompt, temperature, top_k, top_p, max_tokens, stop, request_id, method, kind, source):
        msg = convert.make_request(prompt, temperature=temperature, top_k=top_k, top_p=top_p,
                                   max_tokens=max_tokens, stop=stop, request_id=request_id, method=method,
                                   constraint=Constraint(kind, source) if kind and source.strip() else None)
        try:
            call = convert.call_from_proto(pb.GenerateRequest.FromString(msg.SerializeToString()), 16,
                                           vocab_size=512)
        except RequestError:
            return
        p = call.request.params
        assert p.temperature == 0 or 1e-3 <= p.temperature <= 100
        assert all(0 <= t < 512 for t in call.request.prompt_ids or ())

    check()
