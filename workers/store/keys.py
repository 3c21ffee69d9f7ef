"""Naming and encoding of the shared tables in Redis: config, fingerprint namespace, packed int32 arrays.

Every value is a little-endian int32 array (`pack`/`unpack`); nothing is pickled or evaluated, a value is
size-checked before it is unpacked, and a value that does not decode to a valid row is skipped (and counted),
never trusted. Counts saturate at INT32_MAX instead of overflowing the 32-bit encoding.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1  # bump when a key's layout or a value's encoding changes
INT32_MAX = 2**31 - 1
MIN_REDIS_VERSION = (5, 0)  # streams (XADD/XREAD/XINFO) and ZPOPMIN; 6.x lacks XINFO's entries-added (handled)


@dataclass(frozen=True)
class RedisConfig:
    """Where the shared tables live. repr() never shows a password (neither `password` nor one inside `url`)."""

    url: str | None = "redis://127.0.0.1:6379/0"  # None = local tables only, nothing shared
    username: str | None = None                  # ACL user (None = the URL's, else the default user)
    password: str | None = None                  # from the deployment's config/secret, never from the environment;
                                                 # wins over a password in the URL
    tls: bool = False                            # TLS even for a redis:// URL (a rediss:// URL implies it)
    tls_ca_file: str | None = None               # CA bundle that signs the server's certificate (None = system CAs)
    tls_cert_file: str | None = None             # client certificate for mutual TLS (None = none)
    tls_key_file: str | None = None              # its private key (None = inside tls_cert_file)
    tls_check_hostname: bool = True              # the certificate must name the host the URL names
    connect_timeout_s: float = 0.5               # TCP connect limit; the hot path never waits on it
    timeout_s: float = 2.0                       # per-command socket limit in the background syncer
    backoff_initial_s: float = 0.5               # first retry delay after a failure (doubles each failure)
    backoff_max_s: float = 30.0                  # retry delay ceiling
    retries: int = 1                             # redis-py Retry: a command that finds its pooled connection
                                                 # dropped (server restarted) reconnects and runs again this
                                                 # many times before the round counts as failed

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"Redis url must start with redis://, rediss:// or unix://, got {redact_url(self.url)!r}")
        files = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        if any(files) and not self.uses_tls:
            raise ValueError("TLS files are set but the connection is not TLS: use a rediss:// URL or tls=True")

    @property
    def uses_tls(self) -> bool:
        return self.url is not None and (self.url.startswith("rediss://") or
                                         (self.tls and self.url.startswith("redis://")))

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["url"] = redact_url(self.url)
        shown["password"] = None if self.password is None else "***"
        return f"RedisConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def redact_url(url: str | None) -> str | None:
    """The URL with any password replaced by '***', for logs, reprs and reports.

    >>> redact_url("rediss://app:s3cret@cache.internal:6380/0")
    'rediss://app:***@cache.internal:6380/0'
    """
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:  # not parseable: show nothing of it that could hold a secret
        return "<unparseable url>"


@dataclass(frozen=True)
class NgramConfig:
    max_order: int = 4              # longest context (tokens) looked up first and learned
    min_order: int = 1              # shortest context accepted as a match
    max_continuations: int = 8      # continuation tokens kept per context (highest counts win)
    max_contexts: int = 100_000     # contexts kept, in memory and in Redis (least recently learned evicted)

    def __post_init__(self) -> None:
        if not 1 <= self.min_order <= self.max_order or self.max_continuations < 1 or self.max_contexts < 1:
            raise ValueError(f"invalid NgramConfig {self}")


@dataclass(frozen=True)
class StoreConfig:
    redis: RedisConfig = field(default_factory=RedisConfig)
    ngram: NgramConfig = field(default_factory=NgramConfig)
    adjacency_k: int = 8            # next-token candidates kept per vocabulary entry (Token Recycling)
    sync_interval_s: float = 2.0    # background push/pull cadence (a request start also wakes the syncer)
    feed_max_entries: int = 2_000   # Redis change feed length (approximate trim); a worker further behind resyncs
    batch_keys: int = 2_000         # keys per pipelined round trip
    ttl_s: int = 14 * 86_400        # a namespace untouched this long expires (old models clean themselves up)
    max_value_bytes: int = 8_192    # a row or key read from Redis larger than this is skipped unread (rows are
                                    # 8 B per continuation, keys 4 B per token: 64 B with the defaults)
    max_feed_entry_bytes: int = 1 << 20  # a feed entry's key list larger than this is skipped (40 KB per
                                         # 2,000-context push)

    def __post_init__(self) -> None:
        if self.adjacency_k < 1 or self.batch_keys < 1 or self.feed_max_entries < 1 or self.ttl_s < 1 or \
                self.max_value_bytes < 8 or self.max_feed_entry_bytes < 8:
            raise ValueError(f"invalid StoreConfig {self}")


def pack(values) -> bytes:
    """Little-endian int32 bytes of a sequence of ints (or a numpy array): `unpack(pack([1, -1])) == [1, -1]`."""
    if isinstance(values, np.ndarray):
        return values.astype("<i4").tobytes()
    values = values if isinstance(values, (list, tuple)) else list(values)
    return struct.pack(f"<{len(values)}i", *values)


def unpack(data: bytes | None, max_bytes: int | None = None) -> list[int]:
    """Inverse of `pack`; [] for None, a non-bytes value, a length that is not a multiple of 4 or one above
    `max_bytes` (checked before anything is unpacked; never a guess)."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or not data or len(data) % 4:
        return []
    if max_bytes is not None and len(data) > max_bytes:
        return []
    return list(struct.unpack(f"<{len(data) // 4}i", data))


def saturating_add(a: int, b: int) -> int:
    """a + b, held at INT32_MAX: a count that would overflow the int32 encoding stays at the top."""
    return min(INT32_MAX, a + b)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_SAMPLE_BYTES = 1 << 20


def fingerprint(model_dir: str | Path, tokenizer_dir: str | Path | None = None) -> str:
    """sha256 (hex, 16 chars) of the model's config.json, the tokenizer's files and a sample of each weight file.

    Weight files are sampled (size + first and last MiB) so a retrained model gets a new namespace without
    hashing gigabytes. Two models or tokenizers never share tables.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ValueError(f"{model_dir} has no config.json: tables need a local checkpoint to fingerprint")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else model_dir
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
        if (tok_dir / name).exists():
            h.update(name.encode() + (tok_dir / name).read_bytes())
    for path in sorted(p for p in model_dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_SAMPLE_BYTES)
            f.seek(max(0, size - _SAMPLE_BYTES))
            tail = f.read(_SAMPLE_BYTES)
        h.update(path.name.encode() + str(size).encode() + head + tail)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Keys:
    """The Redis keys of one namespace (fingerprint + schema version)."""

    ns: str

    @classmethod
    def for_fingerprint(cls, fp: str) -> "Keys":
        return cls(f"metaspec:tables:v{SCHEMA_VERSION}:{fp}")

    @property
    def meta(self) -> str:       # hash: epoch (a new random id whenever the namespace is recreated)
        return f"{self.ns}:meta"

    @property
    def feed(self) -> str:       # stream: {t: table, w: worker, k: packed keys} per push
        return f"{self.ns}:feed"

    @property
    def ngram(self) -> str:      # hash: packed context -> packed [tok, count, ...]
        return f"{self.ns}:ngram"

    @property
    def ngram_lru(self) -> str:  # sorted set: packed context -> last write time (eviction order)
        return f"{self.ns}:ngram:lru"

    def adjacency(self, k: int) -> str:  # hash: packed [token] -> packed [k next tokens]
        return f"{self.ns}:adjacency:k{k}"

    def all(self, k: int) -> list[str]:
        return [self.meta, self.feed, self.ngram, self.ngram_lru, self.adjacency(k)]


def worker_id() -> str:
    """Unique per process (host:pid:random), written into feed entries so a worker skips its own."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
