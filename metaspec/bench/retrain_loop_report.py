"""The retraining loop's report (`retrain_loop.py` runs it): `retrain_loop.txt` (round 0's table; per round and
level auto / the best fixed arm, / the oracle, / ar; what each round routed and retrained; the machine's state
over each round's passes) and `retrain_loop.png` (routed tokens/s per round against the best fixed arm and the
oracle, each repeat's pass drawn faint), beside `retrain_loop.json`."""

from __future__ import annotations

from pathlib import Path

from metaspec.bench.report import write_files
from metaspec.bench.trace_report import spread, table


def _f(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def format_loop(result: dict) -> str:
    m, t = result["machine"], result["trace"]
    lines = [f"retraining loop: {t['n']}-request mixed trace, levels "
             f"{','.join(map(str, result['config']['concurrency']))}, explore {result['config']['explore']}, "
             f"train on {result['config']['train_on']} · {m['cpu_model']} · load avg at start "
             f"{'/'.join(f'{x:.2f}' for x in m['load_avg_1_5_15'])}", "",
             table(result["round0_records"], "round 0 (fixed arm + exploration; every fixed arm named)"), "",
             f"{'round':>5} {'conc':>5} {'auto tok/s':>11} {'best fixed':>18} {'oracle est':>11} {'auto/fixed':>11} "
             f"{'auto/oracle':>12} {'auto/ar':>8}  selector; auto/fixed's spread over the round's repeats"]
    versions = {r["round"]: r["selector_version"] for r in result["rounds"]}
    for c in result["comparison"]:
        fixed = f"{c['best_fixed']} {_f(c['best_fixed_tokens_per_s'])}"
        lines.append(f"{c['round']:>5} {c['concurrency']:>5} {c['auto_tokens_per_s']:>11.1f} {fixed:>18} "
                     f"{_f(c['oracle_tokens_per_s']):>11} {_f(c['auto_vs_best_fixed'], '.2f'):>11} "
                     f"{_f(c['auto_vs_oracle'], '.2f'):>12} {_f(c.get('auto_vs_ar'), '.2f'):>8}  "
                     f"{versions[c['round']]}"
                     f"{spread(c.get('auto_vs_best_fixed_by_repeat', []))}")
    lines.append("")
    for r in result["rounds"]:
        rt = r["retrain"] or {}
        lines.append(f"round {r['round']}: routed {r['routed_methods']} (explored {r['explored']}); retrain: "
                     + (f"{rt.get('training_records')} records -> {rt.get('kind')} written={rt.get('written')} "
                        f"{rt.get('reason', '')}{hedge_text(rt)} reload {_f(r['reload_s'])} s" if rt else "-"))
    lines += [machine_text(r) for r in result["rounds"] if machine_text(r)]
    lines.append("oracle arms per level: " + "; ".join(f"{lv}: {o.get('oracle_arms')}"
                                                       for lv, o in result["oracle"].items() if lv != "all"))
    return "\n".join(lines)


def machine_text(rd: dict) -> str:
    """`round 1 machine: canary 2.10-2.31 ms over 18 passes, steal <= 0.4%, busy 61-97%`: how fast the machine was
    around the round's passes (trace.measure), so a round that ran slow can be told from a machine that did."""
    passes = [x for per in rd.get("auto_passes", {}).values() for x in per] + [
        x for arms in rd.get("fixed_passes", {}).values() for per in arms.values() for x in per]
    canary = [x["canary_ms"] for x in passes if x.get("canary_ms") is not None]
    if not canary:
        return ""
    steal = [x["steal_frac"] for x in passes if x.get("steal_frac") is not None]
    busy = [x["busy_frac"] for x in passes if x.get("busy_frac") is not None]
    return (f"round {rd['round']} machine: canary {min(canary):.2f}-{max(canary):.2f} ms over {len(canary)} passes"
            + (f", steal <= {100 * max(steal):.1f}%" if steal else "")
            + (f", busy {100 * min(busy):.0f}-{100 * max(busy):.0f}%" if busy else ""))


def hedge_text(retrain: dict) -> str:
    """` hedge margin 0.1 (held-out 0.91, unhedged 0.88)`, or nothing for a retrain without a hedge."""
    hedge = retrain.get("hedge")
    if not hedge:
        return ""
    return (f" hedge margin {hedge['margin']:g} (held-out {_f(retrain.get('new_score'), '.3f')}, unhedged "
            f"{_f(retrain.get('unhedged_score'), '.3f')})")


def plot_loop(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(dict.fromkeys(c["concurrency"] for c in result["comparison"]))
    fig, axes = plt.subplots(1, len(levels), figsize=(3.2 * len(levels), 3.6), squeeze=False)
    for ax, lv in zip(axes[0], levels):
        cs = [c for c in result["comparison"] if c["concurrency"] == lv]
        xs = [c["round"] for c in cs]
        ax.plot(xs, [c["auto_tokens_per_s"] for c in cs], "-o", label="auto (routed)")
        ax.plot(xs, [c["best_fixed_tokens_per_s"] for c in cs], "--s", label=f"best fixed ({cs[0]['best_fixed']})")
        for rd in result["rounds"]:               # each repeat's own pass, faint (rounds run with --repeats)
            arm = cs[0]["best_fixed"]
            for passes, color in ((rd.get("auto_passes", {}).get(lv, []), "C0"),
                                  (rd.get("fixed_passes", {}).get(lv, {}).get(arm, []), "C1")):
                if len(passes) > 1:
                    ax.plot([rd["round"]] * len(passes), [x["output_tokens_per_s"] for x in passes], ".",
                            color=color, alpha=0.4)
        if cs[0]["oracle_tokens_per_s"]:
            ax.axhline(cs[0]["oracle_tokens_per_s"], color="gray", ls=":", label="oracle (est., round 0)")
        ax.set_title("whole trace" if lv == "all" else f"concurrency {lv}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_xticks(xs)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)                  # each level's own best fixed arm
    axes[0][0].set_ylabel("output tokens/s")
    fig.suptitle("retraining loop: routed throughput per round", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_loop(result: dict, out_dir: Path) -> dict[str, Path]:
    return write_files(out_dir, ("retrain_loop.json", "retrain_loop.txt", "retrain_loop.png"), result,
                       format_loop(result), lambda path: plot_loop(result, path))
