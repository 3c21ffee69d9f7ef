"""The shared tables against a real Redis: each test starts its own `redis-server` on a free port and stops it.

Covers packing, namespace isolation, caps, incremental and full sync between workers, a server that is down at
start or killed mid-request (no request fails, syncing resumes), and two worker processes where the second
drafts better after the first has served related prompts.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import subprocess
import time
import uuid

import numpy as np
import pytest
import redis
import torch

from metaspec.workers.engine import Engine, EngineConfig, Request, Result
from metaspec.workers.model import ModelConfig
from metaspec.workers.store import (AdjacencyTable, Keys, NgramConfig, NgramTable, RedisConfig, SharedTables,
                                    StoreConfig, fingerprint, pack, read_corpus, remote_stats, seed, unpack)
from metaspec.workers.store.ngram import add_count, merge_rows, row_from_bytes
from metaspec.workers.store.sync import make_client
from metaspec.workers.types import SamplingParams
from ..conftest import free_port

REDIS_BIN = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_BIN is None, reason="redis-server is not installed")




class RedisServer:
    """A throwaway redis-server without persistence: a restart comes back empty."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen([REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(200):  # readiness, not a timing assertion
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture
def server():
    srv = RedisServer().start()
    yield srv
    srv.kill()


def tables_for(url: str | None, fp: str = "fp-test", vocab: int = 64, **store) -> SharedTables:
    cfg = StoreConfig(redis=RedisConfig(url=url, backoff_initial_s=0.05, backoff_max_s=0.2),
                      sync_interval_s=3600, **store)  # tests sync explicitly with flush()
    return SharedTables(cfg, fp, vocab)


# -- values ------------------------------------------------------------------------------------------------------

def test_packed_arrays_round_trip_through_redis(server):
    values = [0, 1, -1, 2**31 - 1, -(2**31), 8191]
    r = server.client()
    r.set("x", pack(values))
    assert unpack(r.get("x")) == values
    assert unpack(pack([])) == [] and unpack(None) == []
    assert unpack(b"\x01\x02\x03") == []          # not a whole int32: rejected, not guessed
    assert pack([1]) == b"\x01\x00\x00\x00"                 # little-endian on every host


def test_rows_stay_sorted_and_capped():
    row: list[int] = []
    for token in [5, 6, 6, 7, 8, 6, 9]:
        add_count(row, token, 1, cap=3)
    assert row[0::2][0] == 6 and row[1] == 3 and len(row) == 6
    assert merge_rows([1, 4, 2, 1], {2: 5, 3: 1}, cap=2) == [2, 6, 1, 4]
    assert row_from_bytes(pack([1, 4, 2, 1]), vocab_size=10, cap=8) == [1, 4, 2, 1]
    for bad in (pack([1, 4, 2]), pack([11, 1]), pack([1, 0]), pack([-1, 3]), b"\x00"):
        assert row_from_bytes(bad, vocab_size=10, cap=8) is None


def test_ngram_prefers_the_longest_context_and_learns_only_emitted():
    table = NgramTable(NgramConfig(max_order=3), vocab_size=100)
    table.learn([1, 2], [3, 1, 2, 4])             # prompt [1, 2] is context only
    table.learn([], [9, 2, 5, 2, 5])
    assert table.continuations([1, 2]) == [3, 4]  # (1, 2) seen before 3 and 4; (2,) alone would rank 5 first
    assert table.continuations([7, 2]) == [5, 3, 4]
    assert table.continuations([42]) == []
    assert (1,) not in table.rows or table.rows[(1,)][0::2] == [2]  # 1 -> 2 was emitted; the prompt's 1 -> 2 too
    assert table.stats()["learned_tokens"] == 9
    fresh = NgramTable(NgramConfig(), vocab_size=100)
    fresh.learn([1, 2, 3], [4])
    assert set(fresh.rows) == {(3,), (2, 3), (1, 2, 3)}  # prompt-internal n-grams are never learned


def test_adjacency_rows_are_the_targets_top_k():
    table = AdjacencyTable(vocab_size=16, k=3)
    logits = torch.arange(32, dtype=torch.float32).view(2, 16)
    logits[1] = -logits[1]
    table.update([4, 9], logits)
    assert table.next_tokens(4) == [15, 14, 13] and table.next_tokens(9) == [0, 1, 2]
    assert table.next_tokens(5) == [] and table.next_tokens(99) == []


def test_reset_empties_local_tables_and_refuses_shared_ones():
    tables = SharedTables(StoreConfig(redis=RedisConfig(url=None)), fingerprint="reset", vocab_size=16)
    try:
        tables.ngram.learn([1, 2], [3, 4])
        tables.adjacency.update([4], torch.arange(16, dtype=torch.float32).view(1, 16))
        assert tables.reset() == {"ngram": 5, "adjacency": 1}
        assert tables.ngram.continuations([1, 2]) == [] and tables.adjacency.next_tokens(4) == []
        assert not tables.ngram.pending and not tables.adjacency.pending
        tables.ngram.learn([1, 2], [3])                 # learns again from empty
        assert tables.ngram.continuations([1, 2]) == [3]
    finally:
        tables.close()
    shared = SharedTables(StoreConfig(redis=RedisConfig(url="redis://127.0.0.1:1/0")), "reset", 16)
    try:
        with pytest.raises(ValueError, match="replica-local"):
            shared.reset()                              # other replicas would re-seed the namespace
    finally:
        shared.close()


def test_corpus_seeding(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("1 2 3 1 2 4\n\n7 8 9\n")
    table = NgramTable(NgramConfig(), vocab_size=10)
    assert seed(table, read_corpus(path)) == 9
    assert table.continuations([1, 2]) == [3, 4]
    (tmp_path / "c.jsonl").write_text('{"ids": [5, 6]}\n{"text": "hello"}\n')
    with pytest.raises(ValueError, match="tokenizer"):
        list(read_corpus(tmp_path / "c.jsonl"))


# -- sync ----------------------------------------------------------------------------------------------------------

def test_two_workers_share_both_tables(server):
    a, b = tables_for(server.url), tables_for(server.url)
    try:
        a.ngram.learn([1, 2], [3, 4, 5])
        a.adjacency.update([7], torch.arange(64.0)[None])
        assert a.flush() and b.flush()                        # b's first sync: full pull
        assert b.ngram.continuations([1, 2]) == [3] and b.adjacency.next_tokens(7) == list(range(63, 55, -1))
        b.ngram.learn([1, 2], [6, 6])                        # both learn, both push: counts add up
        a.ngram.learn([1, 2], [3])
        assert b.flush() and a.flush() and b.flush()         # later syncs follow the change feed
        assert a.ngram.rows[(1, 2)] == b.ngram.rows[(1, 2)] == [3, 2, 6, 1]
        assert a.stats()["redis"]["connected"] and a.stats()["ngram"]["pushed"] > 0
    finally:
        a.close(), b.close()


def test_namespaces_never_mix(server, tmp_path):
    a, other = tables_for(server.url, fp="model-a"), tables_for(server.url, fp="model-b")
    try:
        a.ngram.learn([], [1, 2, 3])
        a.adjacency.update([1], torch.arange(64.0)[None])
        assert a.flush() and other.flush()
        assert other.ngram.rows == {} and other.adjacency.next_tokens(1) == []
        keys = {k.decode() for k in server.client().keys("*")}
        assert keys - {other.keys.meta} and all(k.startswith(a.keys.ns + ":") for k in keys - {other.keys.meta})
    finally:
        a.close(), other.close()
    for name in ("m1", "m2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"model_type": "llama"}')
        (tmp_path / name / "tokenizer.json").write_text('{"v": "%s"}' % name)
    assert fingerprint(tmp_path / "m1") != fingerprint(tmp_path / "m2")
    assert fingerprint(tmp_path / "m1") == fingerprint(tmp_path / "m1")
    assert Keys.for_fingerprint("x").ns != Keys.for_fingerprint("y").ns


def test_caps_hold_locally_and_in_redis(server):
    cap_ctx, cap_cont = 50, 3
    a = tables_for(server.url, ngram=NgramConfig(max_order=2, max_continuations=cap_cont, max_contexts=cap_ctx))
    try:
        rng = np.random.default_rng(0)
        for _ in range(5):
            a.ngram.learn([], rng.integers(0, 64, 200).tolist())
            assert a.flush()
        r, keys = server.client(), a.keys
        assert len(a.ngram.rows) <= cap_ctx and r.hlen(keys.ngram) <= cap_ctx and r.zcard(keys.ngram_lru) <= cap_ctx
        assert all(len(row) <= 2 * cap_cont for row in a.ngram.rows.values())
        assert all(len(unpack(v)) <= 2 * cap_cont for v in r.hvals(keys.ngram))
        assert all(0 < r.ttl(k) <= a.cfg.ttl_s for k in (keys.ngram, keys.ngram_lru, keys.feed, keys.meta))
    finally:
        a.close()


def test_malformed_remote_values_are_dropped(server):
    a = tables_for(server.url)
    try:
        r = server.client()
        r.hset(a.keys.ngram, mapping={pack([1]): b"garbage", pack([2]): pack([3, 1]), b"xyz": pack([3, 1]),
                                      pack([4]): pack([999, 1])})
        r.hset(a.keys.adjacency(8), mapping={pack([5]): pack([1, 2]), pack([6]): pack([1] * 8)})
        assert a.flush()
        assert set(a.ngram.rows) == {(2,)}
        assert a.adjacency.next_tokens(5) == [] and a.adjacency.next_tokens(6) == [1] * 8
    finally:
        a.close()


def test_a_trimmed_feed_triggers_a_full_resync(server):
    a, b = tables_for(server.url), tables_for(server.url)
    try:
        assert b.flush()
        for i in range(3):
            a.ngram.learn([], [10 + i, 20 + i])
            assert a.flush()
        server.client().xtrim(a.keys.feed, maxlen=1, approximate=False)   # b missed two feed entries
        assert b.flush()
        assert [b.ngram.continuations([10 + i]) for i in range(3)] == [[20], [21], [22]]
    finally:
        a.close(), b.close()


def test_unreachable_at_start_then_reconnects():
    srv = RedisServer()               # nothing listens on this port yet
    a = tables_for(srv.url)
    try:
        a.ngram.learn([], [1, 2, 3])
        assert not a.flush() and a.stats()["redis"]["errors"] >= 1
        assert a.ngram.continuations([1]) == [2]          # local copy serves meanwhile
        srv.start()
        assert a.flush()
        assert row_from_bytes(srv.client().hget(a.keys.ngram, pack([1])), 64, 8) == [2, 1]
    finally:
        a.close()
        srv.kill()


# -- credentials and TLS --------------------------------------------------------------------------------------

def test_a_password_never_shows_in_reprs_logs_or_stats(caplog):
    srv = RedisServer()               # nothing listens: the syncer fails and logs it
    cfg = RedisConfig(url=f"redis://app:url-secret@127.0.0.1:{srv.port}/0", password="cfg-secret")
    shown = repr(cfg) + str(cfg) + repr(StoreConfig(redis=cfg))
    assert "url-secret" not in shown and "cfg-secret" not in shown and "app:***@127.0.0.1" in shown
    tables = SharedTables(StoreConfig(redis=cfg, sync_interval_s=3600), "fp-test", 64)
    try:
        with caplog.at_level("DEBUG"):
            assert not tables.flush()
        seen = caplog.text + repr(tables.stats()) + repr(tables.syncer.link.client())
        assert tables.stats()["redis"]["errors"] >= 1 and "Redis unavailable" in caplog.text
        assert "url-secret" not in seen and "cfg-secret" not in seen
    finally:
        tables.close()


def test_the_configs_password_wins_and_authenticates(server):
    server.client().config_set("requirepass", "right")
    try:
        wrong_in_url = RedisConfig(url=f"redis://:wrong@127.0.0.1:{server.port}/0", password="right")
        assert make_client(wrong_in_url).ping()
        with pytest.raises(redis.AuthenticationError):
            make_client(RedisConfig(url=f"redis://:wrong@127.0.0.1:{server.port}/0")).ping()
    finally:
        redis.Redis(port=server.port, password="right").config_set("requirepass", "")


@pytest.mark.parametrize("url,tls", [("rediss://cache.internal:6380/2", False), ("redis://cache.internal:6380/2", True)])
def test_tls_settings_reach_redis_py(url, tls):
    cfg = RedisConfig(url=url, tls=tls, tls_ca_file="/etc/ca.pem", tls_cert_file="/etc/client.pem",
                      tls_key_file="/etc/client.key", tls_check_hostname=False, password="pw")
    kwargs = make_client(cfg).connection_pool.connection_kwargs
    assert make_client(cfg).connection_pool.connection_class is redis.connection.SSLConnection
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == ("cache.internal", 6380, 2, "pw")
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == \
        ("/etc/ca.pem", "/etc/client.pem", "/etc/client.key")
    assert kwargs["ssl_cert_reqs"] == "required" and kwargs["ssl_check_hostname"] is False
    plain = make_client(RedisConfig(url="redis://cache.internal:6380/2")).connection_pool
    assert plain.connection_class is redis.connection.Connection and "ssl_ca_certs" not in plain.connection_kwargs


def test_tls_is_really_spoken(server):
    """The same plain-text server: a redis:// client gets PONG, a TLS client's handshake gets no answer."""
    assert make_client(RedisConfig(url=server.url)).ping()
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        make_client(RedisConfig(url=server.url, tls=True)).ping()


def test_tls_files_without_tls_and_unknown_schemes_are_config_errors():
    with pytest.raises(ValueError, match="not TLS"):
        RedisConfig(url="redis://cache:6379/0", tls_ca_file="/etc/ca.pem")
    with pytest.raises(ValueError, match="rediss://") as info:
        RedisConfig(url="http://user:pw-secret@cache:6379")
    assert "pw-secret" not in str(info.value)


# -- engines ----------------------------------------------------------------------------------------------------

def _engine_with_tables(target: str, url: str | None, fp: str = "fp-test") -> tuple[Engine, SharedTables]:
    engine = Engine(EngineConfig(target=ModelConfig(target), default_method="ar"))
    tables = tables_for(url, fp=fp, vocab=engine.target.vocab_size)
    engine.resources.update(tables.resources())
    return engine, tables


PROMPTS = ["def add(a, b):\n    return a + b\n\ndef", "The capital of France is Paris. The capital of",
           "for i in range(10):\n    print(i)\nfor", "Question: what is 2 + 2? Answer:"]


def test_redis_killed_mid_request_loses_nothing(server, tiny_pair):
    engine, tables = _engine_with_tables(tiny_pair.target, server.url)
    try:
        params = SamplingParams(max_tokens=32, ignore_eos=True)
        want = [engine.generate(Request(prompt=p, params=params, method="ar")).token_ids for p in PROMPTS]
        for method in ("ngram_store", "recycling"):
            assert engine.generate(Request(prompt=PROMPTS[0], params=params, method=method)).token_ids == want[0]
        assert tables.flush()
        got = {}
        for i, prompt in enumerate(PROMPTS):
            method = ("ngram_store", "recycling")[i % 2]
            for n, item in enumerate(engine.stream(Request(prompt=prompt, params=params, method=method))):
                if n == 2 and i == 1:                 # mid-request: kill the server and make the syncer notice
                    server.kill()
                    assert not tables.flush()
                    tables.syncer.request()
                if isinstance(item, Result):
                    got[prompt] = item
        assert [got[p].token_ids for p in PROMPTS] == want and all(r.stats.fallback is None for r in got.values())
        assert tables.stats()["redis"]["errors"] >= 1 and not tables.stats()["redis"]["connected"]
        server.start()                                # back, empty: the worker re-seeds it from its local copy
        assert tables.flush()
        r = server.client()
        assert r.hlen(tables.keys.ngram) == len(tables.ngram.rows) > 0 and r.hlen(tables.keys.adjacency(8)) > 0
    finally:
        tables.close()


def _serve(target: str, url: str, fp: str, prompts: list[str], method: str, out) -> None:
    """One worker process: pull the shared tables, serve `prompts` with `method`, push, report acceptance."""
    torch.set_num_threads(1)
    engine, tables = _engine_with_tables(target, url, fp)
    tables.flush()
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    results = [engine.generate(Request(prompt=p, params=params, method=method)) for p in prompts]
    tables.close()
    out.put([(r.stats.drafted, r.stats.accepted, r.stats.steps) for r in results])


def _run_worker(*args) -> list[tuple[int, int, int]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(*args, out))
    proc.start()
    result = out.get(timeout=300)
    proc.join(60)
    assert proc.exitcode == 0
    return result


@pytest.mark.parametrize("first_method", ["ngram_store", "ar"])
def test_second_worker_drafts_better_after_the_first_served_related_prompts(server, tiny_pair, first_method):
    """Whatever arm served the first worker's requests (`ar` drafts nothing), their emitted tokens teach the
    shared table at request end, and the second worker's ngram_store drafts from them."""
    first = [f"{p} {suffix}" for p in PROMPTS for suffix in ("x", "y")]
    related = [f"{p} {suffix}" for p in PROMPTS for suffix in ("z",)]
    fp = uuid.uuid4().hex[:12]
    cold = _run_worker(tiny_pair.target, server.url, "cold-" + fp, related, "ngram_store")   # empty namespace
    _run_worker(tiny_pair.target, server.url, fp, first, first_method)
    warm = _run_worker(tiny_pair.target, server.url, fp, related, "ngram_store")
    cold_steps, warm_steps = sum(s for _, _, s in cold), sum(s for _, _, s in warm)
    cold_acc, warm_acc = sum(a for _, a, _ in cold), sum(a for _, a, _ in warm)
    print("cold", cold, "warm", warm)
    assert warm_acc > cold_acc and warm_steps < cold_steps, (cold, warm)


def test_stats_report_sizes_hits_and_acceptance(server):
    a = tables_for(server.url)
    try:
        a.ngram.learn([], [1, 2, 3, 1, 2])
        a.ngram.record(drafted=4, accepted=3, hit=True)
        a.ngram.record(drafted=0, accepted=0, hit=False)
        a.adjacency.update([1, 2], torch.randn(2, 64))
        assert a.flush()
        local = a.stats()
        assert local["ngram"]["hit_rate"] == 0.5 and local["ngram"]["acceptance_rate"] == 0.75
        assert local["ngram"]["contexts"] == len(a.ngram.rows) and local["adjacency"]["rows"] == 2
        remote = remote_stats(a.cfg, "fp-test")
        assert remote["ngram_contexts"] == len(a.ngram.rows) and remote["adjacency_rows"] == 2
        assert remote["feed_entries"] == 2 and remote["bytes"]["ngram"] > 0
    finally:
        a.close()
