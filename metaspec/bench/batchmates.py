"""What a request's batchmates cost it: one engine, `batch` requests at once, all on one table arm, against the same
batch with `mates` of them moved to another arm, greedy or sampled.

    python -m metaspec.bench.batchmates [--table-arm pld] [--batch 16] [--mates 4] [--repeats 3] [--out DIR]

In one step every request waits for the whole batch: a batchmate whose arm drafts with a model (sps's drafter,
early_exit's shallow layers) adds its drafting to every step, and a sampled one's drafts are never cut by the
draft budget (a batch-dependent cut would change its sample). The selector scores a request's own tokens/s; this
measures the part it does not see. Reported per configuration: the mean over the table-arm requests that stay
(the first batch - mates) of their own tokens/s (each request's tokens over its own wall time), relative to the
batch where every request runs the table arm, and the batch's total tokens/s. Configurations are interleaved,
every repeat runs each once; medians over repeats. The staying requests' greedy tokens are checked to be the same
in every configuration and repeat (an arm's output never depends on its batchmates). Output: batchmates.json,
table.txt, batchmates.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ALONE = "alone"


@dataclass(frozen=True)
class BatchmatesConfig:
    table_arm: str = "pld"                       # the arm of the requests that stay
    mate_arms: tuple[str, ...] = ("ar", "sps", "early_exit")   # what the moved requests run (each greedy, sampled)
    batch: int = 16                              # requests submitted at once
    mates: int = 4                               # of them moved to the other arm
    max_tokens: int = 64                         # every request ignores EOS: equal lengths
    temperature: float = 0.7                     # of the sampled mates
    repeats: int = 3
    dtype: str = "float32"                       # the shipped pool's settings
    threads: int = 1
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.mates < self.batch or self.repeats < 1 or self.max_tokens < 2:
            raise ValueError("0 < mates < batch, repeats >= 1, max_tokens >= 2")

    def configurations(self) -> dict[str, tuple[str, bool]]:
        """name -> (the mates' arm, sampled)."""
        out = {ALONE: (self.table_arm, False)}
        for arm in self.mate_arms:
            out |= {f"+{self.mates} {arm}": (arm, False), f"+{self.mates} {arm} sampled": (arm, True)}
        return out


def run(cfg: BatchmatesConfig, engine, texts: list[str]) -> dict:
    """Every configuration once per repeat, interleaved; per run the staying requests' own tokens/s."""
    from tqdm import tqdm

    from metaspec.workers.engine import Request
    from metaspec.workers.types import SamplingParams

    if len(texts) < cfg.batch:
        raise ValueError(f"{cfg.batch} prompts needed, {len(texts)} given")
    greedy = SamplingParams(max_tokens=cfg.max_tokens, ignore_eos=True)
    configs = cfg.configurations()
    stay = cfg.batch - cfg.mates
    engine.generate_many([Request(prompt=t, method="ar", params=SamplingParams(max_tokens=4)) for t in texts[:4]])
    runs, outputs = [], {}
    with tqdm(total=cfg.repeats * len(configs), desc="batchmates", unit="batch") as bar:
        for rep in range(cfg.repeats):
            for name, (arm, sampled) in configs.items():
                mate = SamplingParams(max_tokens=cfg.max_tokens, ignore_eos=True, seed=rep,
                                      temperature=cfg.temperature) if sampled else greedy
                requests = [Request(prompt=t, method=cfg.table_arm, params=greedy) for t in texts[:stay]]
                requests += [Request(prompt=t, method=arm, params=mate) for t in texts[stay: cfg.batch]]
                t0 = time.perf_counter()
                results = engine.generate_many(requests)
                wall = time.perf_counter() - t0
                outputs.setdefault(name, []).append([r.token_ids for r in results[:stay]])
                runs.append({"config": name, "repeat": rep,
                             "stay_tokens_per_s": statistics.fmean(r.tokens_per_s for r in results[:stay]),
                             "batch_tokens_per_s": sum(len(r.token_ids) for r in results) / wall})
                bar.update(1)
    same = all(o == outputs[ALONE][0] for runs_of in outputs.values() for o in runs_of)
    return {"config": asdict(cfg), "runs": runs, "summary": summarize(runs), "stay_outputs_identical": same}


def summarize(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per configuration: medians over repeats, and the staying requests' tokens/s against the same repeat's
    all-table batch (median of the per-repeat ratios).

    >>> summarize([{"config": "alone", "repeat": 0, "stay_tokens_per_s": 30.0, "batch_tokens_per_s": 480.0},
    ...            {"config": "+4 sps", "repeat": 0, "stay_tokens_per_s": 27.0, "batch_tokens_per_s": 450.0}])["+4 sps"]
    {'stay_tokens_per_s': 27.0, 'batch_tokens_per_s': 450.0, 'stay_vs_alone': 0.9}
    """
    alone = {r["repeat"]: r["stay_tokens_per_s"] for r in runs if r["config"] == ALONE}
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["config"] for r in runs):
        rows = [r for r in runs if r["config"] == name]
        out[name] = {k: statistics.median(r[k] for r in rows) for k in ("stay_tokens_per_s", "batch_tokens_per_s")}
        out[name]["stay_vs_alone"] = round(statistics.median(r["stay_tokens_per_s"] / alone[r["repeat"]]
                                                             for r in rows if alone.get(r["repeat"])), 4)
    return out


def table(rep: dict) -> str:
    cfg = rep["config"]
    lines = [f"batch of {cfg['batch']}: {cfg['batch'] - cfg['mates']} greedy {cfg['table_arm']} requests stay, "
             f"{cfg['mates']} move to another arm; {cfg['max_tokens']} tokens each, {cfg['dtype']}, "
             f"{cfg['threads']} thread(s), {cfg['repeats']} repeat(s)",
             f"{'batchmates':<26}{'stay tok/s (own)':>18}{'vs alone':>10}{'batch tok/s':>13}"]
    for name, s in rep["summary"].items():
        lines.append(f"{name:<26}{s['stay_tokens_per_s']:>18.1f}{s['stay_vs_alone']:>10.2f}"
                     f"{s['batch_tokens_per_s']:>13.1f}")
    lines.append(f"staying requests' greedy tokens identical in every configuration: {rep['stay_outputs_identical']}")
    return "\n".join(lines)


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rep["summary"])
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.barh(names, [rep["summary"][n]["stay_vs_alone"] for n in names], color="tab:blue")
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel(f"own tokens/s of the staying {rep['config']['table_arm']} requests vs an all-"
                  f"{rep['config']['table_arm']} batch")
    ax.set_title(f"what batchmates cost: batch {rep['config']['batch']}, {rep['config']['mates']} moved", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from metaspec.bench.backends import EngineSpec, build_engine
    from metaspec.prompts import find_data_dir, load_prompts

    p = argparse.ArgumentParser(prog="python -m metaspec.bench.batchmates", description=__doc__.split("\n\n")[0])
    p.add_argument("--table-arm", default="pld")
    p.add_argument("--mate-arms", default="ar,sps,early_exit")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--mates", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=f"runs/batchmates-{time.strftime('%Y%m%d-%H%M%S')}")
    a = p.parse_args(argv)
    cfg = BatchmatesConfig(table_arm=a.table_arm, mate_arms=tuple(filter(None, a.mate_arms.split(","))),
                           batch=a.batch, mates=a.mates, max_tokens=a.max_tokens, repeats=a.repeats,
                           data_dir=a.data_dir)
    engine = build_engine(EngineSpec(dtype=cfg.dtype, threads=cfg.threads, max_batch=cfg.batch))
    try:
        texts = [q.text for q in load_prompts(find_data_dir() if cfg.data_dir is None else Path(cfg.data_dir))]
        rep = run(cfg, engine, texts)
    finally:
        engine.close()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batchmates.json").write_text(json.dumps(rep, indent=1))
    (out / "table.txt").write_text(table(rep) + "\n")
    plot(rep, out / "batchmates.png")
    print(table(rep))
    print(f"\njson: {out / 'batchmates.json'}  table: {out / 'table.txt'}  png: {out / 'batchmates.png'}")
    return 0 if rep["stay_outputs_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
