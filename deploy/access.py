"""Who may call the service, and how much: API keys (as sha256 digests) and per-key quotas over a sliding minute.

Keys are never configured in clear: the config lists `hash_api_key(key)` digests, inline (`api_key_hashes`) or in
a file on the router's node (`api_keys_file`, one digest per line, `#` comments). Both are part of the Router's
user_config, so `serve deploy` with a changed list (or a touched `keys_version`) rotates keys in place
(`Router.reconfigure`): no restart, no dropped request.

Quotas (`key_quota` for every key, `quotas` per digest) count requests and tokens (prompt + completion) in the last
60 s per router replica; a key over either answers RESOURCE_EXHAUSTED (HTTP 429) until the window has room.

>>> access = Access(AccessConfig((hash_api_key("k"),), Quota(requests_per_min=1)))
>>> digest = access.authenticate("k", "peer", "x-api-key metadata")
>>> access.admit(digest)            # the first request of the minute
>>> access.admit(digest)            # the second: Status(RESOURCE_EXHAUSTED, ...)
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from .config import Quota, RouterSpec
from .status import Status

logger = logging.getLogger("ray.serve")
WINDOW_S = 60.0


@dataclass(frozen=True)
class AccessConfig:
    key_hashes: tuple[str, ...] = ()                              # accepted digests; empty = no authentication
    default_quota: Quota = Quota()                                # every key's, unless `quotas` names it
    quotas: Mapping[str, Quota] = field(default_factory=dict)     # digest -> its own quota


def access_config(spec: RouterSpec) -> AccessConfig:
    """The router's keys (inline and from its keys file) and quotas."""
    hashes = tuple(dict.fromkeys(spec.api_key_hashes + read_key_file(spec.api_keys_file)))
    bad = [h for h in hashes if len(h) != 64 or any(c not in "0123456789abcdef" for c in h)]
    if bad:
        raise ValueError(f"{len(bad)} entries of the API keys are not sha256 hex digests (deploy.config.hash_api_key)")
    return AccessConfig(hashes, spec.key_quota, dict(spec.quotas))


def read_key_file(path: str | None) -> tuple[str, ...]:
    """The digests in a keys file (one per line; blank lines and `#` comments skipped); () for None."""
    if not path:
        return ()
    lines = Path(path).expanduser().read_text().splitlines()
    return tuple(line.split("#", 1)[0].strip().lower() for line in lines if line.split("#", 1)[0].strip())


class _Window:
    """Amounts spent in the last WINDOW_S seconds (bounded: one entry per request)."""

    def __init__(self) -> None:
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0

    def spent(self, now: float) -> int:
        while self.events and self.events[0][0] <= now - WINDOW_S:
            self.total -= self.events.popleft()[1]
        return self.total

    def add(self, now: float, amount: int) -> None:
        self.events.append((now, amount))
        self.total += amount


class Access:
    def __init__(self, cfg: AccessConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg, self.clock = cfg, clock
        self._requests: dict[str, _Window] = {}
        self._tokens: dict[str, _Window] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.key_hashes)

    def rotated(self, cfg: AccessConfig) -> "Access":
        """The same windows under new keys and quotas (a key that stays keeps what it spent this minute)."""
        new = Access(cfg, self.clock)
        keep = set(cfg.key_hashes)
        new._requests = {d: w for d, w in self._requests.items() if d in keep}
        new._tokens = {d: w for d, w in self._tokens.items() if d in keep}
        return new

    def authenticate(self, key: str | None, peer: str, how: str) -> str | None:
        """The key's digest (None when no keys are configured); raises UNAUTHENTICATED (`how`: where to put it)."""
        if not self.enabled:
            return None
        if not key:
            logger.warning("refused a request without an API key from %s", peer)
            raise Status(grpc.StatusCode.UNAUTHENTICATED, f"missing API key ({how})")
        digest = hashlib.sha256(key.encode()).hexdigest()
        if not any(hmac.compare_digest(digest, h) for h in self.cfg.key_hashes):
            logger.warning("refused a request with an unknown API key from %s", peer)   # never the key itself
            raise Status(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
        return digest

    def admit(self, digest: str | None) -> None:
        """Count one request of `digest`; RESOURCE_EXHAUSTED when its quota has no room this minute."""
        if digest is None:
            return
        quota, now = self.cfg.quotas.get(digest, self.cfg.default_quota), self.clock()
        requests = self._requests.setdefault(digest, _Window())
        tokens = self._tokens.setdefault(digest, _Window())
        if quota.requests_per_min is not None and requests.spent(now) >= quota.requests_per_min:
            raise Status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"this API key's quota of {quota.requests_per_min} requests per minute is used up; retry later")
        if quota.tokens_per_min is not None and tokens.spent(now) >= quota.tokens_per_min:
            raise Status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"this API key's quota of {quota.tokens_per_min} tokens per minute is used up; retry later")
        requests.add(now, 1)

    def charge(self, digest: str | None, tokens: int) -> None:
        """Count the tokens a finished request of `digest` used."""
        if digest is not None and tokens > 0:
            self._tokens.setdefault(digest, _Window()).add(self.clock(), tokens)
