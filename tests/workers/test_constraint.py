"""Constrained decoding under every arm: the same greedy output as constrained AR, always grammatical.

The contract is parametrized over `registry.arms()` x a JSON Schema, a regex and a Lark grammar on the tiny
seeded pair (byte-level BPE, vocab 512). Outputs are checked by independent validators (jsonschema, `re`),
never by llguidance itself; outputs cut by max_tokens are only checked for being a valid prefix of the reference.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import torch

from metaspec.workers.constraint import ConstraintConfig, ConstraintSpec
from metaspec.workers.engine import Request
from metaspec.workers.registry import arms
from metaspec.workers.types import Draft, RequestError, SamplingParams, Verdict
from metaspec.workers.verify import verify

ARMS = sorted(arms())
MAX_TOKENS = 48
PROMPTS = ("Describe a person as JSON: ", "The quick brown fox", "def add(a, b):\n    return", "Once upon a time,")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "ok": {"type": "boolean"},
                         "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["red", "green", "blue"]}}}}
REGEX = r"[a-z]{1,6}( [a-z]{1,6}){0,3}\."
LARK = r"""
start: sentence
sentence: "the " noun " " verb "." | "the " noun " " verb " and " sentence
noun: "cat" | "dog" | "big " noun
verb: "runs" | "sleeps" | "eats " noun
"""
_NOUN = r"(?:big )*(?:cat|dog)"
_VERB = rf"(?:runs|sleeps|eats {_NOUN})"
LARK_AS_REGEX = rf"the {_NOUN} {_VERB}(?: and the {_NOUN} {_VERB})*\."

SPECS = {"json_schema": ConstraintSpec("json_schema", json.dumps(SCHEMA)),
         "regex": ConstraintSpec("regex", REGEX),
         "grammar": ConstraintSpec("grammar", LARK)}


def is_valid(kind: str, text: str) -> bool:
    if kind == "json_schema":
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    return re.fullmatch(REGEX if kind == "regex" else LARK_AS_REGEX, text) is not None


def _run(engine, method: str, kind: str, cache: dict, **params):
    key = (id(engine), method, kind, tuple(sorted(params.items())))
    if key not in cache:
        sp = SamplingParams(max_tokens=MAX_TOKENS, **params)
        cache[key] = [engine.generate(Request(prompt=p, params=sp, method=method, constraint=SPECS[kind]))
                      for p in PROMPTS]
    return cache[key]


@pytest.fixture(scope="module")
def cache() -> dict:
    return {}


def _skip_unavailable(engine, method: str) -> None:
    if method not in engine.available_methods():
        pytest.skip(f"arm {method!r} needs {sorted(arms()[method].requires)}, which the test engine lacks")


@pytest.mark.parametrize("kind", sorted(SPECS))
@pytest.mark.parametrize("method", ARMS)
def test_constrained_greedy_equals_constrained_ar(method, kind, tiny_engine, cache):
    _skip_unavailable(tiny_engine, method)
    reference, got = _run(tiny_engine, "ar", kind, cache), _run(tiny_engine, method, kind, cache)
    for prompt, want, have in zip(PROMPTS, reference, got):
        assert have.token_ids == want.token_ids, f"{method} under {kind} diverges from ar on {prompt!r}"
        assert (have.text, have.finish_reason) == (want.text, want.finish_reason)
        assert have.stats.emitted == len(have.token_ids) and have.stats.fallback is None


@pytest.mark.parametrize("method", ARMS)
def test_constrained_greedy_equals_constrained_ar_on_shipped_models(method, shipped_engine, cache):
    _skip_unavailable(shipped_engine, method)
    for kind in SPECS:
        for want, have in zip(_run(shipped_engine, "ar", kind, cache), _run(shipped_engine, method, kind, cache)):
            assert have.token_ids == want.token_ids, f"{method} under {kind} diverges from ar on the shipped pair"
            assert have.finish_reason == "length" or is_valid(kind, have.text), (kind, have.text)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_outputs_are_valid(kind, tiny_engine, cache):
    results = _run(tiny_engine, "ar", kind, cache)
    finished = [r for r in results if r.finish_reason == "stop"]
    assert finished, f"no {kind} output finished within {MAX_TOKENS} tokens: the check would be vacuous"
    for r in finished:
        assert is_valid(kind, r.text), (kind, r.text)
    unconstrained = tiny_engine.generate(Request(prompt=PROMPTS[0], params=SamplingParams(max_tokens=MAX_TOKENS)))
    assert not is_valid(kind, unconstrained.text), "the tiny model writes valid output unprompted: weak test"


def test_contract_is_not_vacuous(tiny_engine, cache):
    """Under the grammars the arms still draft, get drafts accepted, pruned and rejected; the grammar forces."""
    stats = Counter()
    for method in tiny_engine.available_methods():
        for kind in SPECS:
            for r in _run(tiny_engine, method, kind, cache):
                stats.update({k: getattr(r.stats, k) for k in ("drafted", "accepted", "pruned", "forced")})
    assert stats["accepted"] > 0 and stats["pruned"] > 0 and stats["forced"] > 0, stats
    assert stats["accepted"] < stats["drafted"], stats
    assert sum(r.stats.forced for r in _run(tiny_engine, "ar", "json_schema", cache)) > 0


@pytest.mark.parametrize("cfg", [ConstraintConfig(fast_forward=False), ConstraintConfig(lazy_greedy_masks=False)],
                         ids=["no_fast_forward", "full_masks"])
def test_fast_forward_and_lazy_masks_change_nothing(cfg, tiny_engine, cache, monkeypatch):
    reference = {kind: _run(tiny_engine, "ar", kind, cache) for kind in SPECS}
    monkeypatch.setattr(tiny_engine, "grammars", tiny_engine.grammars.with_config(cfg))
    for kind in SPECS:
        for method in ("ar", "sps"):
            for want, have in zip(reference[kind], _run(tiny_engine, method, kind, {})):
                assert have.token_ids == want.token_ids, (cfg, kind, method)
                if not cfg.fast_forward:
                    assert have.stats.forced <= 1      # only the final EOS, emitted without a forward
    fewer = _run(tiny_engine, "ar", "json_schema", {})
    if not cfg.fast_forward:  # fast-forward saves target forwards
        assert sum(r.stats.steps for r in fewer) > sum(r.stats.steps for r in reference["json_schema"])


@pytest.mark.parametrize("method", ["ar", "sps", "pld"])
def test_sampled_outputs_are_valid(method, tiny_engine):
    _skip_unavailable(tiny_engine, method)
    for kind in SPECS:
        for seed in range(3):
            r = tiny_engine.generate(Request(prompt=PROMPTS[seed], method=method, constraint=SPECS[kind],
                                             params=SamplingParams(temperature=1.0, seed=seed, max_tokens=64)))
            assert r.finish_reason == "length" or is_valid(kind, r.text), (method, kind, r.text)


# ---- errors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, source, message", [
    ("json_schema", "{not json", "invalid json_schema"),
    ("json_schema", "[1, 2]", "object or a boolean"),
    ("json_schema", json.dumps({"type": "string", "not": {"const": "a"}}), "not supported"),
    ("json_schema", json.dumps({"type": "string", "format": "no-such-format"}), "not supported"),
    ("regex", "(unclosed", "not supported"),
    ("grammar", "start: undefined_rule", "not supported"),
    ("grammar", "start: (\"a\" | ", "not supported"),
])
def test_bad_grammars_are_request_errors(kind, source, message, tiny_engine):
    request = Request(prompt="x", constraint=ConstraintSpec(kind, source), method="ar")
    for _ in range(2):  # the second time comes from the cache of failures
        with pytest.raises(RequestError, match=message):
            tiny_engine.generate(request)
    assert tiny_engine.generate(Request(prompt="x", params=SamplingParams(max_tokens=4))).token_ids


@pytest.mark.parametrize("kwargs, message", [(dict(kind="xml", source="<a/>"), "kind"),
                                              (dict(kind="regex", source=""), "non-empty")])
def test_malformed_specs(kwargs, message):
    with pytest.raises(RequestError, match=message):
        ConstraintSpec(**kwargs)


def test_limits_are_request_errors(tiny_engine):
    small = tiny_engine.grammars.with_config(ConstraintConfig(max_source_chars=20))
    with pytest.raises(RequestError, match="limit"):
        small.compile(ConstraintSpec("regex", "a" * 21))
    hurried = tiny_engine.grammars.with_config(ConstraintConfig(compile_timeout_s=1e-3))
    big = {"type": "object", "required": [f"p{i}" for i in range(300)],   # ~0.1 s to compile
           "properties": {f"p{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 7 + 1},{i % 11 + 9}}}x{i}(y|z)+$"}
                          for i in range(300)}}
    with pytest.raises(RequestError, match="longer than"):
        hurried.compile(ConstraintSpec("json_schema", json.dumps(big)))
    tiny = tiny_engine.grammars.with_config(ConstraintConfig(max_grammar_size=10))
    with pytest.raises(RequestError, match="not supported"):
        tiny.compile(SPECS["grammar"])


def test_compile_cache(tiny_engine):
    grammars = tiny_engine.grammars
    first = grammars.compile(SPECS["regex"])
    assert grammars.compile(ConstraintSpec("regex", REGEX)) is first
    assert grammars.compile(ConstraintSpec("regex", REGEX + "?")) is not first


def test_a_slow_compile_holds_up_only_its_own_grammar(tiny_engine):
    """Compiles run outside the cache lock: a grammar stuck compiling delays the requests that want that grammar
    (they share its one compile), never a cached grammar or another one."""
    grammars = tiny_engine.grammars.with_config(ConstraintConfig())
    cached = grammars.compile(SPECS["regex"])
    slow, release, started = ConstraintSpec("regex", "[a-c]+z"), threading.Event(), threading.Event()
    real = grammars._compile

    def stuck(spec):
        if spec == slow:
            started.set()
            assert release.wait(30)
        return real(spec)

    grammars._compile = stuck
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.submit(grammars.compile, slow), pool.submit(grammars.compile, slow)
        assert started.wait(30)
        assert grammars.compile(ConstraintSpec("regex", REGEX)) is cached      # not held up by the stuck one
        assert grammars.compile(ConstraintSpec("regex", "[x-y]+")).matcher is not None
        assert not first.done() and not second.done()
        release.set()
        assert first.result(30) is second.result(30)                          # one compile, shared


# ---- the per-step operations, on a hand-made draft ----------------------------------------------------------

def _ids(tok, *pieces: str) -> list[int]:
    out = []
    for piece in pieces:
        ids = tok.convert_tokens_to_ids([piece])
        assert ids[0] is not None and ids[0] != tok.unk_token_id, piece
        out += ids
    return out


@pytest.fixture
def ab_c(tiny_engine):
    """A fresh constraint for the regex (a|b)c and the ids of the single-byte tokens a, b, c, x."""
    constraint = tiny_engine.grammars.start(ConstraintSpec("regex", "(a|b)c"), SamplingParams(), ())
    return constraint, dict(zip("abcx", _ids(tiny_engine.tokenizer, "a", "b", "c", "x")))


def test_restrict_chains_and_trees(ab_c, tiny_engine):
    c, t = ab_c
    eos = min(tiny_engine.eos_ids)
    greedy, sampled = SamplingParams(), SamplingParams(temperature=1.0)
    assert c.restrict(Draft([t["a"], t["c"], t["x"]]), greedy).tokens == [t["a"], t["c"]]
    assert c.restrict(Draft([t["a"], t["c"], eos, t["a"]]), greedy).tokens == [t["a"], t["c"], eos]
    assert c.restrict(Draft([t["x"], t["c"]]), greedy).tokens == []
    q = torch.full((2, 512), 1 / 512)
    kept = c.restrict(Draft([t["x"], t["c"]], q), sampled)   # the bad token stays for the p/q rule to reject
    assert kept.tokens == [t["x"]] and kept.probs.shape == (1, 512)
    tree = Draft([t["a"], t["x"], t["c"], t["b"], t["b"]], parents=[-1, -1, 0, 0, -1])
    kept = c.restrict(tree, greedy)
    assert (kept.tokens, kept.parents) == ([t["a"], t["c"], t["b"]], [-1, 0, -1])


def test_mask_walks_the_draft_and_restores_the_matcher(ab_c, tiny_engine):
    c, t = ab_c
    eos = min(tiny_engine.eos_ids)
    params = SamplingParams(temperature=1.0)
    draft = c.restrict(Draft([t["a"], t["c"]]), params)
    masked = c.mask(torch.zeros(3, 512), draft, params)
    allowed = [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in masked]
    assert t["a"] in allowed[0] and t["b"] in allowed[0] and t["c"] not in allowed[0]
    assert allowed[1] == {t["c"]} and allowed[2] == {eos}
    assert c.forced(4) is None and c.m.validate_tokens([t["b"], t["c"]]) == 2   # state untouched by the walk
    emitted = c.commit(Verdict(1, [t["a"], t["c"]]), budget=10)
    assert emitted == [t["a"], t["c"], eos]                                      # EOS forced without a forward


def test_pruned_sampled_draft_stays_lossless(ab_c):
    """p (masked) = {a: .5, b: .5}; the drafter samples q = {a: .5, x: .5}, x outside the grammar. Emitted
    tokens must follow p. Dropping x and sampling p instead would give a with probability .75."""
    c, t = ab_c
    params = SamplingParams(temperature=1.0)
    logits = torch.full((2, 512), -1e4)
    logits[0, [t["a"], t["b"], t["x"]]] = 0.0
    q = torch.zeros(512)
    q[[t["a"], t["x"]]] = 0.5
    gen = torch.Generator().manual_seed(0)
    counts, trials = Counter(), 4000
    for seed in range(trials):
        x = int(torch.multinomial(q, 1, generator=gen))
        draft = c.restrict(Draft([x], q[None]), params)
        verdict = verify(c.mask(logits[: len(draft.tokens) + 1], draft, params), draft, params, seed=seed)
        counts[verdict.emitted[0]] += 1
    assert set(counts) == {t["a"], t["b"]}
    assert abs(counts[t["a"]] / trials - 0.5) < 0.04, counts
