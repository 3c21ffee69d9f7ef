"""The mixed trace's records and report (`trace.py` replays it): one record per (policy, level) and per policy over
the whole trace (output tokens/s, TPOT p50/p99 by `report.py`'s definitions), the ratios the issue's targets name
(auto / best fixed arm, auto / ar; repeat by repeat too), the table, `trace.json`, `trace_table.txt` and
`trace_throughput.png`.
"""

from __future__ import annotations

from pathlib import Path

from metaspec.bench import report

AUTO = "auto"          # the policy that names no method: the service's selector chooses


def summarize(runs: list[dict]) -> list[dict]:
    """One record per (policy, level) and one per policy with concurrency "all" (the whole trace: every level's
    tokens over the summed wall time; TPOT percentiles over every request). `passes`: per repeat, its tokens/s
    (for "all", repeat k's tokens of every level over their summed wall time)."""
    keep = ("output_tokens_per_s", "request_throughput", "output_tokens", "wall_s", "completed", "failed",
            "acceptance_length", "methods", "selector_versions", "explored", "passes")
    out = []
    for r in runs:
        out.append({"policy": r["policy"], "concurrency": r["concurrency"], "tpot_ms": r["tpot_ms"],
                    "ttft_ms": r["ttft_ms"], **{k: r[k] for k in keep if k in r}})
    for policy in dict.fromkeys(r["policy"] for r in runs):
        rs = [r for r in runs if r["policy"] == policy]
        tokens, wall = sum(r["output_tokens"] for r in rs), sum(r["wall_s"] for r in rs)
        lat = report.samples([t for r in rs for t in r["traces"]])
        out.append({"policy": policy, "concurrency": "all", "output_tokens_per_s": tokens / wall if wall else 0.0,
                    "output_tokens": tokens, "wall_s": wall, "failed": sum(r["failed"] for r in rs),
                    "tpot_ms": report.dist(lat["tpot_ms"]), "ttft_ms": report.dist(lat["ttft_ms"]),
                    "passes": pooled_passes([r.get("passes", []) for r in rs])})
    return out


def pooled_passes(levels: list[list[dict]]) -> list[dict]:
    """Repeat k of every level pooled: their tokens over their summed wall time."""
    by_repeat: dict[int, list[dict]] = {}
    for passes in levels:
        for x in passes:
            by_repeat.setdefault(x["repeat"], []).append(x)
    out = []
    for k, xs in sorted(by_repeat.items()):
        tokens, wall = sum(x["output_tokens"] for x in xs), sum(x["wall_s"] for x in xs)
        out.append({"repeat": k, "output_tokens": tokens, "wall_s": wall,
                    "output_tokens_per_s": tokens / wall if wall else 0.0})
    return out


def pass_ratios(a: dict | None, b: dict | None) -> list[float]:
    """a's tokens/s over b's, repeat by repeat (the spread of a ratio the pooled records give once)."""
    if not a or not b:
        return []
    theirs = {x["repeat"]: x["output_tokens_per_s"] for x in b.get("passes", [])}
    return [x["output_tokens_per_s"] / theirs[x["repeat"]] for x in a.get("passes", [])
            if theirs.get(x["repeat"])]


def best_fixed(records: list[dict], level, exclude: tuple[str, ...] = (AUTO,)) -> dict | None:
    """The fixed policy with the most output tokens/s at `level` (or "all")."""
    rs = [r for r in records if r["concurrency"] == level and r["policy"] not in exclude]
    return max(rs, key=lambda r: r["output_tokens_per_s"], default=None)


def ratios(records: list[dict]) -> dict:
    """auto / best fixed arm and auto / ar, per level and over the whole trace (the issue's targets); with
    repeats, also each repeat's own auto / best fixed arm (`..._by_repeat`)."""
    out = {}
    for level in dict.fromkeys(r["concurrency"] for r in records):
        auto = next((r for r in records if r["policy"] == AUTO and r["concurrency"] == level), None)
        best = best_fixed(records, level)
        ar = next((r for r in records if r["policy"] == "ar" and r["concurrency"] == level), None)
        if auto is None:
            continue
        out[str(level)] = {"best_fixed": best["policy"] if best else None,
                           "auto_vs_best_fixed": _div(auto, best), "auto_vs_ar": _div(auto, ar),
                           "auto_vs_best_fixed_by_repeat": pass_ratios(auto, best),
                           "auto_vs_ar_by_repeat": pass_ratios(auto, ar)}
    return out


def _div(a: dict | None, b: dict | None) -> float | None:
    return a["output_tokens_per_s"] / b["output_tokens_per_s"] if a and b and b["output_tokens_per_s"] else None


def _f(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(records: list[dict], title: str = "") -> str:
    """One line per (policy, level), the whole trace last per policy."""
    w = max(12, *(len(r["policy"]) + 1 for r in records))
    lines = [title] if title else []
    lines.append(f"{'policy':<{w}}{'conc':>5}{'out tok/s':>10}{'TPOT p50/p99 ms':>18}{'acc len':>8}{'fail':>5}"
                 f"  routed")
    order = {lv: i for i, lv in enumerate(dict.fromkeys(r["concurrency"] for r in records))}
    for r in sorted(records, key=lambda r: (order[r["concurrency"]], r["policy"] != AUTO, r["policy"])):
        tpot = f"{_f(r['tpot_ms']['p50'])}/{_f(r['tpot_ms']['p99'])}"
        routed = " ".join(f"{m}:{n}" for m, n in sorted((r.get("methods") or {}).items())) \
            if r["policy"] == AUTO else ""
        lines.append(f"{r['policy']:<{w}}{r['concurrency']!s:>5}{r['output_tokens_per_s']:>10.1f}{tpot:>18}"
                     f"{_f(r.get('acceptance_length'), '.2f'):>8}{r.get('failed', 0):>5}  {routed}")
    return "\n".join(lines)


def spread(xs: list[float]) -> str:
    """` (0.97-1.08 over 2 repeats)`, or nothing for fewer than two."""
    return f" ({min(xs):.2f}-{max(xs):.2f} over {len(xs)} repeats)" if len(xs) > 1 else ""


def ratio_lines(rs: dict) -> str:
    lines = ["auto vs fixed (output tokens/s, same run)"]
    for level, x in rs.items():
        lines.append(f"  @{level}: auto / best fixed ({x['best_fixed']}) {_f(x['auto_vs_best_fixed'], '.2f')}"
                     f"{spread(x.get('auto_vs_best_fixed_by_repeat', []))}, auto / ar "
                     f"{_f(x['auto_vs_ar'], '.2f')}{spread(x.get('auto_vs_ar_by_repeat', []))}")
    return "\n".join(lines)


def format_trace(result: dict) -> str:
    m, c, t = result["machine"], result["config"], result["trace"]
    head = (f"mixed trace: {t['n']} requests ({t['constrained']} JSON-schema constrained; temperatures "
            f"{t['temperatures']}; max_tokens {t['max_tokens']}) · backend {c['backend']} · levels "
            f"{','.join(map(str, c['concurrency']))} · {m['cpu_model']} · {m['cpu_count']} cpus · load avg "
            f"start/end {'/'.join(f'{x:.2f}' for x in m['load_avg_1_5_15'])} / "
            f"{'/'.join(f'{x:.2f}' for x in m['load_avg_at_end'])} · tables emptied before every pass: "
            f"{'yes' if t.get('tables_reset') else 'NO (later passes draft from earlier replies)'}")
    return "\n\n".join([head, table(result["records"]), ratio_lines(result["ratios"])])


def write_trace(result: dict, out_dir: Path) -> dict[str, Path]:
    """trace.json, trace_table.txt, trace_throughput.png under out_dir."""
    levels = [r for r in result["records"] if r["concurrency"] != "all"]
    series = {"metaspec": [{"method": r["policy"], **r} for r in levels]}
    title = (f"mixed trace ({result['trace']['n']} requests) · output tokens/s vs concurrency · backend "
             f"{result['config']['backend']}")
    return report.write_files(out_dir, ("trace.json", "trace_table.txt", "trace_throughput.png"), result,
                              format_trace(result), lambda path: report.plot(series, path, title))
