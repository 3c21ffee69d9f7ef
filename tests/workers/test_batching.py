"""Lossless under batching: what else shares a step's forward never changes a request's output.

Every request here is compared with the same request decoded alone (a batch of one): greedy tokens of every arm
inside mixed batches (other arms, prompts, lengths, constraints, requests joining and leaving), seeded samples
whatever the batch, cancellation mid-decode, a pool too small for the load, and chunked prefill. fp32 throughout.
"""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest

from metaspec.workers.constraint import ConstraintSpec
from metaspec.workers.engine import Request
from metaspec.workers.registry import arms
from metaspec.workers.scheduler import QueueFull, SchedulerConfig
from metaspec.workers.types import SamplingParams

from ..conftest import category_prompts, local_resources, make_engine

ARMS = sorted(arms())
TEXTS = ["def add(a, b):\n    return", "The quick brown fox jumps over", "import os\nimport sys\n\ndef main(",
         "for i in range(10):\n    print(i", "class Stack:\n    def __init__(self):", "Once upon a time"]
REGEX = ConstraintSpec("regex", r"[a-z]{2,6}( [a-z]{2,6}){3,8}\.")
SCHEMA = ConstraintSpec("json_schema", json.dumps({"type": "object", "properties": {"n": {"type": "integer"}},
                                                   "required": ["n"]}))


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens)


def _alone(engine, requests: list[Request]) -> list[list[int]]:
    return [engine.generate(r).token_ids for r in requests]


def _mixed(prompts: list[str]) -> list[Request]:
    """Every arm on every prompt, lengths varied so that requests finish at different steps (and mid-draft)."""
    out = []
    for i, text in enumerate(prompts):
        for j, method in enumerate(ARMS):
            out.append(Request(prompt=text, method=method, params=_greedy(9 + 7 * ((i + j) % 5))))
    out += [Request(prompt=prompts[0], method=m, params=_greedy(40), constraint=c)
            for m, c in (("pld", REGEX), ("sps", SCHEMA), ("ngram_store", REGEX))]
    return out


def _engine(pair, **batch):
    return make_engine(pair, batch=SchedulerConfig(**batch))


@pytest.fixture(scope="module")
def small_pool_engine(tiny_pair):
    """Four KV slots and short prefill chunks: requests queue for slots, join as others leave, prefill in chunks."""
    engine = _engine(tiny_pair, max_batch=4, prefill_chunk=5, step_tokens=40)
    yield engine
    engine.close()


def test_every_arm_in_a_mixed_batch_equals_itself_alone(tiny_engine):
    requests = _mixed(TEXTS)
    want = _alone(tiny_engine, requests)
    got = [r.token_ids for r in tiny_engine.generate_many(requests)]
    for request, w, g in zip(requests, want, got):
        assert g == w, f"{request.method} on {request.prompt!r} changed inside a batch"
    assert max(tiny_engine.scheduler.metrics.batch_hist) >= 8, "the batch never filled: nothing was tested"


def test_mixed_batch_equals_alone_on_shipped_models(shipped_engine):
    prompts = [text for _, text in category_prompts(per_category=1)][:4] or TEXTS[:4]
    requests = _mixed(prompts)
    want = _alone(shipped_engine, requests)
    got = [r.token_ids for r in shipped_engine.generate_many(requests)]
    assert got == want


def test_queueing_for_slots_and_chunked_prefill_change_nothing(small_pool_engine, tiny_engine):
    long = " ".join(TEXTS) * 2                      # prefilled over many 5-token chunks
    requests = _mixed(TEXTS[:3]) + [Request(prompt=long, method=m, params=_greedy(20)) for m in ("ar", "sps")]
    want = _alone(tiny_engine, requests)
    got = [r.token_ids for r in small_pool_engine.generate_many(requests)]
    assert got == want
    m = small_pool_engine.scheduler.metrics
    assert max(m.batch_hist) <= 4 and small_pool_engine.pool.free == 4


def test_running_requests_keep_emitting_while_a_long_prompt_prefills(small_pool_engine):
    order: list[str] = []
    done = {name: threading.Event() for name in ("short", "long")}

    def sink(name):
        def put(event):
            order.append(name if event[0] == "tokens" else f"{name}-end")
            if event[0] != "tokens":
                done[name].set()
        return put

    engine = small_pool_engine
    engine.submit(Request(prompt=TEXTS[0], method="ar", params=SamplingParams(max_tokens=30, ignore_eos=True)),
                  sink("short"))
    while "short" not in order:
        pass
    engine.submit(Request(prompt=" ".join(TEXTS) * 3, method="ar", params=_greedy(4)), sink("long"))
    assert all(e.wait(60) for e in done.values())
    first_long = order.index("long")
    assert order[:first_long].count("short") >= 10, order   # the long prompt took >= 10 chunked steps to load


def test_seeded_samples_are_the_same_whatever_the_batch(tiny_engine):
    def sampled(method: str, seed: int, n: int = 24) -> Request:
        return Request(prompt=TEXTS[seed % len(TEXTS)], method=method,
                       params=SamplingParams(temperature=0.9, top_p=0.95, max_tokens=n, seed=seed))

    requests = [sampled(m, seed) for seed, m in enumerate(ARMS)]
    want = _alone(tiny_engine, requests)
    # pearl's output under sampling depends on whether a drafter lane was free for it (a request without one
    # decodes draftless, which the p/q rule makes a different, equally distributed sample): the batch around it
    # holds one other pearl request, so both get a lane of the drafter (PearlConfig.lanes = 4) and share its
    # batched forwards.
    noise = [sampled(m, 100 + i, 9 + 5 * i) for i, m in enumerate(ARMS)]
    noise += [r for r in _mixed(TEXTS[:2]) if r.method != "pearl"]
    got = [r.token_ids for r in tiny_engine.generate_many(noise + requests)][len(noise):]
    assert got == want


def test_cancelling_mid_decode_leaves_the_others_unchanged(tiny_engine):
    keep = [Request(prompt=t, method=m, params=_greedy(30)) for t, m in zip(TEXTS, ARMS)]
    want = _alone(tiny_engine, keep)
    events = {i: queue.SimpleQueue() for i in range(2 * len(keep))}
    victims = [tiny_engine.submit(Request(prompt=t, method=m, params=SamplingParams(max_tokens=60, ignore_eos=True)),
                                  events[len(keep) + i].put) for i, (t, m) in enumerate(zip(TEXTS, reversed(ARMS)))]
    kept = [tiny_engine.submit(r, events[i].put) for i, r in enumerate(keep)]
    for i, s in enumerate(victims):
        assert events[len(keep) + i].get(timeout=60)[0] == "tokens"
        tiny_engine.cancel(s)
    got = []
    for i, s in enumerate(kept):
        tokens = []
        while (event := events[i].get(timeout=60))[0] == "tokens":
            tokens += event[1]
        assert event == ("end", "stop") or event == ("end", "length"), event
        got.append(tokens)
    assert got == want
    for i in range(len(victims)):
        while (event := events[len(keep) + i].get(timeout=60))[0] == "tokens":
            pass
        assert event == ("end", "cancelled")
    assert tiny_engine.pool.free == tiny_engine.pool.slots


def test_a_full_waiting_queue_refuses_at_once(tiny_pair):
    engine = _engine(tiny_pair, max_batch=1, max_waiting=2)
    try:
        engine.resources.update(local_resources(engine.target.vocab_size))
        long = SamplingParams(max_tokens=900, ignore_eos=True)     # still running when the others arrive
        held = [engine.submit(Request(prompt=TEXTS[0], method="ar", params=long), lambda e: None)]
        deadline = time.monotonic() + 30
        while engine.scheduler.load["running"] < 1 and time.monotonic() < deadline:   # it holds the one slot
            time.sleep(0.005)
        with pytest.raises(QueueFull):
            for _ in range(4):          # two wait, the third cannot queue
                held.append(engine.submit(Request(prompt=TEXTS[0], method="ar", params=long), lambda e: None))
        assert len(held) == 3
        for s in held:
            engine.cancel(s)
    finally:
        engine.close()


def test_kv_memory_is_allocated_once(tiny_pair):
    engine = _engine(tiny_pair, max_batch=3)
    try:
        before = engine.memory()
        engine.generate_many([Request(prompt=t, method="sps", params=_greedy(12)) for t in TEXTS])
        assert engine.memory() == before and before["slots"] == 3 and before["free_slots"] == 3
        assert sum(before["kv_bytes"].values()) > 0
    finally:
        engine.close()
