"""Invalid requests raise RequestError with a message that names the problem; nothing crashes deeper."""

from __future__ import annotations

import math

import pytest

from metaspec.workers.engine import Request
from metaspec.workers.types import RequestError, SamplingParams

from ..conftest import make_engine


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.2), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-5), "max_tokens"),
    (dict(max_tokens=3.0), "max_tokens"),
    (dict(stop=("",)), "stop"),
])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(temperature=0), dict(temperature=2.0, top_p=1.0, top_k=0),
                                    dict(top_p=1e-6, top_k=1, max_tokens=1), dict(stop=("\n\n", "END"))])
def test_valid_edge_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_request_error_is_a_value_error():
    assert issubclass(RequestError, ValueError)


def _ids(engine, n: int) -> tuple[int, ...]:
    return tuple(4 + i % 50 for i in range(n))


@pytest.mark.parametrize("case", ["empty_text", "empty_ids", "too_long_ids", "too_long_text", "unknown_method",
                                  "negative_id", "id_beyond_vocab", "non_int_id"])
def test_invalid_requests(tiny_engine, case):
    ctx = tiny_engine.target.max_context
    request, message = {
        "empty_text": (Request(prompt=""), "empty"),
        "empty_ids": (Request(prompt_ids=()), "empty"),
        "too_long_ids": (Request(prompt_ids=_ids(tiny_engine, ctx + 5)), "context"),
        "too_long_text": (Request(prompt="word " * (2 * ctx)), "context"),
        "unknown_method": (Request(prompt="hi", method="warp_drive"), "unknown method 'warp_drive'"),
        "negative_id": (Request(prompt_ids=(5, -1, 7)), "prompt_ids"),
        "id_beyond_vocab": (Request(prompt_ids=(5, tiny_engine.target.vocab_size)), "prompt_ids"),
        "non_int_id": (Request(prompt_ids=(5, 6.5)), "prompt_ids"),
    }[case]
    with pytest.raises(RequestError, match=message):
        tiny_engine.generate(request)
    with pytest.raises(RequestError, match=message):  # streaming fails the same way, before any chunk
        next(iter(tiny_engine.stream(request)))


def test_unknown_method_lists_the_known_ones(tiny_engine):
    with pytest.raises(RequestError) as info:
        tiny_engine.generate(Request(prompt="hi", method="nope"))
    assert "ar" in str(info.value) and "pld" in str(info.value)


def test_prompt_exactly_at_context_is_refused_and_one_below_is_served(tiny_engine):
    ctx = tiny_engine.target.max_context
    with pytest.raises(RequestError, match="context"):
        tiny_engine.generate(Request(prompt_ids=_ids(tiny_engine, ctx)))
    result = tiny_engine.generate(Request(prompt_ids=_ids(tiny_engine, ctx - 1), params=SamplingParams(max_tokens=4)))
    assert len(result.token_ids) == 1 and result.finish_reason == "length"


def test_method_needing_a_drafter_on_an_engine_without_one(tiny_pair):
    engine = make_engine(tiny_pair, drafter=False)
    assert "sps" not in engine.available_methods() and "ar" in engine.available_methods()
    with pytest.raises(RequestError, match="drafter"):
        engine.generate(Request(prompt="hello", method="sps"))


def test_engine_is_usable_after_errors(tiny_engine):
    for bad in (Request(prompt=""), Request(prompt="x", method="??")):
        with pytest.raises(RequestError):
            tiny_engine.generate(bad)
    result = tiny_engine.generate(Request(prompt="hello world", params=SamplingParams(max_tokens=5), method="ar"))
    assert len(result.token_ids) == 5
