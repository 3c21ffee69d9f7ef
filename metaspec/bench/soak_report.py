"""`metaspec soak` reporting, as pure functions: the calls and samples of one soak -> checks, soak.json, a table and
soak.png (RSS per process and requests/s over time, with the Redis restart and the replica kill marked)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from metaspec.bench.report import percentile

MIXED_OK = {"OK", "CANCELLED_BY_CLIENT", "RESOURCE_EXHAUSTED"}   # what a well-formed request may get
HOSTILE_OK = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}   # what a hostile one may get
BIN_S = 5.0                                                      # requests/s are counted in bins this wide


def report(cfg, calls: list, timeline, stuck: int, logged: set[str]) -> dict:
    """Everything soak.json holds: counts, latencies, memory, the tables' resync, the checks, the plot's series."""
    mixed = [c for c in calls if c.kind == "mixed"]
    hostile = [c for c in calls if c.kind != "mixed"]
    ev = timeline.events
    wall_s = ev.get("load_end", timeline.now())
    ok = [c for c in mixed if c.code == "OK"]
    memory = memory_growth(timeline.rss, ev.get("redis_restart", 0.0), wall_s)
    rep = {
        "config": asdict(cfg), "events_s": dict(ev), "killed": timeline.killed, "wall_s": wall_s,
        "requests": len(calls), "stuck_threads": stuck,
        "mixed_codes": dict(Counter(c.code for c in mixed)), "hostile_codes": dict(Counter(c.code for c in hostile)),
        "hostile_by_case": {k: dict(Counter(c.code for c in hostile if c.kind == k))
                            for k in dict.fromkeys(c.kind for c in hostile)},
        "mixed_codes_by_phase": phases(mixed, ev),
        "methods": dict(Counter(c.method for c in ok)),
        "ok_requests_per_s": len(ok) / wall_s if wall_s else 0.0,
        "ok_tokens_per_s": sum(c.tokens for c in ok) / wall_s if wall_s else 0.0,
        "latency_s": {q: percentile([c.t1 - c.t0 for c in ok], q) for q in (50, 99)},
        "longest_s": max((c.t1 - c.t0 for c in calls if not math.isnan(c.t1)), default=0.0),
        "acknowledged": sum(c.recorded is True for c in calls), "unrecorded": sum(c.recorded is False for c in calls),
        "logged": len(logged), "memory": memory, "tables": resync(timeline, ev.get("redis_restart")),
        "ngram_contexts": contexts_growth(timeline.tables, ev.get("redis_restart", 0.0), wall_s),
        "series": {"rss": timeline.rss, "rps": rate_series(calls, wall_s), "redis_keys": timeline.redis_keys,
                   "tables": timeline.tables},
        "calls": [asdict(c) for c in calls],
    }
    rep["checks"] = checks(cfg, calls, stuck, logged, memory, rep["tables"], ev)
    rep["passed"] = all(c["ok"] for c in rep["checks"])
    return rep


def phases(calls: list, ev: dict) -> dict[str, dict[str, int]]:
    """Codes of the calls started before the Redis restart, between it and the kill, and after the kill."""
    edges = [("before_redis_restart", ev.get("redis_restart", math.inf)),
             ("before_replica_kill", ev.get("replica_kill", math.inf)), ("after_replica_kill", math.inf)]
    out: dict[str, Counter] = {name: Counter() for name, _ in edges}
    for c in calls:
        out[next(name for name, edge in edges if c.t0 < edge)][c.code] += 1
    return {k: dict(v) for k, v in out.items()}


def memory_growth(rss: list, t_warm: float, t_end: float) -> dict[str, dict]:
    """Per process: RSS (MiB) at its last sample by `t_warm` (the end of warm-up) and by `t_end`. Processes
    started after `t_warm` (the killed replica's replacement) have no warm value and are not held to it."""
    by_pid: dict[int, list] = {}
    for t, pid, label, mib in rss:
        by_pid.setdefault(pid, []).append((t, label, mib))
    out = {}
    for pid, rows in by_pid.items():
        warm = [m for t, _, m in rows if t <= t_warm]
        end = [m for t, _, m in rows if t <= t_end]
        out[str(pid)] = {"label": rows[0][1], "first_s": rows[0][0], "last_s": rows[-1][0],
                         "warm_mib": warm[-1] if warm else None, "end_mib": end[-1] if end else None,
                         "max_mib": max(m for _, _, m in rows),
                         "alive_at_end": rows[-1][0] >= t_end}
    return out


def contexts_growth(tables: list, t_warm: float, t_end: float) -> dict:
    """One replica's n-gram contexts at the end of warm-up and at the end (the router's mirror of the shared table
    holds as many: what its RSS grows with, up to `NgramConfig.max_contexts`)."""
    counts = [(t, s.get("ngram_contexts")) for t, s in tables if s.get("ngram_contexts") is not None]
    warm = [n for t, n in counts if t <= t_warm]
    end = [n for t, n in counts if t <= t_end]
    return {"warm": warm[-1] if warm else None, "end": end[-1] if end else None,
            "max": max((n for _, n in counts), default=None)}


def resync(timeline, t_restart: float | None) -> dict:
    """Did the tables come back after the Redis restart: Redis's key count and the replicas' sync state after it."""
    if t_restart is None:
        return {}
    keys_after = [(t, n) for t, n in timeline.redis_keys if t > t_restart]
    refilled = next((t for t, n in keys_after if n > 0), None)
    before = [s for t, s in timeline.tables if t <= t_restart]
    # a replacement replica reports connected=False, syncs=0 until its first sync: judged once it has synced
    after = [s for t, s in timeline.tables if t > t_restart and (s["syncs"] or 0) > 0]
    return {"keys_before_restart": max((n for t, n in timeline.redis_keys if t <= t_restart), default=None),
            "keys_at_end": keys_after[-1][1] if keys_after else None,
            "refilled_after_s": None if refilled is None else refilled - t_restart,
            "syncs_before_restart": max((s["syncs"] or 0 for s in before), default=None),
            "syncs_at_end": after[-1]["syncs"] if after else None,
            "errors_at_end": after[-1]["errors"] if after else None,
            "connected_at_end": after[-1]["connected"] if after else None}


def rate_series(calls: list, wall_s: float) -> list[tuple[float, float, float]]:
    """(bin end s, OK mixed requests/s, all requests/s) per BIN_S of the load."""
    bins = max(1, math.ceil(wall_s / BIN_S))
    ok, every = [0] * bins, [0] * bins
    for c in calls:
        if not math.isnan(c.t1) and c.t1 < bins * BIN_S:
            i = int(c.t1 // BIN_S)
            every[i] += 1
            ok[i] += c.kind == "mixed" and c.code == "OK"
    return [((i + 1) * BIN_S, ok[i] / BIN_S, every[i] / BIN_S) for i in range(bins)]


def _in_kill_window(c, ev: dict, grace_s: float) -> bool:
    kill = ev.get("replica_kill")
    return kill is not None and c.t0 <= kill + grace_s and (math.isnan(c.t1) or c.t1 >= kill)


def _hung(cfg, c) -> bool:
    deadline = cfg.deadline_s if c.kind == "mixed" else cfg.hostile_deadline_s
    return (math.isnan(c.t1) or c.t1 - c.t0 > deadline + cfg.slack_s
            or (c.kind == "mixed" and c.code == "DEADLINE_EXCEEDED"))


def _check(name: str, bad: list, detail: str) -> dict:
    return {"name": name, "ok": not bad, "detail": detail, "examples": bad[:5]}


def checks(cfg, calls: list, stuck: int, logged: set[str], memory: dict, tables: dict, ev: dict) -> list[dict]:
    def brief(c) -> str:
        return f"{c.rid} {c.kind} {'stream' if c.stream else 'unary'} {c.method or 'auto'} -> {c.code} at {c.t0:.1f}s"

    def unexpected(c) -> bool:
        allowed = MIXED_OK if c.kind == "mixed" else HOSTILE_OK
        return c.code not in allowed and not (c.code == "UNAVAILABLE" and _in_kill_window(c, ev, cfg.kill_grace_s))

    internal = [brief(c) for c in calls if c.code in ("INTERNAL", "UNKNOWN")]
    hung = [brief(c) for c in calls if _hung(cfg, c)] + [f"{stuck} client threads still in a call"] * (stuck > 0)
    odd = [brief(c) for c in calls if unexpected(c)]
    lost = [brief(c) for c in calls if c.recorded is True and c.rid not in logged]
    silent = [brief(c) for c in calls if c.code == "OK" and c.recorded is None]
    grew = [f"{v['label']} {pid}: {v['warm_mib']:.0f} -> {v['end_mib']:.0f} MiB" for pid, v in memory.items()
            if v["warm_mib"] is not None and v["alive_at_end"]
            and v["end_mib"] - v["warm_mib"] > max(cfg.rss_growth_frac * v["warm_mib"], cfg.rss_growth_mib)]
    held = [v for v in memory.values() if v["warm_mib"] is not None and v["alive_at_end"]]
    phase = phases([c for c in calls if c.kind == "mixed"], ev)
    idle = [f"no OK request started {k.replace('_', ' ')}" for k, v in phase.items() if not v.get("OK")]
    back = [] if tables.get("refilled_after_s") is not None and tables.get("connected_at_end") else [str(tables)]
    return [
        _check("no_internal", internal, f"{len(internal)} INTERNAL/UNKNOWN of {len(calls)}"),
        _check("no_hung", hung, f"{len(hung)} hung (no answer by deadline + {cfg.slack_s:.0f} s, or a mixed "
                                f"DEADLINE_EXCEEDED)"),
        _check("expected_codes", odd, f"{len(odd)} calls outside mixed {sorted(MIXED_OK)} / hostile "
                                      f"{sorted(HOSTILE_OK)} (UNAVAILABLE allowed within {cfg.kill_grace_s:.0f} s "
                                      "of the kill)"),
        _check("served_every_phase", idle, "OK requests before the Redis restart, before and after the kill"),
        _check("acknowledged_on_disk", lost, f"{sum(c.recorded is True for c in calls) - len(lost)} of "
                                             f"{sum(c.recorded is True for c in calls)} acknowledged outcomes found "
                                             f"in the log ({len(logged)} records)"),
        _check("ok_replies_say_recorded", silent, f"{len(silent)} OK replies without an {'outcome-recorded'} trailer"),
        _check("memory_flat", grew if held else ["no process sampled both after warm-up and at the end"],
               f"{len(held)} processes: RSS at the end <= RSS at 1/3 + max({100 * cfg.rss_growth_frac:.0f}%, "
               f"{cfg.rss_growth_mib:.0f} MiB)"),
        _check("tables_resynced", back, "Redis holds keys again after its restart and the replicas are connected"),
    ]


# ---- output -------------------------------------------------------------------------------------------------

def table(rep: dict) -> str:
    ev, cfg = rep["events_s"], rep["config"]
    lines = [f"soak: {rep['wall_s']:.0f} s, {cfg['concurrency']} clients + {cfg['hostile_per_s']:g} hostile/s; Redis "
             f"restarted at {ev.get('redis_restart', 0):.0f} s, {rep['killed'] or 'no replica'} killed at "
             f"{ev.get('replica_kill', 0):.0f} s",
             f"mixed:   {_codes(rep['mixed_codes'])}", f"hostile: {_codes(rep['hostile_codes'])}",
             f"OK: {rep['ok_requests_per_s']:.2f} req/s, {rep['ok_tokens_per_s']:.1f} tok/s, latency p50/p99 "
             f"{_f(rep['latency_s'][50])}/{_f(rep['latency_s'][99])} s, longest call {rep['longest_s']:.1f} s",
             f"outcomes: {rep['acknowledged']} acknowledged, {rep['unrecorded']} not recorded, {rep['logged']} "
             "in the log",
             f"tables: {rep['tables']}", f"n-gram contexts (one replica): {rep.get('ngram_contexts')}",
             f"{'process':<8}{'pid':>9}{'RSS@1/3':>10}{'RSS end':>10}{'max':>8}  (MiB)"]
    for pid, m in rep["memory"].items():
        lines.append(f"{m['label']:<8}{pid:>9}{_f(m['warm_mib'], '.0f'):>10}{_f(m['end_mib'], '.0f'):>10}"
                     f"{m['max_mib']:>8.0f}  {'' if m['alive_at_end'] else 'gone by the end'}")
    for c in rep["checks"]:
        lines.append(f"[{'PASS' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}")
        lines += [f"       {e}" for e in c["examples"]]
    return "\n".join(lines)


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(codes.items(), key=lambda kv: -kv[1])) or "-"


def _f(x, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write(rep: dict, out_dir: Path) -> None:
    (out_dir / "soak.json").write_text(json.dumps(rep, indent=1, default=str))
    plot(rep, out_dir / "soak.png")


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    by_pid: dict[int, list] = {}
    for t, pid, label, mib in rep["series"]["rss"]:
        by_pid.setdefault(pid, []).append((t, mib, label))
    for pid, rows in by_pid.items():
        top.plot([r[0] for r in rows], [r[1] for r in rows], label=f"{rows[0][2]} {pid}")
    contexts = [(t, st["ngram_contexts"]) for t, st in rep["series"].get("tables", []) if "ngram_contexts" in st]
    if contexts:   # what the router's table mirror grows with
        right = top.twinx()
        right.plot([c[0] for c in contexts], [c[1] / 1e3 for c in contexts], "k--", alpha=0.5,
                   label="n-gram contexts (k, one replica)")
        right.set_ylabel("n-gram contexts (thousands)")
        right.legend(fontsize=7, loc="lower right")
    rps = rep["series"]["rps"]
    bottom.step([r[0] for r in rps], [r[1] for r in rps], where="post", label="OK mixed requests/s")
    bottom.step([r[0] for r in rps], [r[2] for r in rps], where="post", label="all requests/s", alpha=0.6)
    for ax in (top, bottom):
        for name, style in (("redis_restart", "r--"), ("replica_kill", "k:")):
            if name in rep["events_s"]:
                ax.axvline(rep["events_s"][name], color=style[0], linestyle=style[1:], label=name.replace("_", " "))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    top.set_ylabel("RSS (MiB)")
    bottom.set_ylabel("requests/s")
    bottom.set_xlabel("seconds since the load began")
    top.set_title(f"metaspec soak: {rep['config']['concurrency']} clients, {rep['wall_s']:.0f} s, "
                  f"{'passed' if rep['passed'] else 'FAILED'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
