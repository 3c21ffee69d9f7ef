"""`python -m metaspec.bench_pearl`: PEARL against AR and sps in two honest comparisons, plus a traced timeline.

Settings (one process; the CPU affinity and torch threads are switched before every run, and interleaved):
  ar@1, sps@1   the target on CPU 0 with one thread (the drafter of sps runs there too, in turn)
  ar@2, sps@2   the target on CPUs 0-1 with two threads (the whole machine)
  pearl         the target on CPU 0 with one thread, pearl's drafter process on CPU 1 with one thread
  pearl-pv      (--pre-verify) the same with the paper's rule after a rollback: verify the first drafted token alone
Comparison 1, "extra device" (the paper's setting): pearl vs ar@1 / sps@1 — the target gets the same core and
pearl's drafter uses a core sps leaves idle. Comparison 2, "whole machine": pearl vs ar@2 / sps@2.
Every prompt runs every setting once per repeat, in an order rotated per prompt, so machine noise hits all alike.
Output: bench_pearl.json (raw records, summary, round trip, speed ratio, machine), table.md and timeline.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from metaspec.bench.arms import cpu_model, tokenize
from metaspec.bench_generate import DEFAULT_CHECKPOINTS, GenerateConfig, local_engine
from metaspec.prompts import find_data_dir, load_prompts, sample_prompts
from metaspec.workers.decode import decode
from metaspec.workers.engine import Engine, Request
from metaspec.workers.pearl import PearlConfig, pool_for
from metaspec.workers.registry import ArmContext, build
from metaspec.workers.types import DecodeStats, SamplingParams


@dataclass(frozen=True)
class PearlBenchConfig:
    target: str = str(DEFAULT_CHECKPOINTS / "target")     # target checkpoint
    drafter: str = str(DEFAULT_CHECKPOINTS / "drafter")   # drafter checkpoint (shared tokenizer)
    dtype: str = "auto"                                   # compute dtype of both models
    categories: tuple[str, ...] | None = None             # prompt categories (None = all)
    n_per_category: int = 3                               # prompts per category
    repeats: int = 2                                      # interleaved passes
    max_tokens: int = 128                                 # tokens per run (EOS ignored)
    max_prompt_tokens: int = 512                          # keep the last N prompt tokens
    target_cpu: int = 0                                   # the target's core in 1-thread settings
    drafter_cpu: int = 1                                  # pearl's drafter core (the second core of ar@2/sps@2)
    seed: int = 0                                         # prompt sampling seed
    pre_verify: bool = False                              # also run pearl-pv (the paper's 1-token pre-verify)
    quiet_busy: float = 0.15                              # before each prompt, wait until others use less CPU
    quiet_wait_s: float = 120.0                           # ... but no longer than this
    out: str | None = None                                # output folder (None = runs/bench-pearl-<time>)


@dataclass(frozen=True)
class Setting:
    name: str                 # "ar@1", "sps@2", "pearl", ...
    arm: str                  # registered arm
    cpus: tuple[int, ...]     # the calling (target) process's affinity
    threads: int              # torch intra-op threads of the target
    pre_verify: bool = False  # pearl only: PearlConfig.pre_verify


def settings(cfg: PearlBenchConfig) -> list[Setting]:
    one, two = (cfg.target_cpu,), (cfg.target_cpu, cfg.drafter_cpu)
    return [Setting("ar@1", "ar", one, 1), Setting("sps@1", "sps", one, 1), Setting("ar@2", "ar", two, 2),
            Setting("sps@2", "sps", two, 2), Setting("pearl", "pearl", one, 1)] + (
        [Setting("pearl-pv", "pearl", one, 1, pre_verify=True)] if cfg.pre_verify else [])


def apply(setting: Setting) -> None:
    os.sched_setaffinity(0, setting.cpus)
    torch.set_num_threads(setting.threads)


def make_engine(cfg: PearlBenchConfig) -> Engine:
    # Create torch's OpenMP workers while both cores are allowed: a worker keeps the mask it was created with.
    os.sched_setaffinity(0, (cfg.target_cpu, cfg.drafter_cpu))
    torch.set_num_threads(2)
    torch.ones(256, 256) @ torch.ones(256, 256)
    engine = local_engine(GenerateConfig(cfg.target, cfg.drafter, cfg.dtype, None))
    engine.resources["pearl_config"] = PearlConfig(drafter_cpus=(cfg.drafter_cpu,))
    return engine


def run_once(engine: Engine, setting: Setting, ids: list[int], params: SamplingParams) -> dict:
    apply(setting)
    if setting.arm == "pearl":   # its own drafter pool (pools are per config); the idle one sleeps
        engine.resources["pearl_config"] = replace(engine.resources["pearl_config"], pre_verify=setting.pre_verify)
    r = engine.generate(Request(prompt_ids=tuple(ids), params=params, method=setting.arm))
    s = r.stats
    return {"setting": setting.name, "arm": setting.arm, "tokens": len(r.token_ids), "wall_s": r.wall_s,
            "tokens_per_s": r.tokens_per_s, "acceptance_length": s.acceptance_length, "drafted": s.drafted,
            "accepted": s.accepted, "steps": s.steps, "fallback": s.fallback, "token_ids": r.token_ids}


def background_busy(window_s: float = 0.3) -> float:
    """Share of the machine's CPU time that others used over window_s while this process slept (/proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4], sum(v)    # busy (all but idle and iowait), total
    (b0, t0), _, (b1, t1) = sample(), time.sleep(window_s), sample()
    return (b1 - b0) / max(1, t1 - t0)


def wait_quiet(cfg: PearlBenchConfig) -> float:
    """Wait (up to quiet_wait_s) until others use less than quiet_busy of the CPUs; return the last reading."""
    deadline = time.monotonic() + cfg.quiet_wait_s
    busy = background_busy()
    while busy > cfg.quiet_busy and time.monotonic() < deadline:
        time.sleep(1.0)
        busy = background_busy()
    return busy


def run_loop(engine: Engine, cfg: PearlBenchConfig, prompts, params: SamplingParams) -> list[dict]:
    runs = settings(cfg)
    for s in runs:                                                  # warm-up (and start pearl's drafter)
        run_once(engine, s, list(prompts[0].ids), params)
    records = []
    for repeat in range(cfg.repeats):
        for i, bp in enumerate(prompts):
            shift = (i + repeat * len(prompts)) % len(runs)
            busy = wait_quiet(cfg)
            for s in runs[shift:] + runs[:shift]:
                rec = run_once(engine, s, list(bp.ids), params)
                records.append(rec | {"repeat": repeat, "prompt_id": bp.prompt.prompt_id,
                                      "category": bp.prompt.category, "load_avg_1m": os.getloadavg()[0],
                                      "background_busy": busy})
            print(f"[{repeat}] {bp.prompt.category:15s} " + "  ".join(
                f"{r['setting']} {r['tokens_per_s']:6.1f}" for r in records[-len(runs):]), flush=True)
    ar = {(r["repeat"], r["prompt_id"]): r["token_ids"] for r in records if r["setting"] == "ar@1"}
    for r in records:
        r["matches_ar"] = r.pop("token_ids") == ar[(r["repeat"], r["prompt_id"])]
    return records


# ---- summary ---------------------------------------------------------------------------------------------------

def summarize(records: list[dict]) -> list[dict]:
    """Per category (and "all"): tokens/s of each setting (total tokens / total seconds) and the ratios."""
    rows = []
    for cat in sorted({r["category"] for r in records}) + ["all"]:
        sel = [r for r in records if cat in ("all", r["category"])]
        tps = {name: _robust_tps([r for r in sel if r["setting"] == name]) for name in {r["setting"] for r in sel}}
        acc = [r["acceptance_length"] for r in sel if r["setting"] == "pearl"]
        rows.append({"category": cat, "tokens_per_s": tps,
                     "extra_device": {"pearl_vs_ar": tps["pearl"] / tps["ar@1"], "sps_vs_ar": tps["sps@1"] / tps["ar@1"],
                                      "pearl_vs_sps": tps["pearl"] / tps["sps@1"]},
                     "whole_machine": {"pearl_vs_ar": tps["pearl"] / tps["ar@2"], "sps_vs_ar": tps["sps@2"] / tps["ar@2"],
                                       "pearl_vs_sps": tps["pearl"] / tps["sps@2"]},
                     "pearl_acceptance_length": statistics.mean(acc) if acc else None}
                    | _pre_verify_ratios(tps))
    return rows


def _pre_verify_ratios(tps: dict[str, float]) -> dict[str, float]:
    """pearl-pv against sps@1 and pearl against pearl-pv (when pearl-pv ran)."""
    if "pearl-pv" not in tps:
        return {}
    return {"pearl_pv_vs_sps": tps["pearl-pv"] / tps["sps@1"], "pearl_vs_pearl_pv": tps["pearl"] / tps["pearl-pv"]}


def _robust_tps(records: list[dict]) -> float:
    """Tokens/s from each prompt's median wall time over repeats: a burst of other work on this shared machine
    hits one repeat of one setting, and the median drops it instead of averaging it in."""
    walls: dict[str, list[float]] = {}
    tokens: dict[str, int] = {}
    for r in records:
        walls.setdefault(r["prompt_id"], []).append(r["wall_s"])
        tokens[r["prompt_id"]] = r["tokens"]
    return sum(tokens.values()) / sum(statistics.median(w) for w in walls.values())


def noise(records: list[dict]) -> dict:
    """Median relative spread of the same (prompt, setting) across repeats (max - min) / mean, and how busy
    the machine was with other work before each prompt."""
    by: dict[tuple, list[float]] = {}
    for r in records:
        by.setdefault((r["prompt_id"], r["setting"]), []).append(r["wall_s"])
    spreads = [(max(v) - min(v)) / statistics.mean(v) for v in by.values() if len(v) > 1]
    busy = sorted(r["background_busy"] for r in records)
    return {"median_rel_spread": statistics.median(spreads) if spreads else None,
            "p90_rel_spread": sorted(spreads)[int(0.9 * (len(spreads) - 1))] if spreads else None,
            "background_busy_median": busy[len(busy) // 2], "background_busy_max": busy[-1]}


def table(summary: list[dict]) -> str:
    head = ("| category | ar@1 | sps@1 | pearl | ar@2 | sps@2 | extra device: pearl/sps | pearl/ar@1 | "
            "whole machine: pearl/sps@2 | pearl/ar@2 | pearl acc. len |")
    pv = "pearl_pv_vs_sps" in summary[0]
    head += " pearl-pv/sps@1 | pearl/pearl-pv |" if pv else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in summary:
        t, e, w = row["tokens_per_s"], row["extra_device"], row["whole_machine"]
        lines.append(f"| {row['category']} | {t['ar@1']:.1f} | {t['sps@1']:.1f} | {t['pearl']:.1f} | {t['ar@2']:.1f} | "
                     f"{t['sps@2']:.1f} | {e['pearl_vs_sps']:.2f} | {e['pearl_vs_ar']:.2f} | {w['pearl_vs_sps']:.2f} | "
                     f"{w['pearl_vs_ar']:.2f} | {row['pearl_acceptance_length'] or 0:.2f} |"
                     + (f" {row['pearl_pv_vs_sps']:.2f} | {row['pearl_vs_pearl_pv']:.2f} |" if pv else ""))
    return "\n".join(lines)


# ---- round trip, speed ratio, timeline ---------------------------------------------------------------------------

def round_trip_us(engine: Engine, setting: Setting, n: int = 2000) -> dict:
    """Ping the idle drafter: back to back (it is still spinning) and 2 ms apart (it sleeps on the pipe)."""
    apply(setting)
    pool = pool_for(engine.drafter, engine.resources["pearl_config"])
    d, lease_id = pool.lease()
    try:
        hot = sorted(d.ping() * 1e6 for _ in range(n))
        cold = []
        for _ in range(n // 4):
            time.sleep(0.002)
            cold.append(d.ping() * 1e6)
        cold.sort()
    finally:
        pool.release(d, lease_id)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]
    return {"hot_p50_us": pct(hot, 0.5), "hot_p99_us": pct(hot, 0.99), "cold_p50_us": pct(cold, 0.5),
            "cold_p99_us": pct(cold, 0.99), "n_hot": len(hot), "n_cold": len(cold)}


def traced_run(engine: Engine, setting: Setting, ids: list[int], params: SamplingParams) -> dict:
    """One pearl request through decode() with the proposer in hand, for its timeline."""
    apply(setting)
    capacity = len(ids) + params.max_tokens + engine.cfg.k_max + 1
    session = engine.target.session(capacity)
    ctx = ArmContext(target=engine.target, params=params, drafter=engine.drafter, target_session=session,
                     resources=engine.resources)
    proposer, stats = build("pearl", ctx), DecodeStats()
    t0 = time.monotonic_ns()
    for _ in decode(session, proposer, ids, params, None, engine.eos_ids, capacity, engine.cfg.k_max, stats):
        pass
    t1 = time.monotonic_ns()
    pool = pool_for(engine.drafter, engine.resources["pearl_config"])
    info = {"start_ns": t0, "end_ns": t1, "gamma": proposer.gamma, "kept": proposer.kept,
            "speed": pool.speed(engine.target, proposer.d),
            "drafter_step_ms": proposer.d.step_s * 1e3, "stats": asdict(stats), "timeline": proposer.timeline(),
            "drafter_pid": proposer.d.pid, "restarts": pool.restarts}
    proposer.close()
    return info


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [tuple(x) for x in out]


def busy_fractions(trace: dict) -> dict:
    """Share of the decode (after the first draft) each side was busy, and both at once."""
    tgt = _merge([(a, b) for kind, a, b in trace["timeline"]["target"] if kind == "verify"])
    dft = _merge([(a, b) for _, a, b in trace["timeline"]["drafter"]])
    if not tgt:
        return {}
    lo, hi = tgt[0][0], tgt[-1][1]
    clip = lambda xs: [(max(a, lo), min(b, hi)) for a, b in xs if b > lo and a < hi]
    tgt, dft = clip(tgt), clip(dft)
    both = sum(max(0, min(b1, b2) - max(a1, a2)) for a1, b1 in tgt for a2, b2 in dft)
    span = hi - lo
    return {"span_ms": span / 1e6, "target_busy": sum(b - a for a, b in tgt) / span,
            "drafter_busy": sum(b - a for a, b in dft) / span, "both_busy": both / span}


def plot_timeline(trace: dict, path: Path, steps: int = 24) -> None:
    """Two rows (drafter, target) over the first `steps` decode steps: busy intervals, waits and idle gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl, t0 = trace["timeline"], trace["timeline"]["target"][0][1] if trace["timeline"]["target"] else trace["start_ns"]
    ms = lambda ns: (ns - t0) / 1e6
    verify_ends = [ms(b) for k, _, b in tl["target"] if k == "verify"]
    window_ms = verify_ends[min(steps, len(verify_ends)) - 1] * 1.02 if verify_ends else 50.0
    fig, ax = plt.subplots(figsize=(14, 3.6))
    rows = {"drafter": 1, "target": 0}
    colors = {"verify": "tab:blue", "wait": "tab:red", "draft": "tab:green", "prefill": "tab:olive"}
    for side, y in rows.items():
        events = [(k, ms(a), ms(b)) for k, a, b in tl[side] if ms(b) >= 0 and ms(a) <= window_ms]
        busy = sorted((a, b) for k, a, b in events if k != "wait")
        for k, a, b in events:
            ax.broken_barh([(a, b - a)], (y - 0.35, 0.7), color=colors[k])
        for (a1, b1), (a2, b2) in zip(busy, busy[1:]):  # idle gaps
            if a2 - b1 > 0.02:
                ax.broken_barh([(b1, a2 - b1)], (y - 0.35, 0.7), facecolor="none", edgecolor="0.6", hatch="///",
                               linewidth=0)
    ax.set_yticks([0, 1], ["target (CPU 0)", "drafter (CPU 1)"])
    ax.set_xlim(0, window_ms)
    ax.set_xlabel("ms since the first draft")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="none", edgecolor="0.6", hatch="///"))
    ax.legend(handles, ["target forward + verify", "target waits for drafter", "drafter step", "drafter prefill",
                        "idle gap"], loc="lower center", bbox_to_anchor=(0.5, 1.12), ncol=5, fontsize=8, frameon=False)
    f = busy_fractions(trace)
    ax.set_title(f"PEARL timeline: gamma={trace['gamma']}, drafter step {trace['drafter_step_ms']:.2f} ms; "
                 f"busy over the request: target {f.get('target_busy', 0):.0%}, drafter {f.get('drafter_busy', 0):.0%}, "
                 f"both {f.get('both_busy', 0):.0%}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------------------------

def run(cfg: PearlBenchConfig) -> dict:
    engine = make_engine(cfg)
    params = SamplingParams(max_tokens=cfg.max_tokens, ignore_eos=True)
    budget = min(cfg.max_prompt_tokens, engine.target.max_context - cfg.max_tokens - engine.cfg.k_max - 2)
    chosen = sample_prompts(load_prompts(find_data_dir()), cfg.n_per_category, cfg.seed, cfg.categories)
    prompts = tokenize(chosen, engine, budget)
    records = run_loop(engine, cfg, prompts, params)
    pearl = next(s for s in settings(cfg) if s.name == "pearl")
    engine.resources["pearl_config"] = replace(engine.resources["pearl_config"], pre_verify=pearl.pre_verify)
    trace = traced_run(engine, pearl, list(prompts[0].ids), params)
    return {"config": asdict(cfg), "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                                                "torch": torch.__version__, "load_avg_end": os.getloadavg()},
            "round_trip": round_trip_us(engine, pearl), "summary": summarize(records), "noise": noise(records),
            "trace": {k: v for k, v in trace.items() if k != "timeline"} | {"busy": busy_fractions(trace)},
            "records": records, "_timeline": trace}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default=PearlBenchConfig.target)
    ap.add_argument("--drafter", default=PearlBenchConfig.drafter)
    ap.add_argument("--dtype", default=PearlBenchConfig.dtype)
    ap.add_argument("--categories", nargs="*", default=None)
    ap.add_argument("--n-per-category", type=int, default=PearlBenchConfig.n_per_category)
    ap.add_argument("--repeats", type=int, default=PearlBenchConfig.repeats)
    ap.add_argument("--max-tokens", type=int, default=PearlBenchConfig.max_tokens)
    ap.add_argument("--quiet-busy", type=float, default=PearlBenchConfig.quiet_busy)
    ap.add_argument("--quiet-wait-s", type=float, default=PearlBenchConfig.quiet_wait_s)
    ap.add_argument("--pre-verify", action="store_true", help="also run pearl-pv: the paper's 1-token pre-verify")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cfg = PearlBenchConfig(a.target, a.drafter, a.dtype, tuple(a.categories) if a.categories else None,
                           a.n_per_category, a.repeats, a.max_tokens, quiet_busy=a.quiet_busy,
                           quiet_wait_s=a.quiet_wait_s, pre_verify=a.pre_verify, out=a.out)
    result = run(cfg)
    out = Path(cfg.out or time.strftime("runs/bench-pearl-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    plot_timeline(result["_timeline"], out / "timeline.png")
    (out / "timeline.json").write_text(json.dumps(result.pop("_timeline")))
    (out / "bench_pearl.json").write_text(json.dumps(result, indent=1))
    text = table(result["summary"])
    (out / "table.md").write_text(text + "\n")
    print(text)
    print("round trip (us):", json.dumps(result["round_trip"]))
    print("trace:", json.dumps(result["trace"]))
    print("noise:", json.dumps(result["noise"]), "->", out)


if __name__ == "__main__":
    main()
