"""The outcome log: durable appends, rotation, torn-line tolerance, merging, and no acknowledged record lost to
a SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from metaspec.selector.types import Outcome
from metaspec.workers.outcome_log import (OutcomeLog, OutcomeLogConfig, merge, outcome_files, read_lines,
                                          read_outcomes)


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


def test_a_torn_last_line_is_skipped_but_a_corrupt_complete_line_is_an_error(tmp_path):
    path = tmp_path / "outcomes-x-1-1.0000.jsonl"
    good = outcome(1).to_json() + "\n"
    path.write_text(good + outcome(2).to_json()[:40])          # the second write was cut by a kill
    assert read_lines(path) == [good.strip()]
    assert [o.request_id for o in read_outcomes([path])] == ["r1"]
    path.write_text(good + "{not json}\n" + good)
    with pytest.raises(ValueError, match=r":2: not an outcome record"):
        read_outcomes([path])


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
