"""Background sync of local tables with Redis: push pending changes, follow the change feed, back off on failure.

A decode step never touches Redis: lookups and learning use the local copy, and this thread (woken at request
start and every `sync_interval_s`) pushes with pipelined writes and pulls other workers' changes. Redis down at
start or killed mid-run: tables keep working locally, deltas stay pending (bounded), the link retries with
exponential backoff and, when the server comes back empty, re-seeds it from the local copy.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from .keys import Keys, RedisConfig, StoreConfig

log = logging.getLogger(__name__)


def connection_kwargs(cfg: RedisConfig) -> dict:
    """redis-py ConnectionPool arguments: the URL's own, then the config's (credentials, TLS, timeouts) on top.

    >>> kw = connection_kwargs(RedisConfig(url="redis://cache:6380/1", tls=True, tls_ca_file="/etc/ca.pem"))
    >>> kw["connection_class"].__name__, kw["host"], kw["ssl_ca_certs"], kw["ssl_cert_reqs"]
    ('SSLConnection', 'cache', '/etc/ca.pem', 'required')
    """
    from redis.backoff import NoBackoff
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
    return kwargs | {"socket_connect_timeout": cfg.connect_timeout_s, "socket_timeout": cfg.timeout_s,
                     "retry": Retry(NoBackoff(), 0), "health_check_interval": 0}


def make_client(cfg: RedisConfig):
    """A redis-py client with short timeouts and no internal retries (the link owns the retry policy)."""
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

    def client(self):
        if self.cfg.url is None or time.monotonic() < self.retry_at:
            return None
        if self._client is None:
            self._client = make_client(self.cfg)
        return self._client

    def succeeded(self) -> None:
        self.connected, self.backoff_s = True, self.cfg.backoff_initial_s

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
    """
    if info is None or not info.get("first-entry"):
        return False
    if _stream_id(info["first-entry"][0]) <= _stream_id(last_id):
        return False
    return ordinal is None or info["entries-added"] - ordinal > info["length"]


class Syncer:
    """Owns the background thread that keeps `tables` (each with push/pull_keys/pull_all/feed_keys) in sync."""

    def __init__(self, cfg: StoreConfig, keys: Keys, tables: list, worker: str) -> None:
        self.cfg, self.keys, self.tables, self.worker = cfg, keys, {t.name: t for t in tables}, worker
        self.link = RedisLink(cfg.redis)
        self.epoch: bytes | None = None       # the namespace's epoch when we last synced
        self.last_id: bytes | None = None     # last feed entry applied (None = full pull needed)
        self.ordinal: int | None = None       # the feed's entries-added count at last_id, when known
        self.syncs = 0
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
        """One push + pull round; False if Redis is unavailable (the error is recorded, nothing raises).

        `force` tries now even while backing off (flush at shutdown, tests).
        """
        with self._lock:
            if force:
                self.link.retry_at = 0.0
            r = self.link.client()
            if r is None:
                return False
            try:
                self._check_epoch(r)
                for table in self.tables.values():
                    table.push(r, self.keys, self.cfg, self.worker)
                self._pull(r)
            except Exception as exc:  # any Redis/socket failure: keep serving locally, retry later
                self.link.failed(exc)
                return False
            self.link.succeeded()
            self.syncs += 1
            return True

    def _check_epoch(self, r) -> None:
        """A namespace that vanished (server restarted empty, flushed, expired) gets our local rows back."""
        pipe = r.pipeline(transaction=True)
        pipe.hsetnx(self.keys.meta, "epoch", uuid.uuid4().hex)
        pipe.hget(self.keys.meta, "epoch")
        pipe.expire(self.keys.meta, self.cfg.ttl_s)
        epoch = pipe.execute()[1]
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
            self.last_id = info["last-generated-id"] if info else b"0-0"
            self.ordinal = info["entries-added"] if info else 0
            for table in self.tables.values():
                table.pull_all(r, self.keys, self.cfg)
            return
        changed: dict[str, set] = {name: set() for name in self.tables}
        while True:
            batch = r.xread({self.keys.feed: self.last_id}, count=self.cfg.batch_keys)
            entries = batch[0][1] if batch else []
            for entry_id, fields in entries:
                self.last_id = entry_id
                table = self.tables.get(fields.get(b"t", b"").decode())
                if table is not None and fields.get(b"w", b"").decode() != self.worker:
                    changed[table.name].update(table.feed_keys(fields.get(b"k", b"")))
            if len(entries) < self.cfg.batch_keys:
                break
        for name, keys in changed.items():
            if keys:
                self.tables[name].pull_keys(r, self.keys, self.cfg, sorted(keys))
        last_generated = info["last-generated-id"] if info else b"0-0"
        self.ordinal = (info["entries-added"] if info else 0) if self.last_id == last_generated else None

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
                "errors": link.errors, "last_error": link.last_error, "backoff_s": link.backoff_s}
