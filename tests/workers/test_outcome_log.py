"""The outcome log: durable appends, rotation, torn-line tolerance, merging, no acknowledged record lost to a
SIGKILL, and a failed write never acknowledged (full tmpfs, read-only directory at rotation, EIO on fsync, a dying
writer thread), with retries, bounded retention and readers that skip corrupt lines."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from metaspec.selector.types import Outcome
from metaspec.workers.outcome_log import (OutcomeLog, OutcomeLogConfig, OutcomeNotRecorded, merge, outcome_files,
                                          read_lines, read_outcomes, read_report)


def outcome(i: int, status: str = "OK") -> Outcome:
    return Outcome(request_id=f"r{i}", ts=1000.0 + i, source="service", pool="cpu", method="pld", status=status,
                   features={"prompt_size": float(i)}, completion_tokens=i)


def test_append_then_read_round_trips(tmp_path):
    log = OutcomeLog(OutcomeLogConfig(str(tmp_path), node="n1"))
    written = [outcome(i) for i in range(5)] + [outcome(5, status="INVALID_ARGUMENT")]
    for o in written:
        log.append(o)
    log.close()
    files = outcome_files(tmp_path)
    assert len(files) == 1 and files[0].name.startswith(f"outcomes-n1-{os.getpid()}-")
    assert read_outcomes(files) == written


def test_rotation_starts_new_files_and_loses_nothing(tmp_path):
    log = OutcomeLog(OutcomeLogConfig(str(tmp_path), max_bytes=1024, node="n1"))
    for i in range(40):
        log.append(outcome(i))
    log.close()
    files = outcome_files(tmp_path)
    assert len(files) > 3
    assert all(f.stat().st_size < 1024 + 600 for f in files)       # rotated right after crossing the limit
    assert [o.request_id for o in read_outcomes(files)] == [f"r{i}" for i in range(40)]


def test_concurrent_async_appends_share_fsyncs_and_all_land(tmp_path):
    log = OutcomeLog(OutcomeLogConfig(str(tmp_path), node="n1"))

    async def many():
        await asyncio.gather(*(log.append_async(outcome(i)) for i in range(200)))

    asyncio.run(many())
    log.close()
    assert sorted(o.request_id for o in read_outcomes(outcome_files(tmp_path))) == sorted(f"r{i}" for i in range(200))


def test_readers_skip_and_count_torn_corrupt_and_duplicate_lines(tmp_path):
    path = tmp_path / "outcomes-x-1-1.0000.jsonl"
    good = outcome(1).to_json() + "\n"
    path.write_text(good + outcome(2).to_json()[:40])          # the second write was cut by a kill
    assert read_lines(path) == [good.strip()]
    assert [o.request_id for o in read_outcomes([path])] == ["r1"]
    path.write_bytes((good + "{not json}\n" + '{"schema": 999}\n' + "[" * 100_000 + "\n").encode()
                     + b"\xff\xfe garbage\n" + (outcome(3).to_json() + "\n" + good).encode())
    report = read_report([path])
    assert [o.request_id for o in report.outcomes] == ["r1", "r3"]
    assert len(report.corrupt) == 4 and report.duplicates == 1 and report.torn == 0
    assert report.corrupt[0].startswith(f"{path}:2: not an outcome record")
    assert [o.request_id for o in read_outcomes([path])] == ["r1", "r3"]     # no exception either


def test_merge_deduplicates_and_sorts(tmp_path):
    a, b = [outcome(3), outcome(1)], [outcome(1), outcome(2)]
    out = tmp_path / "merged" / "all.jsonl"
    assert merge(a + b, out) == 3
    assert [o.request_id for o in read_outcomes([out])] == ["r1", "r2", "r3"]


_WRITER = textwrap.dedent("""
    import asyncio, sys
    from metaspec.selector.types import Outcome
    from metaspec.workers.outcome_log import OutcomeLog, OutcomeLogConfig

    log = OutcomeLog(OutcomeLogConfig(sys.argv[1], max_bytes=4096, node="killed"))

    async def one(i):
        await log.append_async(Outcome(request_id=f"r{i}", ts=float(i), source="service", pool="p", method="ar",
                                       status="OK", features={"x": 1.0}))
        print(f"ack r{i}", flush=True)             # the reply a client would get, sent after the fsync

    async def main():
        i = 0
        while True:                                # concurrent appends, like a busy router
            await asyncio.gather(*(one(i + j) for j in range(8)))
            i += 8

    asyncio.run(main())
""")


def test_no_acknowledged_record_is_lost_to_sigkill(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    acked: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while len(acked) < 300 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(line.split()[1])
        os.kill(proc.pid, signal.SIGKILL)            # abrupt stop, mid-write more often than not
    finally:
        proc.wait()
    acked += [line.split()[1] for line in proc.stdout.read().splitlines() if line.startswith("ack ")]
    assert len(acked) >= 300, "the writer did not get going"
    logged = {o.request_id for o in read_outcomes(outcome_files(tmp_path))}
    assert set(acked) <= logged
    assert len(outcome_files(tmp_path)) > 1          # rotation happened during the run


# ---- a failed write is never acknowledged: full disk, unwritable directory, EIO, a dying writer ---------------

def _mount(*args: str) -> None:
    try:
        subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"mounting is not permitted here: {exc}")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: filled up by the test, freed again by deleting its filler."""
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk))
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)


def _fill(disk) -> None:
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def _every_line_is_a_record(directory) -> list[str]:
    report = read_report(outcome_files(directory))
    assert report.corrupt == [] and report.torn == 0
    return [o.request_id for o in report.outcomes]


def _append_until_full(log, start: int) -> tuple[list[str], OutcomeNotRecorded]:
    """Append until the disk refuses one (the tail of the file's last page still takes a few); the acked ids."""
    acked = []
    for i in range(start, start + 100):
        try:
            log.append(outcome(i))
        except OutcomeNotRecorded as exc:
            return acked, exc
        acked.append(f"r{i}")
    raise AssertionError("the disk never filled up")


def test_a_full_disk_is_reported_not_recorded_then_retried(small_disk):
    log = OutcomeLog(OutcomeLogConfig(str(small_disk / "log"), node="n1"))
    log.append(outcome(0))
    _fill(small_disk)
    acked, err = _append_until_full(log, 1)
    assert err.errno == errno.ENOSPC and err.queued and isinstance(err, OSError)
    n = len(acked) + 1
    with pytest.raises(OutcomeNotRecorded):
        log.append(outcome(n + 1))
    stats = log.stats()
    assert stats["unrecorded"] == 2 and stats["pending_retry"] == 2 and stats["failed_writes"] == 2
    assert _every_line_is_a_record(small_disk / "log") == ["r0", *acked]     # no fragment left behind
    (small_disk / "filler").unlink()
    log.append(outcome(n + 2))                                                 # the retries land ahead of it
    assert log.stats()["retried"] == 2 and log.stats()["pending_retry"] == 0
    assert _every_line_is_a_record(small_disk / "log") == [f"r{i}" for i in range(n + 3)]
    log.close()


def test_async_appends_on_a_full_disk_raise_and_the_writer_retries_on_its_own(small_disk):
    log = OutcomeLog(OutcomeLogConfig(str(small_disk / "log"), node="n1", retry_interval_s=0.05))

    async def run():
        await log.append_async(outcome(0))
        _fill(small_disk)
        acked, _ = _append_until_full(log, 1)            # the page the file ends in is full now
        n = len(acked) + 2
        results = await asyncio.gather(*(log.append_async(outcome(i)) for i in range(n, n + 8)),
                                       return_exceptions=True)
        assert all(isinstance(r, OutcomeNotRecorded) for r in results)
        (small_disk / "filler").unlink()
        for _ in range(200):                                  # no new append: the writer's own retry
            if log.stats()["pending_retry"] == 0:
                break
            await asyncio.sleep(0.02)
        return n

    n = asyncio.run(run())
    assert sorted(_every_line_is_a_record(small_disk / "log")) == sorted(f"r{i}" for i in range(n + 8))
    assert log.stats()["retried"] == 9
    log.close()


def test_a_partial_write_is_cut_back_so_no_fragment_shares_a_line(tmp_path, monkeypatch):
    log = OutcomeLog(OutcomeLogConfig(str(tmp_path), node="n1"))
    log.append(outcome(0))
    real_write = os.write

    def half_then_enospc(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(OutcomeNotRecorded):
        log.append(outcome(1))
    monkeypatch.setattr(os, "write", real_write)
    log.append(outcome(2))
    assert _every_line_is_a_record(tmp_path) == ["r0", "r1", "r2"] and len(outcome_files(tmp_path)) == 1

    monkeypatch.setattr(os, "write", half_then_enospc)       # and when even cutting back fails:
    monkeypatch.setattr(os, "ftruncate", lambda fd, n: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    with pytest.raises(OutcomeNotRecorded):
        log.append(outcome(3))
    monkeypatch.undo()
    log.append(outcome(4))                                   # a new file: the fragment stays a torn last line
    files = outcome_files(tmp_path)
    assert len(files) == 2 and log.stats()["abandoned_files"] == 1
    report = read_report(files)
    assert report.corrupt == [] and report.torn == 1
    assert [o.request_id for o in report.outcomes] == ["r0", "r1", "r2", "r3", "r4"]
    log.close()


@pytest.mark.parametrize("sync_name", ["fdatasync", "fsync"])
def test_eio_on_fsync_is_not_acknowledged_and_the_record_moves_to_a_new_file(tmp_path, monkeypatch, sync_name):
    log = OutcomeLog(OutcomeLogConfig(str(tmp_path), node="n1"))
    log.append(outcome(0))
    real = getattr(os, sync_name)
    failures = [1]

    def flaky(fd):
        if failures:
            failures.pop()
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", flaky)      # the log syncs data with fdatasync; fsync is patched too,
    monkeypatch.setattr(os, "fsync", flaky)          # in case a platform or a change uses it
    with pytest.raises(OutcomeNotRecorded) as err:
        log.append(outcome(1))
    assert err.value.errno == errno.EIO and log.stats()["abandoned_files"] == 1
    log.append(outcome(2))
    assert len(outcome_files(tmp_path)) == 2                  # the file whose sync failed is not written again
    assert _every_line_is_a_record(tmp_path) == ["r0", "r1", "r2"]
    log.close()


def test_eio_on_the_deferred_sync_rewrites_the_batch(tmp_path, monkeypatch):
    log = OutcomeLog(OutcomeLogConfig(str(tmp_path), node="n1", sync_before_ack=False, retry_interval_s=0.05))
    real, failures = os.fdatasync, [1]

    def flaky(fd):
        if failures:
            failures.pop()
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", flaky)

    async def run():
        await log.append_async(outcome(0))               # acknowledged after the write; its sync then fails
        for _ in range(200):
            if log.stats()["retried"]:
                break
            await asyncio.sleep(0.02)

    asyncio.run(run())
    log.close()
    assert log.stats()["abandoned_files"] == 1 and log.stats()["retried"] == 1
    assert _every_line_is_a_record(tmp_path) == ["r0"]       # written twice, read once
    assert read_report(outcome_files(tmp_path)).duplicates == 1


def test_an_unwritable_directory_at_rotation_keeps_writing_to_the_open_file(tmp_path):
    directory = tmp_path / "log"
    directory.mkdir()
    log = OutcomeLog(OutcomeLogConfig(str(directory), max_bytes=1024, node="n1", retry_interval_s=0.01))
    _mount("--bind", str(directory), str(directory))
    try:
        _mount("-o", "remount,bind,ro", str(directory))      # new files cannot be created; the open fd still writes
        for i in range(20):
            log.append(outcome(i))
            time.sleep(0.011)                                # let each rotation be tried again
        assert log.stats()["rotation_errors"] >= 10 and len(outcome_files(directory)) == 1
    finally:
        subprocess.run(["umount", str(directory)], check=True, capture_output=True)
    for i in range(20, 30):
        log.append(outcome(i))
    log.close()
    assert len(outcome_files(directory)) > 1                 # rotation resumed
    assert _every_line_is_a_record(directory) == [f"r{i}" for i in range(30)]


def test_a_failed_open_after_abandoning_a_file_never_writes_to_a_closed_descriptor(tmp_path, monkeypatch):
    log = OutcomeLog(OutcomeLogConfig(str(tmp_path), node="n1"))
    log.append(outcome(0))
    real_open, real_sync = os.open, os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    with pytest.raises(OutcomeNotRecorded):
        log.append(outcome(1))                               # the file is abandoned (closed)
    monkeypatch.setattr(os, "fdatasync", real_sync)
    denied = lambda path, *a, **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")) \
        if str(path).endswith(".jsonl") else real_open(path, *a, **k)
    monkeypatch.setattr(os, "open", denied)
    written = []
    monkeypatch.setattr(os, "write", lambda fd, data: written.append(fd) or len(data))
    with pytest.raises(OutcomeNotRecorded) as err:
        log.append(outcome(2))
    assert err.value.errno == errno.EACCES and written == []    # nothing was written anywhere
    monkeypatch.undo()
    log.append(outcome(3))
    assert _every_line_is_a_record(tmp_path) == ["r0", "r1", "r2", "r3"]
    log.close()


def test_the_retry_buffer_is_bounded(tmp_path, monkeypatch):
    log = OutcomeLog(OutcomeLogConfig(str(tmp_path), node="n1", retry_records=3))
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    queued = []
    for i in range(5):
        with pytest.raises(OutcomeNotRecorded) as err:
            log.append(outcome(i))
        queued.append(err.value.queued)
    assert queued == [True, True, True, False, False]
    assert log.stats()["dropped"] == 2 and log.stats()["pending_retry"] == 3
    monkeypatch.undo()
    log.close()                                              # close writes what is left
    assert _every_line_is_a_record(tmp_path) == ["r2", "r3", "r4"]


def test_the_writer_thread_is_supervised(tmp_path, monkeypatch):
    log = OutcomeLog(OutcomeLogConfig(str(tmp_path), node="n1"))
    real, failures = log._append_bytes, [1]

    def buggy(data, sync):
        if failures:
            failures.pop()
            raise RuntimeError("a bug in the writer")
        return real(data, sync)

    monkeypatch.setattr(log, "_append_bytes", buggy)

    async def run():
        with pytest.raises(OutcomeNotRecorded, match="a bug in the writer"):
            await log.append_async(outcome(0))
        await log.append_async(outcome(1))              # the restarted writer serves (and retries r0 first)
        log._queue.put(None)
        log._writer.join()                              # a writer that is gone without the supervisor knowing
        await log.append_async(outcome(2))              # noticed by the next append: a new one is started

    asyncio.run(run())
    log.close()
    assert log.stats()["writer_restarts"] == 2
    assert _every_line_is_a_record(tmp_path) == ["r0", "r1", "r2"]


def test_retention_by_bytes_keeps_the_current_file_and_bounds_the_directory(tmp_path):
    log = OutcomeLog(OutcomeLogConfig(str(tmp_path), max_bytes=1024, node="n1", retain_bytes=4096))
    for i in range(100):
        log.append(outcome(i))
    total = sum(f.stat().st_size for f in outcome_files(tmp_path))
    assert total <= 4096 + 1024 + 600 and log.stats()["pruned_files"] > 0 and log.path.exists()
    ids = [o.request_id for o in read_outcomes(outcome_files(tmp_path))]
    assert ids == [f"r{i}" for i in range(100 - len(ids), 100)]     # the newest survive
    log.close()


def test_retention_by_age_deletes_only_closed_files(tmp_path):
    old = time.time() - 10 * 86_400
    dead = tmp_path / "outcomes-n1-999999999-1.0000.jsonl"             # a writer of this node that is gone
    rotated = tmp_path / f"outcomes-other-{os.getpid()}-1.0000.jsonl"  # another node's writer rotated past it
    current = tmp_path / f"outcomes-other-{os.getpid()}-1.0001.jsonl"  # ... and still writes this one
    for path in (dead, rotated, current):
        path.write_text(outcome(0).to_json() + "\n")
        os.utime(path, (old, old))
    log = OutcomeLog(OutcomeLogConfig(str(tmp_path), node="n1", retain_s=86_400.0))
    assert not dead.exists() and not rotated.exists() and current.exists()
    assert log.stats()["pruned_files"] == 2
    log.close()


def test_config_limits_are_checked():
    for bad in ({"max_bytes": 0}, {"retry_records": -1}, {"retry_interval_s": 0}, {"retain_bytes": -1},
                {"retain_s": 0}):
        with pytest.raises(ValueError):
            OutcomeLogConfig("/tmp/x", **bad)
