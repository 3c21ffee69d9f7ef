"""The durable outcome log: one append-only JSONL file per writer process, gathered across nodes on demand.

Each router replica appends one `Outcome` line per finished request and fdatasyncs it *before* the reply is
sent, so an acknowledged request is never lost (process kill, service restart; power loss too, as far as the disk
honours fsync; with `fsync=False` only the first two; with `sync_before_ack=False` the sync follows the reply by
one batch, so a power loss can lose that batch). Files rotate by size and are never rewritten:
`outcomes-<node>-<pid>-<start>.<seq>.jsonl`. Concurrent requests share one sync (group commit). A reader skips a
torn last line (a write cut by a kill).

>>> log = OutcomeLog(OutcomeLogConfig("/tmp/outcomes"))
>>> log.append(outcome)                       # returns once the line is on disk
>>> read_outcomes(outcome_files("/tmp/outcomes"))
[Outcome(...)]
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from metaspec.selector.types import Outcome

PATTERN = "outcomes-*.jsonl"


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


class OutcomeLog:
    """Appends Outcomes of one process; `append` (blocking) and `append_async` (group commit) both sync."""

    def __init__(self, cfg: OutcomeLogConfig) -> None:
        self.cfg = cfg
        self.directory = Path(cfg.directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        node = (cfg.node or socket.gethostname()).replace("/", "_")
        self._base = f"outcomes-{node}-{os.getpid()}-{int(time.time())}"
        self._seq, self._fd, self._size = 0, -1, 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._open_next()

    @property
    def path(self) -> Path:
        return self.directory / f"{self._base}.{self._seq:04d}.jsonl"

    def append(self, outcome: Outcome) -> None:
        """Write one line (and sync it); returns when it is durable."""
        self._write([outcome.to_json()], sync=self.cfg.fsync)

    async def append_async(self, outcome: Outcome) -> None:
        """Like `append`, without blocking the event loop; concurrent callers share one fsync."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._ensure_writer()
        self._queue.put((outcome.to_json(), loop, done))
        await asyncio.shield(done)   # a cancelled caller still gets its record written

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # -- internals --
    def _write(self, lines: list[str], sync: bool) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            if sync:
                os.fdatasync(self._fd)   # data + the file size; the rest of the inode's metadata can wait
            self._size += len(data)
            if self._size >= self.cfg.max_bytes:
                if self.cfg.fsync and not sync:
                    os.fdatasync(self._fd)   # the deferred sync would reach only the next file
                os.close(self._fd)
                self._seq += 1
                self._open_next()

    def _open_next(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size
        dir_fd = os.open(self.directory, os.O_RDONLY)   # make the new file's directory entry durable too
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _ensure_writer(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._drain, name="outcome-log", daemon=True)
            self._writer.start()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            batch = [item]
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            error, sync_now = None, self.cfg.fsync and self.cfg.sync_before_ack
            try:
                self._write([line for line, _, _ in batch], sync=sync_now)
            except OSError as exc:
                error = exc
            for _, loop, fut in batch:
                loop.call_soon_threadsafe(_settle, fut, error)
            if self.cfg.fsync and not sync_now and error is None:
                self._sync()

    def _sync(self) -> None:
        """The deferred fdatasync of a batch already acknowledged (sync_before_ack=False)."""
        with self._lock:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:   # a failing disk: loud here, and the next write reports it to its callers
                logging.getLogger(__name__).error("outcome log fdatasync failed: %s", exc)


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():
        return
    fut.set_exception(error) if error is not None else fut.set_result(None)


# ---- reading and gathering ----------------------------------------------------------------------------------

def outcome_files(directory: str | Path) -> list[Path]:
    """Every outcome file under `directory` (not recursive), oldest name first."""
    return sorted(Path(directory).expanduser().glob(PATTERN))


def read_lines(path: Path) -> list[str]:
    """The complete lines of one file; a torn last line (no newline: the write was cut) is dropped."""
    data = path.read_bytes()
    end = data.rfind(b"\n")
    return data[: end + 1].decode().splitlines() if end >= 0 else []


def read_outcomes(paths: Iterable[str | Path]) -> list[Outcome]:
    """Outcomes of every file in `paths`, sorted by finish time. A corrupt complete line raises ValueError."""
    out = []
    for path in map(Path, paths):
        for no, line in enumerate(read_lines(path), 1):
            if not line.strip():
                continue
            try:
                out.append(Outcome.from_json(line))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{no}: not an outcome record: {exc}") from None
    return sorted(out, key=lambda o: o.ts)


def merge(outcomes: Iterable[Outcome], out_path: str | Path) -> int:
    """Write outcomes (deduplicated by request_id and ts) to one JSONL file, atomically; returns the count."""
    seen, lines = set(), []
    for o in sorted(outcomes, key=lambda o: o.ts):
        if (o.request_id, o.ts) not in seen:
            seen.add((o.request_id, o.ts))
            lines.append(o.to_json() + "\n")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    return len(lines)


def gather_cluster(directory: str) -> list[Outcome]:
    """Read `directory` on every alive node of the connected Ray cluster (one pinned task per node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def _local_lines(d: str) -> list[str]:
        return [line for p in outcome_files(d) for line in read_lines(p) if line.strip()]

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    refs = [_local_lines.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(directory)
            for n in nodes]
    return sorted((Outcome.from_json(line) for lines in ray.get(refs) for line in lines), key=lambda o: o.ts)
