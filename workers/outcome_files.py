"""Outcome files on disk: listing, retention, and reading that skips and counts what is not a record.

`outcome_log.OutcomeLog` writes the files; everything here only reads or deletes closed ones, so readers (`metaspec
retrain`, `gather_cluster`, tests) need nothing from the writer.

>>> report = read_report(outcome_files("/srv/outcomes"))
>>> len(report.outcomes), report.corrupt[:1], report.torn, report.duplicates
(1200, ['/srv/outcomes/outcomes-n1-7-1.0003.jsonl:17: not an outcome record: JSONDecodeError: ...'], 1, 0)
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from metaspec.selector.types import Outcome

PATTERN = "outcomes-*.jsonl"
_NAME = re.compile(r"^outcomes-(?P<node>.+)-(?P<pid>\d+)-(?P<start>\d+)\.(?P<seq>\d+)\.jsonl$")
log = logging.getLogger(__name__)


# ---- retention ----------------------------------------------------------------------------------------------

def prune(directory: str | Path, retain_bytes: int | None, retain_s: float | None, node: str,
          keep: Iterable[Path] = ()) -> list[Path]:
    """Delete closed outcome files, oldest first, beyond `retain_bytes` in total or older than `retain_s`.

    A file is closed when its writer rotated past it (a later sequence number of the same writer exists), or when
    its writer was a process of this node that is no longer running. Files in `keep` are never deleted.
    """
    if retain_bytes is None and retain_s is None:
        return []
    files = [(p, p.stat()) for p in outcome_files(directory)]
    total = sum(st.st_size for _, st in files)
    closed = _closed(files, node, set(map(Path, keep)))
    removed, now = [], time.time()
    for path, st in sorted(closed, key=lambda ps: ps[1].st_mtime):
        too_old = retain_s is not None and now - st.st_mtime > retain_s
        too_big = retain_bytes is not None and total > retain_bytes
        if not (too_old or too_big):
            continue
        path.unlink(missing_ok=True)
        total -= st.st_size
        removed.append(path)
    return removed


def _closed(files: list[tuple[Path, os.stat_result]], node: str, keep: set[Path]) -> list:
    last: dict[str, int] = {}
    for path, _ in files:
        if m := _NAME.match(path.name):
            base = path.name[: m.start("seq") - 1]
            last[base] = max(last.get(base, -1), int(m["seq"]))
    out = []
    for path, st in files:
        m = _NAME.match(path.name)
        if m is None or path in keep:
            continue
        base = path.name[: m.start("seq") - 1]
        if int(m["seq"]) < last[base] or (m["node"] == node and not _alive(int(m["pid"]))):
            out.append((path, st))
    return out


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True   # this process: its own older files are closed by sequence, its current one is in `keep`
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# ---- reading and gathering ----------------------------------------------------------------------------------

@dataclass
class ReadReport:
    """What `read_report` found: the records, and every line it skipped instead of aborting."""

    outcomes: list[Outcome] = field(default_factory=list)   # sorted by finish time, each record once
    corrupt: list[str] = field(default_factory=list)        # "path:line: reason" of complete lines skipped
    torn: int = 0                                           # files whose cut last line was dropped
    duplicates: int = 0                                     # records seen again (a retry of a surviving line)
    seen: set[str] = field(default_factory=set, repr=False)  # the records kept, as JSON (to find duplicates)


def outcome_files(directory: str | Path) -> list[Path]:
    """Every outcome file under `directory` (not recursive), oldest name first."""
    return sorted(Path(directory).expanduser().glob(PATTERN))


def _raw_lines(path: Path) -> tuple[list[bytes], bool]:
    """Complete lines of one file and whether a torn last line (no newline: the write was cut) was dropped."""
    data = path.read_bytes()
    end = data.rfind(b"\n")
    return data[: end + 1].splitlines(), end + 1 < len(data)


def read_lines(path: Path) -> list[str]:
    """The complete UTF-8 lines of one file; a torn last line and lines that are not UTF-8 are left out."""
    out = []
    for raw in _raw_lines(path)[0]:
        try:
            out.append(raw.decode())
        except UnicodeDecodeError:
            continue
    return out


def parse_lines(lines: Iterable[tuple[str, bytes | str]], report: ReadReport) -> ReadReport:
    """(where, line) pairs into `report`: records kept once each, blank lines ignored, the rest counted."""
    seen = report.seen
    for where, raw in lines:
        try:
            line = raw.decode() if isinstance(raw, bytes) else raw
            if not line.strip():
                continue
            outcome = Outcome.from_json(line)
            key = outcome.to_json()
        except Exception as exc:  # noqa: BLE001 - JSON, schema, types, depth: any bad line is skipped
            report.corrupt.append(f"{where}: not an outcome record: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        report.outcomes.append(outcome)
    report.outcomes.sort(key=lambda o: o.ts)
    return report


def read_report(paths: Iterable[str | Path]) -> ReadReport:
    """Every record of every file in `paths`, with what was skipped (corrupt lines, torn tails, duplicates)."""
    report = ReadReport()
    for path in map(Path, paths):
        lines, torn = _raw_lines(path)
        report.torn += torn
        parse_lines(((f"{path}:{no}", raw) for no, raw in enumerate(lines, 1)), report)
    return report


def read_outcomes(paths: Iterable[str | Path]) -> list[Outcome]:
    """Outcomes of every file in `paths`, sorted by finish time; corrupt lines are skipped (and logged)."""
    report = read_report(paths)
    if report.corrupt:
        log.warning("outcome log: %d corrupt lines skipped, first: %s", len(report.corrupt), report.corrupt[0])
    return report.outcomes


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
    report = parse_lines(((f"node {i}", line) for i, lines in enumerate(ray.get(refs)) for line in lines),
                         ReadReport())
    if report.corrupt:
        log.warning("outcome log: %d corrupt lines skipped, first: %s", len(report.corrupt), report.corrupt[0])
    return report.outcomes
