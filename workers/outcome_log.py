"""The durable outcome log: one append-only JSONL file per writer process, gathered across nodes on demand.

Each router replica appends one `Outcome` line per finished request and fdatasyncs it *before* the reply is
sent, so an acknowledged request is never lost (process kill, service restart; power loss too, as far as the disk
honours fsync; with `fsync=False` only the first two; with `sync_before_ack=False` the sync follows the reply by
one batch, so a power loss can lose that batch). Files rotate by size and are never rewritten:
`outcomes-<node>-<pid>-<start>.<seq>.jsonl`. Concurrent requests share one sync (group commit).

The contract of a failed write ("acknowledged" means written):
- `append` / `append_async` return only once the record is written (and synced, as configured). When the write,
  the sync or opening a file fails (full disk, EIO, unwritable directory) they raise `OutcomeNotRecorded`, an
  OSError: the caller must treat the outcome as *not recorded* (the router logs it and can say so in its reply).
- The record is not forgotten: it is kept (at most `retry_records`, oldest dropped beyond) and written again ahead
  of the next record, and by the writer thread every `retry_interval_s`, until the disk takes it. So a record
  reported not recorded may still land later, once; `stats()` counts every step (failed, retried, dropped).
- A failed write leaves no fragment: the file is cut back to its last complete record (or, if even that fails,
  abandoned for a new file), so a torn fragment is never followed by a new record on the same line. After a
  failed fsync the file's contents are unknown: it is abandoned the same way and the records go to a new file.
- A rotation that cannot open the next file keeps writing to the current one (still open) and tries again
  later; no write ever goes to a closed descriptor.
- The writer thread is supervised: if it dies, the batch it held is reported not recorded (and kept for retry)
  and a new thread takes over (`writer_restarts`).
- Retention: closed files beyond `retain_bytes` in total, or older than `retain_s`, are deleted oldest first.
Readers (`outcome_files.py`, re-exported here) skip and count what is not a record (`read_report`): a torn last
line, a corrupt or non-UTF-8 line, and a record seen twice (a retried record that also survived in an abandoned
file).

>>> log = OutcomeLog(OutcomeLogConfig("/tmp/outcomes"))
>>> log.append(outcome)                       # returns once the line is on disk; raises OutcomeNotRecorded
>>> read_outcomes(outcome_files("/tmp/outcomes"))
[Outcome(...)]
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from metaspec.selector.types import Outcome

from .outcome_files import (PATTERN, ReadReport, gather_cluster, merge, outcome_files, parse_lines, prune,
                            read_lines, read_outcomes, read_report)

# reading lives in outcome_files; re-exported here, where callers have always found it
__all__ = ["PATTERN", "OutcomeLog", "OutcomeLogConfig", "OutcomeNotRecorded", "ReadReport", "gather_cluster", "merge",
           "outcome_files", "parse_lines", "prune", "read_lines", "read_outcomes", "read_report"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutcomeLogConfig:
    directory: str                    # where this node's files live (created if missing; "~" expanded)
    max_bytes: int = 64 << 20         # start a new file once the current one is this large
    node: str | None = None           # node name in file names; None = the host name
    fsync: bool = True                # fdatasync before acknowledging (survives power loss); False = the write
                                      # alone (survives process kills and service restarts, ~5 ms cheaper here)
    sync_before_ack: bool = True      # with fsync, append_async returns after the sync; False = right after the
                                      # write, the batch's fdatasync follows at once in the background (a power
                                      # loss can lose that last batch; a process kill or restart loses nothing)
    retain_bytes: int | None = 4 << 30  # closed files beyond this total (bytes, whole directory) are deleted,
                                        # oldest first; None = keep everything
    retain_s: float | None = None     # closed files older than this are deleted; None = no age limit
    retry_records: int = 10_000       # records that failed to write, kept for retry (beyond: oldest dropped)
    retry_interval_s: float = 1.0     # how often the writer retries them (and a failed rotation) while idle

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.retry_records < 0 or self.retry_interval_s <= 0 or \
                (self.retain_bytes is not None and self.retain_bytes < 0) or \
                (self.retain_s is not None and self.retain_s <= 0):
            raise ValueError(f"invalid OutcomeLogConfig {self}")


class OutcomeNotRecorded(OSError):
    """The outcome is not on disk; it is kept for retry (`queued`) unless the retry buffer overflowed."""

    def __init__(self, cause: BaseException, queued: bool = True) -> None:
        code = getattr(cause, "errno", None) or errno.EIO
        super().__init__(code, f"outcome not recorded ({'queued for retry' if queued else 'dropped'}): "
                               f"{type(cause).__name__}: {cause}")
        self.queued = queued


@dataclass
class _Counters:
    appended: int = 0          # records written (first try or retry)
    failed_writes: int = 0     # write / sync / open attempts that failed
    unrecorded: int = 0        # records reported not recorded to their caller
    retried: int = 0           # of those, written later by a retry
    dropped: int = 0           # records given up (retry buffer full, or still failing at close)
    rotation_errors: int = 0   # rotations that could not open the next file (writing went on in the current)
    abandoned_files: int = 0   # files left after a failed fsync / a fragment that could not be cut
    writer_restarts: int = 0   # the writer thread died and was replaced
    pruned_files: int = 0      # files deleted by retention


class OutcomeLog:
    """Appends Outcomes of one process; `append` (blocking) and `append_async` (group commit) both sync."""

    def __init__(self, cfg: OutcomeLogConfig) -> None:
        self.cfg = cfg
        self.directory = Path(cfg.directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.node = (cfg.node or socket.gethostname()).replace("/", "_")
        self._base = f"outcomes-{self.node}-{os.getpid()}-{int(time.time())}"
        self._seq, self._fd, self._size = 0, -1, 0
        self._lock = threading.Lock()                  # the file: fd, size, seq, retry buffer
        self._retry: deque[str] = deque()              # lines not yet written, oldest first
        self._rotate_at = 0.0                          # monotonic time of the next rotation attempt
        self.counters = _Counters()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._batch: list = []                         # what the writer holds (settled if it dies)
        self._closed = False
        self._open(self._seq)
        self._prune()

    @property
    def path(self) -> Path:
        return self._path(self._seq)

    def stats(self) -> dict:
        with self._lock:
            return vars(self.counters) | {"pending_retry": len(self._retry), "file": self.path.name}

    def append(self, outcome: Outcome) -> None:
        """Write one line (and sync it); returns when it is durable, raises OutcomeNotRecorded otherwise."""
        self._write([outcome.to_json()], sync=self.cfg.fsync)

    async def append_async(self, outcome: Outcome) -> None:
        """Like `append`, without blocking the event loop; concurrent callers share one fsync."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._ensure_writer()
        self._queue.put((outcome.to_json(), loop, done))
        await asyncio.shield(done)   # a cancelled caller still gets its record written

    def close(self) -> None:
        """Stop the writer, try the records still queued for retry once more, close the file."""
        with self._writer_lock:
            self._closed = True
            writer, self._writer = self._writer, None
        if writer is not None:
            self._queue.put(None)
            writer.join()
        with self._lock:
            if self._retry:
                try:
                    self._write_locked([], sync=self.cfg.fsync)
                except OSError as exc:
                    log.error("outcome log: %d records could not be written before close: %s", len(self._retry), exc)
                    self.counters.dropped += len(self._retry)
                    self._retry.clear()
            self._close_fd()

    # -- writing ------------------------------------------------------------------------------------------
    def _write(self, lines: list[str], sync: bool) -> None:
        with self._lock:
            self._write_locked(lines, sync)

    def _write_locked(self, lines: list[str], sync: bool) -> None:
        """Queued retries, then `lines`, as one all-or-nothing append; raises OutcomeNotRecorded."""
        retried = len(self._retry)
        data = "".join(line + "\n" for line in (*self._retry, *lines)).encode()
        try:
            if self._fd < 0:
                self._open(self._seq + 1)
            self._append_bytes(data, sync)
        except OSError as exc:
            self.counters.failed_writes += 1
            self.counters.unrecorded += len(lines)
            queued = self._keep_for_retry(lines)
            raise OutcomeNotRecorded(exc, queued) from exc
        self._retry.clear()
        self.counters.retried += retried
        self.counters.appended += retried + len(lines)
        if self._size >= self.cfg.max_bytes:
            self._rotate(synced=sync)

    def _append_bytes(self, data: bytes, sync: bool) -> None:
        """Write all of `data` at the end of the file, or leave the file as it was (or abandon it)."""
        good = self._size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:
            self._cut_back(good, after_sync=False)
            raise
        if sync:
            try:
                os.fdatasync(self._fd)   # data + the file size; the rest of the inode's metadata can wait
            except OSError:
                self._cut_back(good, after_sync=True)
                raise
        self._size = good + len(data)

    def _cut_back(self, good: int, after_sync: bool) -> None:
        """Remove a partial write; after a failed sync (or if cutting fails) the file is abandoned."""
        try:
            os.ftruncate(self._fd, good)
        except OSError:
            after_sync = True
        if after_sync:
            log.error("outcome log: abandoning %s after a failed write/sync; new records go to a new file",
                      self.path.name)
            self.counters.abandoned_files += 1
            self._close_fd()

    def _keep_for_retry(self, lines: list[str]) -> bool:
        self._retry.extend(lines)
        over = len(self._retry) - self.cfg.retry_records
        for _ in range(max(0, over)):
            self._retry.popleft()
        self.counters.dropped += max(0, over)
        if over > 0:
            log.error("outcome log: retry buffer full, %d records dropped", over)
        return over <= 0

    def _rotate(self, synced: bool) -> None:
        """Open the next file, then close the current one; if opening fails, keep writing to the current one."""
        now = time.monotonic()
        if now < self._rotate_at:
            return
        old_fd, old_seq = self._fd, self._seq
        try:
            if self.cfg.fsync and not synced:
                os.fdatasync(old_fd)   # the deferred sync would reach only the next file
            self._open(old_seq + 1)
        except OSError as exc:
            self._fd, self._seq = old_fd, old_seq
            self.counters.rotation_errors += 1
            self._rotate_at = now + self.cfg.retry_interval_s
            log.error("outcome log: cannot rotate %s (%s); writing on in it", self._path(old_seq).name, exc)
            return
        os.close(old_fd)
        self._prune()

    def _open(self, seq: int) -> None:
        """Make `seq` the current file (self._fd); on failure nothing is left open and self._fd is unchanged."""
        path = self._path(seq)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            dir_fd = os.open(self.directory, os.O_RDONLY)   # make the new file's directory entry durable too
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._seq, self._size = fd, seq, size

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError as exc:
                log.error("outcome log: closing %s failed: %s", self.path.name, exc)

    def _path(self, seq: int) -> Path:
        return self.directory / f"{self._base}.{seq:04d}.jsonl"

    def _prune(self) -> None:
        try:
            removed = prune(self.directory, self.cfg.retain_bytes, self.cfg.retain_s, self.node, {self.path})
        except OSError as exc:
            log.error("outcome log: retention failed: %s", exc)
            return
        self.counters.pruned_files += len(removed)

    # -- the writer thread (append_async) -------------------------------------------------------------------
    def _ensure_writer(self) -> None:
        with self._writer_lock:
            if self._closed:
                raise OutcomeNotRecorded(ValueError("the outcome log is closed"), queued=False)
            if self._writer is not None and self._writer.is_alive():
                return
            if self._writer is not None:   # it died outside the supervisor's reach
                self.counters.writer_restarts += 1
                self._settle_batch(RuntimeError("the outcome log writer died"))
            self._writer = threading.Thread(target=self._supervise, name="outcome-log", daemon=True)
            self._writer.start()

    def _supervise(self) -> None:
        """Run the writer loop; if it raises, report its batch not recorded (kept for retry) and run it again."""
        while True:
            try:
                self._drain()
                return
            except BaseException as exc:  # noqa: BLE001 - a writer that dies would hang every caller
                log.exception("outcome log writer failed; restarting it")
                self.counters.writer_restarts += 1
                self._settle_batch(exc)

    def _settle_batch(self, exc: BaseException) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            return
        with self._lock:
            self.counters.unrecorded += len(batch)
            queued = self._keep_for_retry([line for line, _, _ in batch])
        error = OutcomeNotRecorded(exc, queued)
        for _, loop, fut in batch:
            loop.call_soon_threadsafe(_settle, fut, error)

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.cfg.retry_interval_s if self._retry else None)
            except queue.Empty:
                self._retry_now()
                continue
            if item is None:
                return
            self._batch = batch = [item]
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            self._write_batch(batch)

    def _write_batch(self, batch: list) -> None:
        error, sync_now = None, self.cfg.fsync and self.cfg.sync_before_ack
        lines = [line for line, _, _ in batch]
        try:
            self._write(lines, sync=sync_now)
        except OSError as exc:
            error = exc
        self._batch = []
        for _, loop, fut in batch:
            loop.call_soon_threadsafe(_settle, fut, error)
        if self.cfg.fsync and not sync_now and error is None:
            self._deferred_sync(lines)

    def _retry_now(self) -> None:
        try:
            self._write([], sync=self.cfg.fsync)
        except OSError as exc:
            log.warning("outcome log: retry of %d records failed: %s", len(self._retry), exc)

    def _deferred_sync(self, lines: list[str]) -> None:
        """The fdatasync of a batch already acknowledged (sync_before_ack=False); on failure it is written again."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                os.fdatasync(self._fd)
            except OSError as exc:   # the batch may be lost: abandon the file and write the batch again
                log.error("outcome log fdatasync failed: %s", exc)
                self.counters.failed_writes += 1
                self._cut_back(self._size, after_sync=True)
                self._keep_for_retry(lines)


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():
        return
    fut.set_exception(error) if error is not None else fut.set_result(None)
