"""`metaspec eval-selector`: grouped-CV and leave-one-category-out routing quality, overall and per category,
concurrency level and temperature, as JSON, a table and a plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .evaluate import cross_validated, embedding_ablation, leave_one_category_out
from .model import library_versions
from .train import MODEL_KINDS, Table, build_table, fit_model, load_outcomes


def prompt_texts() -> dict[str, str]:
    """prompt_id -> text for every prompt `metaspec collect` can use ({} when the shared data is absent)."""
    from metaspec.collect import json_schema_prompts
    from metaspec.prompts import find_data_dir, load_prompts

    try:
        data_dir = find_data_dir()
    except FileNotFoundError:
        return {}
    return {p.prompt_id: p.text for p in load_prompts(data_dir) + json_schema_prompts(data_dir)}


def latency(table: Table, kind: str, texts: list[str], seed: int = 0) -> dict:
    """p50/p99 of featurisation + choice for a `kind` model fitted on the table, over real prompt texts."""
    from .latency import DEFAULT_POOLS, choice_latency_us
    from .selector import Selector, SelectorConfig
    from .types import PoolInfo

    selector = Selector(fit_model(table, kind, seed), SelectorConfig(epsilon=0.05, seed=seed))
    pools = [PoolInfo(p.name, tuple(table.methods), p.hardware, p.load) for p in DEFAULT_POOLS]
    sample = texts[:: max(1, len(texts) // 300)]            # ~300 prompts of every category, 3 rounds
    return choice_latency_us(selector, sample, pools, rounds=3)


def evaluate_outcomes(paths: list[str | Path], kinds: tuple[str, ...] = MODEL_KINDS, n_splits: int = 5,
                      seed: int = 0, loco: bool = True, embed_dims: int = 0) -> dict:
    t0 = time.perf_counter()
    outcomes, bad = load_outcomes(paths)
    table = build_table(outcomes)
    result = cross_validated(table, kinds, n_splits, seed)
    result["leave_one_category_out"] = leave_one_category_out(table, result["best_kind"], seed) if loco else {}
    texts = prompt_texts()
    if texts:
        result["choice_latency"] = latency(table, result["best_kind"], list(texts.values()), seed)
    if embed_dims:
        result["embedding_ablation"] = embedding_ablation(table, texts, result["best_kind"], embed_dims, n_splits,
                                                          seed)
    result |= {"inputs": [str(p) for p in paths], "unreadable_lines": bad, "skipped": table.skipped,
               "data_hash": table.data_hash, "versions": library_versions(),
               "wall_s": round(time.perf_counter() - t0, 1)}
    return result


def _policies(block: dict, best_kind: str) -> list[str]:
    fixed = [k for k in block if k.startswith("fixed:")]
    return [best_kind, *(k for k in MODEL_KINDS if k in block and k != best_kind), "oracle", *fixed, "always_ar",
            "random"]


SLICE_BLOCKS = ("per_category", "per_concurrency", "per_temperature")


def _blocks(result: dict) -> list[tuple[str, dict]]:
    """("overall", block), then every slice's (name, block) in SLICE_BLOCKS order."""
    return [("overall", result["overall"])] + [(name, block) for part in SLICE_BLOCKS
                                               for name, block in result.get(part, {}).items()]


def _oracle_table(result: dict, policies: list[str]) -> list[str]:
    lines = ["routed throughput / oracle (top-1 accuracy):", f"{'':<22}" + "".join(f"{p[:16]:>18}" for p in policies)]
    for name, block in _blocks(result):
        cells = [f"{block[p]['oracle_frac']:.3f} ({block[p]['top1']:.2f})" if block.get(p, {}).get("requests")
                 else "-" for p in policies]
        lines.append(f"{name:<22}" + "".join(f"{c:>18}" for c in cells))
    return lines


def _regret_table(result: dict) -> list[str]:
    """Per slice: tokens/s of the selector, the overall best fixed arm, the slice's own best arm and the oracle;
    the selector's ratio to each fixed arm; its mean regret against the per-request oracle."""
    best = result["best_kind"]
    lines = [f"\ntokens/s per slice ({best} | fixed = best arm overall | slice-best = best arm on the slice, in "
             "hindsight | oracle); regret = mean per-request oracle tokens/s - chosen:",
             f"{'':<16}{'reqs':>6}{best:>9}{'fixed':>9}{'slice-best':>22}{'oracle':>9}{'x fixed':>9}"
             f"{'x slice-best':>14}{'regret':>9}"]
    for name, block in _blocks(result):
        fixed = next((k for k in block if k.startswith("fixed:")), None)
        sel, orc, sb = block[best], block["oracle"], block.get("best_fixed")
        f_tps = block[fixed]["tokens_per_s"] if fixed else float("nan")
        sb_cell = f"{sb['arm'].split('/')[-1]} {sb['tokens_per_s']:.1f}" if sb else "-"
        sb_ratio = f"{sel['tokens_per_s'] / sb['tokens_per_s']:.3f}" if sb else "-"
        lines.append(f"{name:<16}{sel['requests']:>6}{sel['tokens_per_s']:>9.1f}{f_tps:>9.1f}{sb_cell:>22}"
                     f"{orc['tokens_per_s']:>9.1f}{sel['tokens_per_s'] / f_tps:>9.3f}{sb_ratio:>14}"
                     f"{sel['mean_regret_tps']:>9.1f}")
    return lines


def format_table(result: dict) -> str:
    """Rows: overall, each category, concurrency level and temperature, each left-out category; columns: oracle
    fraction per policy (+ top-1); then tokens/s and regret per slice."""
    best = result["best_kind"]
    lines = [f"selector = {best} (best by grouped {result['folds']}-fold CV) · {result['requests']} requests, "
             f"{result['rows']} runs · best fixed arm {result['best_fixed_arm']}"]
    lines += _oracle_table(result, [p for p in _policies(result["overall"], best) if p in result["overall"]])
    lines += _regret_table(result)
    if result.get("leave_one_category_out"):
        lines.append(f"\nleave one category out ({best} trained on the others; fixed = best arm on the others):")
        for cat, block in result["leave_one_category_out"].items():
            fixed = next((k for k in block if k.startswith("fixed:")), None)
            fixed_cell = f"{fixed} {block[fixed]['oracle_frac']:.3f}" if fixed else "fixed: (arm not run here)"
            lines.append(f"{cat:<22}{best} {block[best]['oracle_frac']:.3f} ({block[best]['top1']:.2f})   "
                         f"{fixed_cell}   always_ar "
                         f"{block.get('always_ar', {}).get('oracle_frac', float('nan')):.3f}")
    o = result["overall"]
    fixed = next(k for k in o if k.startswith("fixed:"))
    if lat := result.get("choice_latency"):
        lines.append(f"\nfeaturisation + choice ({best}, {lat['candidates']} candidates): p50 {lat['p50_us']:.0f} us, "
                     f"p99 {lat['p99_us']:.0f} us over {lat['calls']} calls")
    if (abl := result.get("embedding_ablation")) and "error" not in abl:
        lines.append(f"MiniLM embedding ({abl['dims']} PCA dims, {abl['embed_ms_per_prompt']:.1f} ms/prompt): "
                     f"oracle fraction {abl['with_embedding']['oracle_frac']:.3f} with vs "
                     f"{abl['without_embedding']['oracle_frac']:.3f} without")
    lines.append(f"\ntargets: routed >= 0.9x oracle: {o[best]['oracle_frac']:.3f}; routed >= 1.1x best fixed arm: "
                 f"{o[best]['tokens_per_s'] / o[fixed]['tokens_per_s']:.3f}x")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    best = result["best_kind"]
    blocks = _blocks(result)
    policies = [p for p in _policies(result["overall"], best) if p != "oracle"]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(blocks)), 4.5))
    width = 0.8 / len(policies)
    for j, p in enumerate(policies):
        vals = [b.get(p, {}).get("oracle_frac", np.nan) for _, b in blocks]
        ax.bar(np.arange(len(blocks)) + j * width, vals, width, label=p)
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(np.arange(len(blocks)) + 0.4 - width / 2, [n for n, _ in blocks], rotation=30, ha="right")
    ax.set_ylabel("routed throughput / oracle")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"selector ({best}) vs baselines, held-out prompts (grouped CV)")
    ax.legend(fontsize=7, ncol=4, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval.json", "table": out_dir / "table.txt", "png": out_dir / "routing.png"}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["table"].write_text(format_table(result) + "\n")
    plot(result, paths["png"])
    return paths
