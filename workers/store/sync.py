"""Background sync of local tables with Redis: push pending changes, follow the change feed, back off on failure.

A decode step never touches Redis: lookups and learning use the local copy, and this thread (woken at request
start and every `sync_interval_s`) pushes with pipelined writes and pulls other workers' changes. Redis down at
start or killed mid-run: tables keep working locally, deltas stay pending (bounded), the link retries with
exponential backoff and, when the server comes back empty, re-seeds it from the local copy.

Hostile contents: each step of a round (epoch, each table's push, the pull) fails on its own, so a push that
Redis refuses does not stop the pull and the other way round; a key of the wrong type in the namespace is deleted
(counted in `repaired_keys`) so sharing resumes; a malformed row, key or feed entry is skipped and counted by
its table. Redis 5 and 6 work (6 lacks XINFO's `entries-added`: a trimmed feed then always means a full pull);
older servers are refused at the first connection with a logged error, and the tables stay local.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from .keys import MIN_REDIS_VERSION, Keys, RedisConfig, StoreConfig

log = logging.getLogger(__name__)


def connection_kwargs(cfg: RedisConfig) -> dict:
    """redis-py ConnectionPool arguments: the URL's own, then the config's (credentials, TLS, timeouts) on top.

    >>> kw = connection_kwargs(RedisConfig(url="redis://cache:6380/1", tls=True, tls_ca_file="/etc/ca.pem"))
    >>> kw["connection_class"].__name__, kw["host"], kw["ssl_ca_certs"], kw["ssl_cert_reqs"]
    ('SSLConnection', 'cache', '/etc/ca.pem', 'required')
    """
    from redis.backoff import ExponentialBackoff
    from redis.connection import parse_url
    from redis.retry import Retry

    url = cfg.url
    if cfg.uses_tls and url.startswith("redis://"):
        url = "rediss://" + url[len("redis://"):]
    kwargs = parse_url(url)                    # scheme -> connection class (rediss: SSLConnection), host, db...
    kwargs |= {k: v for k, v in (("username", cfg.username), ("password", cfg.password)) if v is not None}
    if cfg.uses_tls:
        kwargs |= {"ssl_cert_reqs": "required", "ssl_check_hostname": cfg.tls_check_hostname,
                   "ssl_ca_certs": cfg.tls_ca_file, "ssl_certfile": cfg.tls_cert_file, "ssl_keyfile": cfg.tls_key_file}
    # Retry: a pooled connection the server dropped (restart) reconnects and the command runs again; anything
    # longer is the link's backoff, so the hot path never waits
    retry = Retry(ExponentialBackoff(cap=cfg.connect_timeout_s, base=0.05), cfg.retries)
    return kwargs | {"socket_connect_timeout": cfg.connect_timeout_s, "socket_timeout": cfg.timeout_s,
                     "retry": retry, "health_check_interval": 0}


def make_client(cfg: RedisConfig):
    """A redis-py client with short timeouts and `cfg.retries` reconnecting retries (the link owns backoff)."""
    import redis

    return redis.Redis(connection_pool=redis.ConnectionPool(**connection_kwargs(cfg)))


class RedisLink:
    """The connection and its health: `client()` is None while backing off after a failure."""

    def __init__(self, cfg: RedisConfig) -> None:
        self.cfg = cfg
        self._client = None
        self.connected = False
        self.retry_at = 0.0
        self.backoff_s = cfg.backoff_initial_s
        self.errors, self.last_error = 0, ""
        self.refused: str | None = None   # why this server is not used at all (too old); None = it is fine
        self._checked = False

    def client(self):
        if self.cfg.url is None or self.refused or time.monotonic() < self.retry_at:
            return None
        if self._client is None:
            self._client = make_client(self.cfg)
        return self._client

    def succeeded(self) -> None:
        self.connected, self.backoff_s = True, self.cfg.backoff_initial_s

    def check_version(self, r) -> bool:
        """Once per link: False (and `refused` set, logged) when the server is older than MIN_REDIS_VERSION."""
        import redis

        if self._checked:
            return True
        try:
            version = str(r.info("server").get("redis_version", "0"))
        except redis.ResponseError:   # INFO not allowed for this ACL user: the first round will tell
            self._checked = True
            return True
        parts = tuple(int(x) if x.isdigit() else 0 for x in version.split(".")[:2])
        self._checked = True
        if parts < MIN_REDIS_VERSION:
            self.refused = (f"Redis {version} is too old for the shared tables (they need Redis "
                            f">= {'.'.join(map(str, MIN_REDIS_VERSION))}: streams); serving from local tables only")
            log.error("shared tables: %s", self.refused)
            return False
        return True

    def failed(self, exc: BaseException) -> None:
        if self.connected or not self.errors:
            log.warning("shared tables: Redis unavailable (%s); serving from the local copy", exc)
        self.connected = False
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.retry_at = time.monotonic() + self.backoff_s
        self.backoff_s = min(self.cfg.backoff_max_s, self.backoff_s * 2)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _stream_id(value) -> tuple[int, int]:
    ms, _, seq = (value.decode() if isinstance(value, bytes) else value).partition("-")
    return int(ms), int(seq or 0)


def _feed_gap(info: dict | None, last_id: bytes, ordinal: int | None) -> bool:
    """True when entries after last_id may have been trimmed away (then only a full pull is exact).

    Trimming removes the oldest entries; if the oldest kept entry is newer than last_id, the feed has lost
    some entry after it unless every entry added since is still there (entries-added - ordinal <= length).
    Without entries-added (Redis 6) that cannot be told, so it counts as a gap.
    """
    if info is None or not info.get("first-entry"):
        return False
    if _stream_id(info["first-entry"][0]) <= _stream_id(last_id):
        return False
    added = info.get("entries-added")
    return ordinal is None or added is None or added - ordinal > info["length"]


# what each key of a namespace must be; anything else there is deleted so that sharing resumes
_KEY_TYPES = {"meta": b"hash", "feed": b"stream", "ngram": b"hash", "ngram_lru": b"zset", "adjacency": b"hash"}


def _is_transient(exc: BaseException) -> bool:
    """A network or server-availability failure (back off), as opposed to a refusal of one step's data."""
    import redis

    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith(("LOADING", "BUSY", "MASTERDOWN")))


class Syncer:
    """Owns the background thread that keeps `tables` (each with push/pull_keys/pull_all/feed_keys) in sync."""

    def __init__(self, cfg: StoreConfig, keys: Keys, tables: list, worker: str) -> None:
        self.cfg, self.keys, self.tables, self.worker = cfg, keys, {t.name: t for t in tables}, worker
        self.link = RedisLink(cfg.redis)
        self.epoch: bytes | None = None       # the namespace's epoch when we last synced
        self.last_id: bytes | None = None     # last feed entry applied (None = full pull needed)
        self.ordinal: int | None = None       # the feed's entries-added count at last_id, when known
        self.syncs = 0
        self.step_errors: dict[str, int] = {}  # failed steps by name (epoch, push:<table>, pull)
        self.last_step_error = ""
        self.repaired_keys = 0                # wrong-typed keys deleted from the namespace
        self.skipped_feed_entries = 0         # feed entries that are not ours to read (foreign, malformed)
        self._lock = threading.Lock()         # one sync at a time (background thread or flush)
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = None
        if cfg.redis.url is not None:
            self._thread = threading.Thread(target=self._run, name="metaspec-tables-sync", daemon=True)
            self._thread.start()

    def request(self) -> None:
        """Ask for a sync soon (non-blocking)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.cfg.sync_interval_s)
            self._wake.clear()
            if not self._stop.is_set():
                self.sync()

    def sync(self, force: bool = False) -> bool:
        """One push + pull round; False if Redis is unavailable or a step failed (recorded, nothing raises).

        `force` tries now even while backing off (flush at shutdown, tests). Each step (epoch, every table's push,
        the pull) fails on its own; a connection failure ends the round and backs off.
        """
        with self._lock:
            if force:
                self.link.retry_at = 0.0
            r = self.link.client()
            if r is None:
                return False
            steps = [("epoch", self._check_epoch)]
            steps += [(f"push:{name}", self._pusher(table)) for name, table in self.tables.items()]
            steps += [("pull", self._pull)]
            ok = True
            try:
                if not self.link.check_version(r):
                    return False
                for name, step in steps:
                    ok &= self._step(r, name, step)
            except Exception as exc:  # any Redis/socket failure: keep serving locally, retry later
                self.link.failed(exc)
                return False
            self.link.succeeded()
            self.syncs += 1
            return ok

    def _pusher(self, table):
        return lambda r: table.push(r, self.keys, self.cfg, self.worker)

    def _step(self, r, name: str, step) -> bool:
        """Run one step; a transient failure propagates (ends the round), any other is counted and repaired."""
        try:
            step(r)
            return True
        except Exception as exc:  # noqa: BLE001 - hostile contents must never stop the other steps
            if _is_transient(exc):
                raise
            self.step_errors[name] = self.step_errors.get(name, 0) + 1
            self.last_step_error = f"{name}: {type(exc).__name__}: {exc}"
            log.warning("shared tables: %s failed (%s); the other steps go on", name, exc)
            if "WRONGTYPE" in str(exc):
                self._repair(r)
            return False

    def _repair(self, r) -> None:
        """Delete keys of this namespace that hold the wrong type (written by something else); they are rebuilt."""
        names = {"meta": self.keys.meta, "feed": self.keys.feed, "ngram": self.keys.ngram,
                 "ngram_lru": self.keys.ngram_lru, "adjacency": self.keys.adjacency(self.cfg.adjacency_k)}
        pipe = r.pipeline(transaction=False)
        for key in names.values():
            pipe.type(key)
        kinds = pipe.execute()
        wrong = [key for (role, key), kind in zip(names.items(), kinds) if kind not in (b"none", _KEY_TYPES[role])]
        if wrong:
            log.warning("shared tables: deleting %s (wrong type for the namespace)", ", ".join(wrong))
            r.delete(*wrong)
            self.repaired_keys += len(wrong)
            for table in self.tables.values():
                table.mark_all_dirty()
            self.last_id = None

    def _check_epoch(self, r) -> None:
        """A namespace that vanished (server restarted empty, flushed, expired) gets our local rows back."""
        pipe = r.pipeline(transaction=True)
        pipe.hsetnx(self.keys.meta, "epoch", uuid.uuid4().hex)
        pipe.hget(self.keys.meta, "epoch")
        pipe.expire(self.keys.meta, self.cfg.ttl_s)
        epoch = pipe.execute()[1]
        if not isinstance(epoch, bytes) or not 0 < len(epoch) <= 64:   # not an epoch we write: replace it
            epoch = uuid.uuid4().hex.encode()
            r.hset(self.keys.meta, "epoch", epoch)
            self.repaired_keys += 1
        if self.epoch is not None and epoch != self.epoch:
            log.warning("shared tables: namespace %s was recreated; re-seeding it from the local copy", self.keys.ns)
            for table in self.tables.values():
                table.mark_all_dirty()
            self.last_id = None
        self.epoch = epoch

    def _pull(self, r) -> None:
        info = self._feed_info(r)
        if self.last_id is not None and _feed_gap(info, self.last_id, self.ordinal):
            self.last_id = None
        if self.last_id is None:  # remember where the feed stands, then read everything
            self._pull_all(r, info, self.tables.values())
            return
        changed, complete = self._read_feed(r)
        if not complete:          # more entries than a feed holds, or more keys than a table: read everything
            self._pull_all(r, info, self.tables.values())
            return
        for name, keys in changed.items():
            if keys:
                self.tables[name].pull_keys(r, self.keys, self.cfg, sorted(keys))
        last_generated = info["last-generated-id"] if info else b"0-0"
        self.ordinal = (info.get("entries-added") if info else 0) if self.last_id == last_generated else None

    def _pull_all(self, r, info: dict | None, tables) -> None:
        self.last_id = info["last-generated-id"] if info else b"0-0"
        self.ordinal = info.get("entries-added") if info else 0
        for table in tables:
            table.pull_all(r, self.keys, self.cfg)

    def _read_feed(self, r) -> tuple[dict[str, set], bool]:
        """Keys other workers changed since last_id, per table; False when the feed holds more than it should."""
        names = {name.encode(): name for name in self.tables}
        changed: dict[str, set] = {name: set() for name in self.tables}
        limit, read = self.cfg.feed_max_entries + self.cfg.batch_keys, 0
        while read <= limit:
            batch = r.xread({self.keys.feed: self.last_id}, count=self.cfg.batch_keys)
            entries = batch[0][1] if batch else []
            for entry_id, fields in entries:
                self.last_id = entry_id
                name, data = names.get(fields.get(b"t")), fields.get(b"k")
                if name is None or not isinstance(data, bytes):
                    self.skipped_feed_entries += 1
                elif fields.get(b"w") != self.worker.encode():
                    changed[name].update(self.tables[name].feed_keys(data, self.cfg))
            read += len(entries)
            if len(entries) < self.cfg.batch_keys:
                break
        too_many = any(len(keys) > self.cfg.ngram.max_contexts for keys in changed.values())
        return changed, read <= limit and not too_many

    def _feed_info(self, r) -> dict | None:
        import redis

        try:
            return r.xinfo_stream(self.keys.feed)
        except redis.ResponseError as exc:  # no such key: nothing was pushed yet
            if "no such key" in str(exc).lower():
                return None
            raise

    def close(self, flush_timeout_s: float = 2.0) -> None:
        """Stop the thread after one last sync attempt (bounded by the link's timeouts)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(flush_timeout_s + self.cfg.redis.timeout_s)
            self.sync(force=True)
        self.link.close()

    def stats(self) -> dict:
        link = self.link
        return {"url_configured": self.cfg.redis.url is not None, "connected": link.connected, "syncs": self.syncs,
                "errors": link.errors, "last_error": link.last_error, "backoff_s": link.backoff_s,
                "refused": link.refused, "step_errors": dict(self.step_errors), "last_step_error": self.last_step_error,
                "repaired_keys": self.repaired_keys, "skipped_feed_entries": self.skipped_feed_entries}
