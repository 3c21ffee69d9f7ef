"""`metaspec generate`: one prompt with the automatic method, and `--compare`: every arm on that prompt.

>>> engine = local_engine(GenerateConfig())            # the shipped target and drafter
>>> rows = compare_methods(engine, "def f(x):", SamplingParams(max_tokens=8), repeats=1)
>>> rows[0]["method"], rows[0]["speedup_vs_ar"]
('ar', 1.0)
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from metaspec.workers.engine import Chunk, Engine, EngineConfig, Request, Result
from metaspec.workers.model import ModelConfig
from metaspec.workers.types import SamplingParams

DEFAULT_CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


@dataclass(frozen=True)
class GenerateConfig:
    target: str = str(DEFAULT_CHECKPOINTS / "target")              # HF causal LM (path or hub id)
    drafter: str | None = str(DEFAULT_CHECKPOINTS / "drafter")     # draft model; None = arms needing one are off
    dtype: str = "auto"                                            # compute dtype of both models
    threads: int | None = None                                     # torch intra-op threads (None = default)


def check_checkpoint(path: str) -> None:
    """Fail clearly on a local checkpoint path that does not exist (hub ids pass through to HF)."""
    if (Path(path).is_absolute() or path.startswith(".")) and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no HF checkpoint (config.json) at {path}; pass --target/--drafter or run "
                                "`metaspec train` to build the shipped models")


def local_engine(cfg: GenerateConfig, learn_emitted: bool = True) -> Engine:
    """An in-process engine over the given checkpoints (the shipped ones by default); `learn_emitted` as in
    EngineConfig (off in benchmarks, where one run must not teach the next)."""
    for path in filter(None, (cfg.target, cfg.drafter)):
        check_checkpoint(path)
    target = ModelConfig(cfg.target, dtype=cfg.dtype, threads=cfg.threads)
    drafter = ModelConfig(cfg.drafter, dtype=cfg.dtype, threads=cfg.threads) if cfg.drafter else None
    if drafter is None:  # the engine's default arm may need a drafter; AR needs nothing
        return Engine(EngineConfig(target=target, default_method="ar", learn_emitted=learn_emitted))
    return Engine(EngineConfig(target=target, drafter=drafter, learn_emitted=learn_emitted))


def stream_text(engine: Engine, request: Request, out: TextIO | None = None) -> Result:
    """Print the text as it is verified (to stdout by default); return the final Result."""
    out = out or sys.stdout
    for item in engine.stream(request):
        if isinstance(item, Chunk):
            out.write(item.text)
            out.flush()
        else:
            out.write("\n")
            return item
    raise AssertionError("stream ended without a Result")


def stats_line(result: Result) -> str:
    s = result.stats
    return (f"[{result.method} · {len(result.token_ids)} tokens · {result.tokens_per_s:.1f} tok/s · "
            f"acceptance length {s.acceptance_length:.2f} · finish {result.finish_reason}"
            + (f" · fell back to ar: {s.fallback}" if s.fallback else "") + "]")


def compare_methods(engine: Engine, prompt: str, params: SamplingParams, repeats: int = 3) -> list[dict]:
    """Every available arm on one prompt (AR first): one warm-up each, then `repeats` interleaved timed runs.

    Per method: median tokens/s, speed-up vs AR (ratio of median seconds per token), acceptance length and
    whether the output equals AR's token for token (expected under greedy; under sampling only a seed match).
    """
    methods = ["ar"] + [m for m in engine.available_methods() if m != "ar"]
    for m in methods:
        engine.generate(Request(prompt=prompt, params=params, method=m))
    runs: dict[str, list[Result]] = {m: [] for m in methods}
    for r in range(repeats):
        for m in methods[r % len(methods):] + methods[: r % len(methods)]:
            runs[m].append(engine.generate(Request(prompt=prompt, params=params, method=m)))
    spt = {m: statistics.median(x.wall_s / max(1, len(x.token_ids)) for x in rs) for m, rs in runs.items()}
    ar_ids = runs["ar"][0].token_ids
    return [{
        "method": m, "tokens": len(rs[0].token_ids), "tokens_per_s": 1 / spt[m] if spt[m] > 0 else 0.0,
        "speedup_vs_ar": spt["ar"] / spt[m] if spt[m] > 0 else None,
        "acceptance_length": rs[0].stats.acceptance_length, "same_as_ar": rs[0].token_ids == ar_ids,
        "fallback": rs[0].stats.fallback,
    } for m, rs in runs.items()]


def compare_table(rows: list[dict], greedy: bool) -> str:
    lines = [f"{'method':<10}{'tokens':>7}{'tok/s':>9}{'vs AR':>8}{'acc len':>9}  same as AR"]
    for r in rows:
        same = ("yes" if r["same_as_ar"] else "NO") if greedy else ("yes" if r["same_as_ar"] else "no (sampled)")
        lines.append(f"{r['method']:<10}{r['tokens']:>7}{r['tokens_per_s']:>9.1f}{r['speedup_vs_ar']:>7.2f}x"
                     f"{r['acceptance_length']:>9.2f}  {same}" + (" (fell back to ar)" if r["fallback"] else ""))
    return "\n".join(lines)
