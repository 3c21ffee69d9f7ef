"""Benchmark records → summary rows, text tables and the speed-up plot (pure functions over `bench.json` data).

Per prompt, repeats are reduced by the median seconds per token; speed-up vs AR is the ratio of those per-prompt
times (AR's / the arm's, same prompts, same run), reduced over prompts by the geometric mean.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

ALL = "all"


def geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def per_prompt_s_per_token(records: list[dict]) -> dict[tuple[str, str, str], float]:
    """(category, arm, prompt_id) → median over repeats of wall seconds per emitted token."""
    runs = defaultdict(list)
    for r in records:
        if r["tokens"]:
            runs[(r["category"], r["arm"], r["prompt_id"])].append(r["wall_s"] / r["tokens"])
    return {key: statistics.median(v) for key, v in runs.items()}


def _with_all(records: list[dict]) -> list[dict]:
    return records + [r | {"category": ALL} for r in records]


def _ratio(spt: dict, category: str, num_arm: str, den_arm: str) -> float | None:
    """Geometric mean over prompts of spt[den]/spt[num]: how much faster `num_arm` is than `den_arm`."""
    ratios = [spt[(c, den_arm, p)] / s for (c, a, p), s in spt.items()
              if c == category and a == num_arm and (c, den_arm, p) in spt]
    return geomean(ratios)


def summary_row(category: str, arm: str, runs: list[dict], spt: dict) -> dict:
    tps = [1 / s for (c, a, _), s in spt.items() if c == category and a == arm]
    drafts = sum(r["drafts"] or 0 for r in runs)
    drafted = sum(r["drafted"] or 0 for r in runs)
    accepted = sum(r["accepted"] or 0 for r in runs)
    ours = runs[0]["family"] == "ours"
    checked = [r["matches_ar"] for r in runs if r.get("matches_ar") is not None]
    return {
        "category": category, "arm": arm, "family": runs[0]["family"], "baseline_of": runs[0]["baseline_of"],
        "n_prompts": len(tps), "n_runs": len(runs),
        "tokens_per_s_median": statistics.median(tps) if tps else None,
        "tokens_per_s_mean": statistics.fmean(tps) if tps else None,
        "speedup_vs_ar": _ratio(spt, category, arm, "ar"),
        "acceptance_length": (1 + accepted / drafts if drafts else 1.0) if ours else None,
        "acceptance_rate": (accepted / drafted if drafted else 0.0) if ours else None,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "run_mem_mb": max((r["peak_rss_mb"] - r["rss_start_mb"] for r in runs if r.get("rss_start_mb") is not None),
                          default=None),  # how far one run rose above the memory it started with
        "mismatches_vs_ar": sum(not m for m in checked), "checked_vs_ar": len(checked),
        "fallbacks": sum(bool(r.get("fallback")) for r in runs),
    }


def summarize(records: list[dict], order: list[str]) -> list[dict]:
    """One row per (category, arm), categories in first-seen order then `all`; arms in `order`."""
    recs = _with_all(records)
    spt = per_prompt_s_per_token(recs)
    groups = defaultdict(list)
    for r in recs:
        groups[(r["category"], r["arm"])].append(r)
    categories = list(dict.fromkeys(r["category"] for r in recs))
    return [summary_row(c, a, groups[(c, a)], spt) for c in categories for a in order if (c, a) in groups]


def hf_ratios(records: list[dict]) -> list[dict]:
    """Per category: our arm's speed over HF's counterpart (sps/hf_assisted, pld/hf_pld, ar/hf_greedy)."""
    recs = _with_all(records)
    spt = per_prompt_s_per_token(recs)
    pairs = sorted({(r["baseline_of"], r["arm"]) for r in records if r["family"] == "hf"}, key=lambda p: p[1])
    categories = list(dict.fromkeys(r["category"] for r in recs))
    return [{"category": c, "ours": ours, "hf": hf, "ratio": _ratio(spt, c, ours, hf)}
            for c in categories for ours, hf in pairs if _ratio(spt, c, ours, hf) is not None]


def table_gains(records: list[dict]) -> list[dict]:
    """Per category: each table-driven arm's speed warm over cold (`X:warm` vs `X:cold`, same prompts, same run)."""
    recs = _with_all(records)
    spt = per_prompt_s_per_token(recs)
    names = {r["arm"] for r in records}
    methods = sorted({a.rsplit(":", 1)[0] for a in names if a.endswith(":warm") and a[:-5] + ":cold" in names})
    categories = list(dict.fromkeys(r["category"] for r in recs))
    return [{"category": c, "arm": m, "ratio": _ratio(spt, c, f"{m}:warm", f"{m}:cold")}
            for c in categories for m in methods if _ratio(spt, c, f"{m}:warm", f"{m}:cold") is not None]


# ---- text ----------------------------------------------------------------------------------------------------

def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def matrix(rows: list[dict], key: str, spec: str = ".2f", title: str = "") -> str:
    """Category × arm table of one summary field."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    categories = list(dict.fromkeys(r["category"] for r in rows))
    cell = {(r["category"], r["arm"]): r[key] for r in rows}
    width = max(8, *map(len, arms)) + 1
    lines = [title, f"{'category':<15}" + "".join(f"{a:>{width}}" for a in arms)]
    for c in categories:
        lines.append(f"{c:<15}" + "".join(f"{_fmt(cell.get((c, a)), spec):>{width}}" for a in arms))
    return "\n".join(lines)


def overall_table(rows: list[dict]) -> str:
    w = max([12] + [len(r["arm"]) + 1 for r in rows])
    head = (f"{'arm':<{w}}{'tok/s med':>10}{'tok/s mean':>11}{'vs AR':>7}{'acc len':>8}{'acc rate':>9}"
            f"{'peak MiB':>9}{'+run MiB':>9}{'mismatch':>10}")
    lines = ["overall (all categories)", head]
    for r in rows:
        if r["category"] == ALL:
            lines.append(f"{r['arm']:<{w}}{_fmt(r['tokens_per_s_median'], '.1f'):>10}"
                         f"{_fmt(r['tokens_per_s_mean'], '.1f'):>11}{_fmt(r['speedup_vs_ar']):>7}"
                         f"{_fmt(r['acceptance_length']):>8}{_fmt(r['acceptance_rate']):>9}"
                         f"{r['peak_rss_mb']:>9.0f}{_fmt(r['run_mem_mb'], '.1f'):>9}{r['mismatches_vs_ar']:>6}/{r['checked_vs_ar']:<3}")
    return "\n".join(lines)


def ratio_table(ratios: list[dict]) -> str:
    rows = [{"category": r["category"], "arm": f"{r['ours']}/{r['hf']}", "ratio": r["ratio"]} for r in ratios]
    return matrix(rows, "ratio", title="ours vs HF generate (speed ratio, >1 = ours faster)") if rows else ""


def gain_table(gains: list[dict]) -> str:
    return matrix(gains, "ratio", title="warm vs cold tables (speed ratio, >1 = warming helped)") if gains else ""


def _load(machine: dict) -> str:
    load = machine.get("load_avg_1_5_15")
    return "/".join(f"{x:.1f}" for x in load) if load else "-"


def format_tables(result: dict) -> str:
    summary, m = result["summary"], result["machine"]
    parts = [
        f"machine: {m['cpu_model']} · {m['cpu_count']} cpus · {m['torch_threads']} torch threads · {m['dtype']} · "
        f"torch {m['torch']} · transformers {m['transformers']} · load avg at end {_load(m)}",
        overall_table(summary),
        matrix(summary, "speedup_vs_ar", title="speed-up vs AR (geometric mean over prompts)"),
        matrix(summary, "tokens_per_s_median", ".1f", title="tokens/s (median over prompts)"),
        matrix([r for r in summary if r["family"] == "ours"], "acceptance_length",
               title="mean acceptance length (1 + accepted/drafts)"),
        ratio_table(result.get("hf_ratios", [])),
        gain_table(result.get("table_gains", [])),
    ]
    return "\n\n".join(p for p in parts if p)


# ---- plot ----------------------------------------------------------------------------------------------------

def plot_speedup(summary: list[dict], path: Path, title: str = "speed-up vs AR") -> None:
    """Grouped bars: speed-up vs AR per category for every arm but AR (HF baselines hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary if r["arm"] != "ar" and r["speedup_vs_ar"] is not None]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    categories = list(dict.fromkeys(r["category"] for r in summary))
    cell = {(r["category"], r["arm"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(categories) + 2), 4.5))
    width = 0.8 / max(1, len(arms))
    for j, arm in enumerate(arms):
        xs = [i + (j - (len(arms) - 1) / 2) * width for i in range(len(categories))]
        ys = [cell[(c, arm)]["speedup_vs_ar"] if (c, arm) in cell else 0 for c in categories]
        hf = any(cell.get((c, arm), {}).get("family") == "hf" for c in categories)
        ax.bar(xs, ys, width, label=arm, hatch="//" if hf else None, alpha=0.75 if hf else 1.0)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(categories)), categories, rotation=20)
    ax.set_ylabel("speed-up vs AR (×)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=min(len(arms), 6))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
