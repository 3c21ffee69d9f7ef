"""DecodeWorker's logic on the tiny pair, without Ray (the Serve path is covered by tests/deploy/test_service.py)."""

from __future__ import annotations

import asyncio

import pytest

from metaspec.workers.engine import Chunk, Request, Result
from metaspec.workers.store import RedisConfig, StoreConfig
from metaspec.workers.types import RequestError, SamplingParams
from metaspec.workers.worker import DecodeWorker, worker_config


@pytest.fixture(scope="module")
def worker(tiny_pair):
    cfg = worker_config("tiny", tiny_pair.target, tiny_pair.drafter, threads=1)
    return DecodeWorker.func_or_class(cfg)   # the plain class under the Serve decorator


def _request(method: str = "sps", max_tokens: int = 24, prompt: str = "def add(a, b):") -> Request:
    return Request(prompt=prompt, params=SamplingParams(max_tokens=max_tokens, ignore_eos=True), method=method)


async def _collect(agen):
    return [item async for item in agen]


def test_info_lists_the_arms_this_replica_can_run(worker, tiny_pair):
    info = worker.info()
    assert info.pool == "tiny"
    assert {"ar", "pld", "sps"} <= set(info.methods) and "ngram_store" not in info.methods
    assert info.max_context == 1024 and info.vocab_size == 512
    local = worker_config("t", tiny_pair.target, None, store=StoreConfig(redis=RedisConfig(url=None)))
    with_tables = DecodeWorker.func_or_class(local)
    assert {"ngram_store", "recycling", "pld"} <= set(with_tables.info().methods) and "sps" not in with_tables.info().methods
    reply = asyncio.run(with_tables.generate(_request(method="ngram_store")))
    assert reply.method == "ngram_store" and len(reply.token_ids) == 24
    assert with_tables.table_stats()["ngram"]["contexts"] > 0     # the table learned the emitted text
    asyncio.run(with_tables.generate(_request(method="recycling")))  # fills the recycling table
    dropped = with_tables.reset_tables()                            # a benchmark pass starts from empty tables
    assert dropped["ngram"] > 0 and dropped["adjacency"] > 0
    assert with_tables.table_stats()["ngram"]["contexts"] == 0 and with_tables.table_stats()["adjacency"]["rows"] == 0
    again = asyncio.run(with_tables.generate(_request(method="ngram_store")))
    assert again.token_ids == reply.token_ids                       # it serves on, lossless, and learns again
    assert with_tables.table_stats()["ngram"]["contexts"] > 0
    assert worker.reset_tables() is None                             # no tables, nothing to reset


def test_stream_chunks_add_up_to_generate(worker):
    whole = asyncio.run(worker.generate(_request(), "r1"))
    items = asyncio.run(_collect(worker.stream(_request(), "r2")))
    chunks, final = items[:-1], items[-1]
    assert all(isinstance(c, Chunk) for c in chunks) and isinstance(final, Result)
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids == final.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert whole.method == "sps" and len(whole.token_ids) == 24


def test_request_error_is_raised_and_counted(worker):
    failed = worker.stats().failed
    with pytest.raises(RequestError, match="context"):
        asyncio.run(worker.generate(_request(prompt="x " * 2000)))
    with pytest.raises(RequestError, match="unknown method"):
        asyncio.run(worker.generate(_request(method="nope")))
    assert worker.stats().failed == failed + 2
    assert not worker.stats().active


def test_a_caller_that_goes_away_stops_the_decode(worker):
    """Closing the stream after two chunks stops decoding: the replica keeps no active request and serves on."""
    before = worker.stats()
    started, cancelled, tokens = before.started, before.cancelled, before.tokens

    async def abandon() -> int:
        agen = worker.stream(_request(method="ar", max_tokens=500), "gone")
        got = [await agen.__anext__(), await agen.__anext__()]
        await agen.aclose()
        return len(got)

    assert asyncio.run(abandon()) == 2
    stats = worker.stats()
    assert stats.started == started + 1 and stats.cancelled == cancelled + 1
    assert stats.tokens == tokens                    # no Result was produced for the abandoned request
    assert "gone" not in stats.active
    assert len(asyncio.run(worker.generate(_request(method="ar", max_tokens=5))).token_ids) == 5


def test_task_cancellation_mid_decode(worker):
    """A cancelled asyncio task (what Serve does when the client disconnects) ends the request as cancelled."""
    cancelled = worker.stats().cancelled

    async def cancel_soon() -> None:
        task = asyncio.create_task(worker.generate(_request(method="ar", max_tokens=500), "cut"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_soon())
    assert worker.stats().cancelled == cancelled + 1 and "cut" not in worker.stats().active


def test_concurrent_requests_interleave_and_match_sequential_output(worker):
    prompts = ["def add(a, b):", "The quick brown fox", "for i in range(10):"]
    alone = [asyncio.run(worker.generate(_request(prompt=p), f"s{i}")).token_ids for i, p in enumerate(prompts)]

    async def together():
        return await asyncio.gather(*(worker.generate(_request(prompt=p), f"c{i}") for i, p in enumerate(prompts)))

    assert [r.token_ids for r in asyncio.run(together())] == alone


def test_a_prompt_sent_with_ids_is_not_tokenised_again(worker, monkeypatch):
    """The router sends text and ids: the worker decodes the ids and never tokenises the text (counted)."""
    text = "def add(a, b):"
    ids = tuple(worker.engine.tokenizer.encode(text, add_special_tokens=False))
    by_text = asyncio.run(worker.generate(_request(prompt=text)))
    tokenised = worker.stats().tokenised
    assert tokenised >= 1                                       # text alone: the worker tokenised it

    def refuse(*args, **kwargs):
        raise AssertionError("the worker tokenised a prompt it was given ids for")

    monkeypatch.setattr(worker.engine.tokenizer, "encode", refuse)
    sent = Request(prompt=text, prompt_ids=ids, params=SamplingParams(max_tokens=24, ignore_eos=True), method="sps")
    by_ids = asyncio.run(worker.generate(sent))
    assert by_ids.token_ids == by_text.token_ids and by_ids.prompt_tokens == len(ids)
    assert worker.stats().tokenised == tokenised
