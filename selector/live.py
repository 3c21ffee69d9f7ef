"""A selector that follows its model file: swapped in place, between two requests, when the file changes.

The router asks `LiveSelector.choose` exactly as it would ask a `Selector`. At most every `check_s` seconds a
request looks at the file's (mtime, size, inode) — one `os.stat`, a few microseconds — and when they changed a
background thread loads the new file while requests keep using the current selector; the swap is one attribute
assignment. A file that cannot be trusted (corrupted, foreign, another feature version: see `load_selector`) is
refused with a logged error and the current selector stays; it is tried again only once the file changes again
(any exception while loading counts as a refusal, so no file can make every check retry it).

>>> live = LiveSelector(LiveConfig("/srv/selector.skops", check_s=2.0), tokenizer=tok)   # doctest: +SKIP
>>> live.choose(request, pools).selector_version                                        # doctest: +SKIP
'rf-1a2b3c4d-20250101T120000'
>>> # `metaspec retrain --out /srv/selector.skops ...` replaces the file; within ~2 s:
>>> live.choose(request, pools).selector_version                                        # doctest: +SKIP
'gb-5e6f7a8b-20250101T130000'
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from .rules import DEFAULT_ARMS, ArmSpec
from .model import SelectorFileError
from .selector import DEFAULT_MODEL, FixedSelector, SelectorConfig, _Base, load_selector
from .types import Choice, PoolInfo

logger = logging.getLogger(__name__)

Signature = tuple[int, int, int]     # (st_mtime_ns, st_size, st_ino); an os.replace always changes st_ino


@dataclass(frozen=True)
class LiveConfig:
    path: str | None = None                       # the selector file; None = the shipped default model
    check_s: float = 5.0                          # look at the file at most this often; <= 0 = never (reconfigure only)
    selector: SelectorConfig = field(default_factory=SelectorConfig)   # exploration share and seed

    @property
    def file(self) -> Path:
        return Path(self.path).expanduser() if self.path else DEFAULT_MODEL


def signature(path: Path) -> Signature | None:
    """What tells a replaced or rewritten file from the one loaded; None when the file is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class LiveSelector:
    """`choose` like a Selector; `switch` to another file or config (Serve's reconfigure); `poll` for changes."""

    def __init__(self, cfg: LiveConfig, arms: Mapping[str, ArmSpec] = DEFAULT_ARMS,
                 ngram_hit_rate: Callable[[Sequence[int]], float] | None = None, tokenizer=None,
                 log: logging.Logger = logger) -> None:
        self.arms, self.ngram_hit_rate, self.tokenizer, self.log = arms, ngram_hit_rate, tokenizer, log
        self.cfg = cfg
        self.current: _Base | None = None
        self.last_error: str | None = None        # why the latest file was refused (None: it was loaded)
        self.reloads = 0                          # successful swaps after the first load
        self._seen: Signature | None = None       # signature of the file last tried (loaded or refused)
        self._next_check = time.monotonic() + cfg.check_s
        self._loading: Future | None = None
        self._lock = threading.Lock()             # one load at a time (poll thread vs switch)
        self.switch(cfg)

    @property
    def version(self) -> str:
        return self.current.version

    def choose(self, request, pools: Sequence[PoolInfo]) -> Choice:
        self.poll()
        return self.current.choose(request, pools)

    def features_for(self, request, pool: PoolInfo) -> dict[str, float]:
        return self.current.features_for(request, pool)

    def switch(self, cfg: LiveConfig) -> str | None:
        """Load `cfg`'s file now (blocking) unless it is the file and config in use; returns the refusal, if any."""
        with self._lock:
            if self.current is not None and cfg == self.cfg and signature(cfg.file) == self._seen:
                return self.last_error
            self.cfg = cfg
            return self._load(cfg.file)

    def poll(self, now: float | None = None) -> Future | None:
        """If `check_s` has passed and the file changed, start loading it in the background; returns that load."""
        now = time.monotonic() if now is None else now
        if self.cfg.check_s <= 0 or now < self._next_check or self._loading is not None:
            return None
        self._next_check = now + self.cfg.check_s
        if signature(self.cfg.file) == self._seen:
            return None
        self._loading = future = Future()
        threading.Thread(target=self._background, args=(future,), name="selector-reload", daemon=True).start()
        return future

    def _background(self, future: Future) -> None:
        try:
            with self._lock:
                future.set_result(self._load(self.cfg.file))
        except BaseException as exc:   # noqa: BLE001 - a reload must never take the router down
            self.log.exception("selector reload failed")
            future.set_exception(exc)
        finally:
            self._loading = None

    def _load(self, path: Path) -> str | None:
        """Load `path` and swap it in, or keep the current selector; call with the lock held."""
        seen = signature(path)      # taken first: a file that changes while loading is tried again
        try:
            selector, error = load_selector(path if path != DEFAULT_MODEL or path.is_file() else None,
                                            self.cfg.selector, self.current, self.arms, self.ngram_hit_rate,
                                            self.tokenizer)
        except Exception as exc:  # noqa: BLE001 - whatever a file does, it is refused like a SelectorFileError
            selector, error = self.current, str(SelectorFileError(f"{path}: {type(exc).__name__}: {exc}"))
            if selector is None:
                selector = FixedSelector(self.cfg.selector, self.arms, self.ngram_hit_rate, self.tokenizer)
        self._seen, self.last_error = seen, error   # refused: not tried again until its signature changes
        if error:
            kept = self.current.version if self.current is not None else f"{selector.version} (nothing loaded)"
            self.log.error("selector file %s refused, keeping selector %s: %s", path, kept, error)
            self.current = selector
            return error
        old = self.current.version if self.current is not None else None
        self.current = selector
        if old is not None:
            self.reloads += 1
            self.log.warning("selector %s replaced by %s (from %s)", old, selector.version, path)
        return None
