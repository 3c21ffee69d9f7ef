"""`metaspec bench serve` reporting, as pure functions: traces -> metric records -> table, ratios and plot.

Definitions (as `vllm bench serve`): TTFT = send -> first streamed chunk; TPOT = (last chunk - first chunk) /
(output tokens - 1), per request; ITL = gap between consecutive chunks of one request (a chunk holds every token
one step emitted, so speculation shows as fewer, larger gaps); throughput = completed requests (output tokens)
over the load's wall time, from the first send to the last end. Percentiles are over the requests (TTFT, TPOT)
or gaps (ITL) of every repeat pooled; throughputs are the median over repeats.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from metaspec.bench.load import Trace

LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms")
FIELDS = ("method", "concurrency", "request_throughput", "output_tokens_per_s") + LATENCIES


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated q-th percentile (numpy's default), None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def dist(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values) if values else None, "p50": percentile(values, 50),
            "p99": percentile(values, 99)}


def samples(traces: list[Trace]) -> dict[str, list[float]]:
    """Per-request latency samples (ms) of the requests that finished without an error."""
    ok = [t for t in traces if t.error is None and t.t_chunks]
    return {
        "ttft_ms": [1e3 * (t.t_chunks[0] - t.t_send) for t in ok],
        "tpot_ms": [1e3 * (t.t_chunks[-1] - t.t_chunks[0]) / (t.tokens - 1) for t in ok if t.tokens > 1],
        "itl_ms": [1e3 * (b - a) for t in ok for a, b in zip(t.t_chunks, t.t_chunks[1:])],
    }


def run_metrics(traces: list[Trace], wall_s: float) -> dict:
    """One measured load: throughputs, counts and latency distributions."""
    ok = [t for t in traces if t.error is None]
    tokens, drafts = sum(t.tokens for t in ok), sum(t.drafts for t in ok)
    lat = samples(traces)
    return {
        "requests": len(traces), "completed": len(ok), "failed": len(traces) - len(ok),
        "errors": sorted({t.error for t in traces if t.error})[:3], "output_tokens": tokens, "wall_s": wall_s,
        "request_throughput": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "acceptance_length": 1 + sum(t.accepted for t in ok) / drafts if drafts else 1.0,
    } | {k: dist(v) for k, v in lat.items()}


def step_stats(before: dict | None, after: dict | None) -> dict:
    """The engine's step counters over one load: steps, tokens scored, requests per step."""
    if before is None or after is None:
        return {}
    hist = {b: n - before["batch_hist"].get(b, 0) for b, n in after["batch_hist"].items()}
    hist = {b: n for b, n in sorted(hist.items()) if n > 0}
    steps = after["steps"] - before["steps"]
    scored = after["tokens_scored"] - before["tokens_scored"]
    plain = after.get("plain_steps", 0) - before.get("plain_steps", 0)   # (engines before the draft guard: 0)
    return {"steps": steps, "tokens_scored": scored, "tokens_per_step": scored / steps if steps else None,
            "plain_share": plain / steps if steps else None,
            "mean_batch": sum(b * n for b, n in hist.items()) / steps if steps else None,
            "max_batch_seen": max(hist, default=0), "batch_hist": {str(b): n for b, n in hist.items()}}


def aggregate(runs: list[dict], traces: dict[tuple, list[Trace]]) -> list[dict]:
    """One record per (method, concurrency) in first-seen order: FIELDS first, extras after."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["method"], r["concurrency"])].append(r)
    out = []
    for key, rs in groups.items():
        lat = samples(traces[key])
        med = {f: statistics.median(r[f] for r in rs) for f in ("request_throughput", "output_tokens_per_s")}
        out.append({"method": key[0], "concurrency": key[1], **med, **{k: dist(v) for k, v in lat.items()},
                    **_extras(rs)})
    return out


def _extras(rs: list[dict]) -> dict:
    def med(field: str):
        xs = [r[field] for r in rs if r.get(field) is not None]
        return statistics.median(xs) if xs else None

    return {"repeats": len(rs), "output_tokens_per_s_runs": [r["output_tokens_per_s"] for r in rs],
            "requests": sum(r["requests"] for r in rs), "failed": sum(r["failed"] for r in rs),
            "output_tokens": sum(r["output_tokens"] for r in rs), "acceptance_length": med("acceptance_length"),
            "steps": med("steps"), "mean_batch": med("mean_batch"), "tokens_per_step": med("tokens_per_step"),
            "plain_share": med("plain_share"),
            "max_batch_seen": max((r.get("max_batch_seen") or 0 for r in rs), default=0),
            "peak_rss_mb": max((r.get("peak_rss_mb") or 0 for r in rs), default=None),
            "request_rate": rs[0].get("request_rate")}


# ---- ratios ----------------------------------------------------------------------------------------------

def _tps(records: list[dict], method: str, concurrency: int) -> float | None:
    return next((r["output_tokens_per_s"] for r in records
                 if r["method"] == method and r["concurrency"] == concurrency), None)


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(records: list[dict], hf: list[dict], baseline: list[dict]) -> dict:
    """The issue's target ratios, where the run measured both sides (output tokens/s)."""
    levels = sorted({r["concurrency"] for r in records})
    out: dict = {"ar_vs_ar_at_1": {str(c): _div(_tps(records, "ar", c), _tps(records, "ar", 1)) for c in levels}}
    out["vs_hf_generate_batch"] = {str(r["concurrency"]): _div(_tps(records, "ar", r["concurrency"]),
                                                               r["output_tokens_per_s"]) for r in hf}
    out["vs_baseline"] = {f"{b['method']}@{b['concurrency']}": _div(_tps(records, b["method"], b["concurrency"]),
                                                                     b["output_tokens_per_s"]) for b in baseline}
    return out


# ---- text and plot ---------------------------------------------------------------------------------------

def _f(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def table(records: list[dict], title: str) -> str:
    """One line per record: throughputs, then p50/p99 of each latency, then the engine's batch stats."""
    if not records:
        return ""
    w = max(10, *(len(r["method"]) + 1 for r in records))
    head = (f"{'method':<{w}}{'conc':>5}{'req/s':>8}{'out tok/s':>10}{'TTFT p50/p99 ms':>17}"
            f"{'TPOT p50/p99 ms':>17}{'ITL p50/p99 ms':>16}{'acc len':>8}{'batch':>7}{'fail':>5}{'plain':>6}")
    lines = [title, head]
    for r in records:
        lat = "".join(f"{_f(r[k]['p50']) + '/' + _f(r[k]['p99']):>{17 if k != 'itl_ms' else 16}}" for k in LATENCIES)
        lines.append(f"{r['method']:<{w}}{r['concurrency']:>5}{r['request_throughput']:>8.2f}"
                     f"{r['output_tokens_per_s']:>10.1f}{lat}{_f(r.get('acceptance_length'), '.2f'):>8}"
                     f"{_f(r.get('mean_batch')):>7}{r.get('failed', 0):>5}"
                     f"{_share(r.get('plain_share')):>6}")
    return "\n".join(lines)


def ratio_lines(rs: dict) -> str:
    lines = ["ratios (output tokens/s, same run)"]
    for c, x in rs["ar_vs_ar_at_1"].items():
        lines.append(f"  ar @{c} / ar @1: {_f(x, '.2f')}")
    for c, x in rs["vs_hf_generate_batch"].items():
        lines.append(f"  ar / HF generate_batch @{c}: {_f(x, '.2f')}")
    for key, x in rs["vs_baseline"].items():
        lines.append(f"  new / old engine {key}: {_f(x, '.2f')}")
    return "\n".join(lines)


def plot(series: dict[str, list[dict]], path: Path, title: str) -> None:
    """Output tokens/s against concurrency (log2 x axis), one line per method of each engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for engine, records in series.items():
        style = {"metaspec": "-o", "hf": ":s"}.get(engine, "--^")
        for method in dict.fromkeys(r["method"] for r in records):
            rs = sorted((r for r in records if r["method"] == method), key=lambda r: r["concurrency"])
            label = method if engine == "metaspec" else f"{method} ({engine})"
            ax.plot([r["concurrency"] for r in rs], [r["output_tokens_per_s"] for r in rs], style, label=label)
    ax.set_xscale("log", base=2)
    levels = sorted({r["concurrency"] for rs in series.values() for r in rs})
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.minorticks_off()
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_files(out_dir: Path, names: tuple[str, str, str], result: dict, text: str, plot) -> dict[str, Path]:
    """A benchmark's three outputs under out_dir, named `names`: the result as JSON, the human table `text` and
    the PNG `plot(path)` draws; {json, table, png} -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / name for kind, name in zip(("json", "table", "png"), names)}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["table"].write_text(text + "\n")
    plot(paths["png"])
    return paths
