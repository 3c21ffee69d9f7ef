"""The shared tables against hostile contents of a real Redis: oversized, overflowing, malformed and foreign values,
wrong-typed keys, a Redis 6 or older server, and a restart. The tables keep working, memory stays bounded, the
rest of a batch is never lost, push and pull fail independently, and sharing resumes."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import socket
import struct
import subprocess
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest
import redis

from metaspec.workers.store import RedisConfig, SharedTables, StoreConfig, pack, unpack
from metaspec.workers.store.keys import INT32_MAX, NgramConfig
from metaspec.workers.store.ngram import add_count, merge_rows, pack_contexts, row_from_bytes

REDIS_BIN = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS_BIN is None, reason="redis-server is not installed")
VOCAB = 64


class Server:
    """A throwaway redis-server (no persistence) on a free port; `restart` keeps the port."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "Server":
        self.proc = subprocess.Popen([REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(200):
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture(scope="module")
def server():
    srv = Server().start()
    yield srv
    srv.stop()


@pytest.fixture
def fp():
    return f"hostile-{uuid.uuid4().hex[:8]}"   # a namespace of its own per test


def tables(url: str, fp: str, **store) -> SharedTables:
    cfg = StoreConfig(redis=RedisConfig(url=url), sync_interval_s=3600.0, **store)   # only flush() syncs
    return SharedTables(cfg, fingerprint=fp, vocab_size=VOCAB)


def learned(t: SharedTables, n: int = 20) -> None:
    for i in range(n):
        t.ngram.learn([], [i % VOCAB, (i + 1) % VOCAB, (i + 2) % VOCAB])


def test_nothing_in_the_store_unpickles_or_evaluates():
    for path in Path(__file__).resolve().parents[2].joinpath("workers", "store").glob("*.py"):
        text = path.read_text()
        for call in ("import pickle", "pickle.load", "marshal", "eval(", "exec(", "literal_eval"):
            assert call not in text, (path.name, call)


def test_counts_saturate_instead_of_overflowing_32_bits():
    row = [5, INT32_MAX - 1]
    add_count(row, 5, 10, cap=8)
    assert row == [5, INT32_MAX]
    assert merge_rows([5, INT32_MAX, 6, 3], {5: 2**40, 6: INT32_MAX}, cap=8) == [5, INT32_MAX, 6, INT32_MAX]
    assert unpack(pack(merge_rows([1, INT32_MAX], {1: INT32_MAX}, 8))) == [1, INT32_MAX]


def test_overflowing_remote_counts_saturate_and_push_keeps_working(server, fp):
    a = tables(server.url, fp)
    r = server.client()
    r.hset(a.keys.ngram, pack([1]), pack([2, INT32_MAX - 1]))       # a count about to overflow int32
    for _ in range(5):
        a.ngram.learn([1], [2])
    assert a.flush()
    assert unpack(r.hget(a.keys.ngram, pack([1]))) == [2, INT32_MAX]
    a.ngram.learn([1], [2])
    assert a.flush() and a.stats()["redis"]["step_errors"] == {}
    a.close()


def test_oversized_values_are_skipped_unread_and_memory_stays_bounded(server, fp):
    a = tables(server.url, fp)
    learned(a)
    assert a.flush()
    r = server.client()
    r.hset(a.keys.ngram, pack([60]), b"\x01\x00\x00\x00" * (2 << 20))            # 8 MiB "row"
    r.hset(a.keys.ngram, mapping={pack([61, i]): pack([1, 1] * 2000) for i in range(20)})   # 16 KB rows
    r.hset(a.keys.ngram, pack(list(range(2000))), pack([1, 1]))                   # an 8 KB key
    r.hset(a.keys.adjacency(8), pack([3]), pack([1]) * 100_000)
    r.hset(a.keys.ngram, mapping={os.urandom(12): os.urandom(16) for _ in range(30_000)})   # junk by the many
    b = tables(server.url, fp, ngram=NgramConfig(max_contexts=5_000))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    assert b.flush()
    after, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert after - before < 8 << 20                        # the 8 MiB value and the junk are not kept
    stats = b.stats()
    assert stats["ngram"]["contexts"] <= 5_000 and stats["ngram"]["malformed"] >= 22
    assert stats["adjacency"]["malformed"] == 1
    assert b.ngram.following([0]) == a.ngram.following([0]) != []                # the real rows arrived
    for t in (a, b):
        t.close()


def _foreign_values() -> dict[str, bytes]:
    class Bomb:
        def __reduce__(self):
            return (os.system, ("touch /tmp/metaspec-store-unpickled",))

    return {"pickle": pickle.dumps(Bomb()), "json": b'{"tok": 1, "count": 2}', "utf16": "1 2 3 4".encode("utf-16"),
            "text": b"hello world!", "odd": b"\x01\x02\x03", "float64": struct.pack("<2d", 1.0, 2.0),
            "negative count": pack([1, -5]), "zero count": pack([1, 0]), "token out of vocab": pack([VOCAB, 3]),
            "negative token": pack([-1, 3]), "repeated token": pack([1, 3, 1, 2]), "odd ints": pack([1, 2, 3])}


def test_malformed_fields_rows_and_feed_entries_are_skipped_and_counted(server, fp):
    a = tables(server.url, fp)
    learned(a)
    assert a.flush()
    b = tables(server.url, fp)
    assert b.flush()                                                             # b follows the feed from here
    learned(a, 40)                                                               # a pushes more
    assert a.flush()
    r = server.client()
    foreign = _foreign_values()
    victim = pack([0])                                                           # one of a's pushed rows
    r.hset(a.keys.ngram, victim, foreign["pickle"])
    r.hset(a.keys.ngram, mapping={b"\x01\x02\x03": pack([1, 1]), pack([1, 2, 3, 4, 5]): pack([1, 1]),
                                  pack([-3]): pack([1, 1]), pack([VOCAB + 1]): pack([1, 1])})
    r.hset(a.keys.adjacency(8), mapping={b"xy": pack([1] * 8), pack([VOCAB]): pack([1] * 8),
                                         pack([4]): pack([VOCAB] * 8), pack([5]): foreign["utf16"]})
    for fields in ({"t": "ngram"}, {"k": pack([1, 0])}, {"t": b"\xff\xfe", "k": b"x"}, {"t": "other", "k": b""},
                   {"t": "ngram", "w": "x", "k": b"\x00" * (2 << 20)}, {"t": "ngram", "w": "x", "k": b"\x01\x02"},
                   {"t": "ngram", "w": "x", "k": pack_contexts([(1,), (VOCAB + 5,), (2, 3)])},
                   {"t": "adjacency", "w": "x", "k": pack([4, 5, VOCAB, -1])}):
        r.xadd(a.keys.feed, fields)
    assert b.flush()                                                             # an incremental round
    stats = b.stats()
    assert stats["redis"]["skipped_feed_entries"] == 4 and stats["redis"]["step_errors"] == {}
    assert stats["ngram"]["malformed"] == 1 and stats["adjacency"]["malformed"] == 2   # victim; rows 4 and 5
    for ctx in ([1], [2], [1, 2], [2, 3]):                                       # the rest of the batch arrived
        assert b.ngram.following(ctx) == a.ngram.following(ctx), ctx
    assert b.ngram.following([0]) != []                    # the poisoned row: the local copy stays as it was
    c = tables(server.url, fp)                                                   # and a full pull of it all
    assert c.flush()
    assert c.stats()["ngram"]["malformed"] >= 5 and c.stats()["adjacency"]["malformed"] >= 4
    assert c.ngram.following([1, 2]) == a.ngram.following([1, 2])
    assert not Path("/tmp/metaspec-store-unpickled").exists()
    for t in (a, b, c):
        t.close()


@pytest.mark.parametrize("name", sorted(_foreign_values()))
def test_every_foreign_encoding_of_a_row_is_refused(name):
    assert row_from_bytes(_foreign_values()[name], VOCAB, cap=8, max_bytes=8192) is None


def test_wrong_typed_keys_are_repaired_and_sharing_resumes(server, fp):
    a = tables(server.url, fp)
    r = server.client()
    keys = a.keys
    r.set(keys.ngram, "not a hash")
    r.rpush(keys.feed, "not", "a", "stream")
    r.set(keys.meta, "x")
    r.hset(keys.ngram_lru, "not", "a zset")
    r.sadd(keys.adjacency(8), "not a hash")
    learned(a)
    a.adjacency.rows[7], _ = [1, 2], a.adjacency.pending.add(7)
    a.flush()                                                                    # steps fail, keys repaired
    stats = a.stats()["redis"]
    assert stats["repaired_keys"] == 5 and sum(stats["step_errors"].values()) >= 1
    assert a.flush()                                                             # sharing resumes
    b = tables(server.url, fp)
    assert b.flush()
    assert b.ngram.following([1]) == a.ngram.following([1]) != [] and b.adjacency.next_tokens(7) == [1, 2]
    for t in (a, b):
        t.close()


def test_a_foreign_epoch_is_replaced_and_everyone_reseeds(server, fp):
    a, b = tables(server.url, fp), tables(server.url, fp)
    learned(a)
    assert a.flush() and b.flush()
    server.client().hset(a.keys.meta, "epoch", b"\0" * (1 << 20))
    server.client().delete(a.keys.ngram)
    assert b.flush() and len(server.client().hget(a.keys.meta, "epoch")) == 32
    assert b.stats()["redis"]["repaired_keys"] == 1
    assert a.flush()                                              # a sees a new epoch and re-seeds its rows
    assert server.client().hlen(a.keys.ngram) == a.stats()["ngram"]["contexts"]
    for t in (a, b):
        t.close()


def test_push_and_pull_fail_independently(server, fp, monkeypatch):
    a, b = tables(server.url, fp), tables(server.url, fp)
    assert a.flush() and b.flush()
    learned(b)
    assert b.flush()                                                             # something for a to pull
    learned(a)

    def refused(*args, **kwargs):
        raise redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'")

    monkeypatch.setattr(a.ngram, "push", refused)
    assert not a.flush()                                                         # the push failed ...
    assert a.ngram.following([1]) == b.ngram.following([1]) != []                # ... the pull still ran
    assert a.stats()["redis"]["step_errors"] == {"push:ngram": 1} and a.stats()["ngram"]["pending"] > 0
    monkeypatch.undo()
    monkeypatch.setattr(a.syncer, "_pull", refused)
    assert not a.flush()                                                         # the pull failed ...
    assert a.stats()["ngram"]["pending"] == 0                                    # ... the push still went out
    monkeypatch.undo()
    assert a.flush() and a.stats()["redis"]["connected"]
    for t in (a, b):
        t.close()


class Redis6:
    """A client whose XINFO STREAM answers like Redis 6 (no entries-added) and whose INFO says so."""

    def __init__(self, client, version: str = "6.2.14") -> None:
        self._client, self._version = client, version

    def xinfo_stream(self, *args, **kwargs):
        info = self._client.xinfo_stream(*args, **kwargs)
        info.pop("entries-added", None)
        info.pop("max-deleted-entry-id", None)
        return info

    def info(self, *args, **kwargs):
        return self._client.info(*args, **kwargs) | {"redis_version": self._version}

    def __getattr__(self, name):
        return getattr(self._client, name)


def _as_server(t: SharedTables, version: str) -> None:
    t.syncer.link._client = Redis6(t.syncer.link.client(), version)


def test_redis_6_without_entries_added_syncs_and_resyncs_a_trimmed_feed(server, fp):
    a, b = tables(server.url, fp, feed_max_entries=4), tables(server.url, fp, feed_max_entries=4)
    for t in (a, b):
        _as_server(t, "6.2.14")
    learned(a, 5)
    assert a.flush() and b.flush()
    assert b.ngram.following([1]) == a.ngram.following([1]) != []
    a.ngram.learn([], [9, 10])
    assert a.flush() and b.flush()                                               # incremental, no KeyError
    assert b.ngram.following([9]) == [10]
    for i in range(200):                                                         # far more than the feed keeps
        a.ngram.learn([], [20 + i % 30, 21 + i % 30])
        assert a.flush()
    assert b.flush() and b.stats()["redis"]["step_errors"] == {}
    assert b.ngram.following([25]) == a.ngram.following([25]) != []              # a full pull caught up
    for t in (a, b):
        t.close()


def test_a_redis_older_than_5_is_refused_at_the_first_connection(server, fp, caplog):
    a = tables(server.url, fp)
    _as_server(a, "4.0.9")
    learned(a)
    with caplog.at_level(logging.ERROR, logger="metaspec.workers.store.sync"):
        assert not a.flush() and not a.syncer.sync(force=True)
    refused = a.stats()["redis"]["refused"]
    assert "Redis 4.0.9 is too old" in refused and ">= 5.0" in refused and "too old" in caplog.text
    assert server.client().exists(a.keys.meta, a.keys.ngram) == 0                # nothing was written
    assert a.ngram.following([1]) != []                                          # local tables still serve
    a.close()


def test_a_restarted_server_is_picked_up_by_the_next_round(fp):
    srv = Server().start()
    try:
        a = tables(srv.url, fp)
        learned(a)
        assert a.flush()
        srv.stop()
        srv.start()                                                              # same port, empty
        a.ngram.learn([], [1, 2])
        assert a.flush()                                                         # re-seeded at once
        assert a.stats()["redis"]["errors"] == 0 and srv.client().hlen(a.keys.ngram) > 0
        a.close()
    finally:
        srv.stop()


@pytest.mark.parametrize("retries, survives", [(1, True), (0, False)])
def test_a_connection_dropped_mid_command_is_retried_by_redis_py(server, fp, monkeypatch, retries, survives):
    from redis.connection import Connection

    a = SharedTables(StoreConfig(redis=RedisConfig(url=server.url, retries=retries), sync_interval_s=3600.0),
                     fingerprint=fp, vocab_size=VOCAB)
    assert a.flush()
    real, drops = Connection.send_packed_command, [1]

    def dropped_once(self, command, check_health=True):
        if drops:
            drops.pop()
            self.disconnect()
            raise redis.ConnectionError("Connection reset by peer (injected)")
        return real(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", dropped_once)
    learned(a)
    assert a.flush() is survives and (a.stats()["redis"]["errors"] == 0) is survives
    a.close()


def test_random_hostile_contents_never_stop_a_round(server):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    blobs = st.binary(max_size=64)

    @hypothesis.settings(max_examples=25, deadline=None)
    @hypothesis.given(ngram=st.dictionaries(blobs, blobs, max_size=12),
                      adjacency=st.dictionaries(blobs, blobs, max_size=12),
                      feed=st.lists(st.dictionaries(st.sampled_from([b"t", b"w", b"k", b"x"]),
                                                    st.one_of(blobs, st.sampled_from([b"ngram", b"adjacency"])),
                                                    min_size=1, max_size=4), max_size=8))
    def check(ngram, adjacency, feed):
        fp = f"fuzz-{uuid.uuid4().hex[:8]}"
        a, b = tables(server.url, fp), tables(server.url, fp)
        learned(a, 5)
        assert a.flush() and b.flush()
        r = server.client()
        if ngram:
            r.hset(a.keys.ngram, mapping=ngram)
        if adjacency:
            r.hset(a.keys.adjacency(8), mapping=adjacency)
        for fields in feed:
            r.xadd(a.keys.feed, fields)
        learned(a, 8)
        assert a.flush() and b.flush()
        c = tables(server.url, fp)
        assert c.flush()
        for t in (b, c):
            assert t.stats()["redis"]["step_errors"] == {}
            assert t.ngram.continuations([0, 1, 2]) is not None
        for t in (a, b, c):
            t.close()

    check()
