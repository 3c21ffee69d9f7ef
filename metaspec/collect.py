"""`metaspec collect`: every arm on a categorised prompt set, interleaved per prompt, written as outcome records.

The records are `selector.types.Outcome` JSON lines with source="collect" — the format of the service's outcome
log — so `metaspec retrain` learns from both the same way. Prompts come from `metaspec.prompts` (Spec-Bench
groups, HumanEval, GSM8K) plus JSONSchemaBench schemas (category `json_schema`, loaded here; they run without an
attached constraint until the engine takes one).

>>> cfg = CollectConfig(target="/tmp/tiny/t", drafter="/tmp/tiny/d", n_per_category=1, max_tokens=8)  # doctest: +SKIP
>>> summary = collect(cfg, Path("outcomes.jsonl"))                                                     # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import random
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from metaspec.prompts import CATEGORIES, Prompt, find_data_dir, load_prompts, sample_prompts
from metaspec.selector.features import (FEATURE_VERSION, RequestInput, ngram_tail_hit_rate, pool_features,
                                        request_features)
from metaspec.selector.types import Outcome

DEFAULT_CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
JSON_SCHEMA_FILE = "jsonschemabench_sample.jsonl"
COLLECT_CATEGORIES = (*CATEGORIES, "json_schema")


@dataclass(frozen=True)
class CollectConfig:
    target: str = str(DEFAULT_CHECKPOINTS / "target")        # HF causal LM
    drafter: str | None = str(DEFAULT_CHECKPOINTS / "drafter")  # drafter sharing the tokenizer; None = none
    dtype: str = "bfloat16"                  # compute dtype of both models
    threads: int | None = None               # torch intra-op threads (None = torch's default)
    arms: tuple[str, ...] | None = None      # arms to run (None = every arm the engine can run)
    categories: tuple[str, ...] | None = None  # None = COLLECT_CATEGORIES
    n_per_category: int = 8                  # prompts sampled per category
    max_tokens: int = 64                     # tokens generated per run
    temperatures: tuple[float, ...] = (0.0,)  # each prompt runs once per temperature (0 = greedy)
    repeats: int = 1                         # interleaved passes over all prompts
    ignore_eos: bool = True                  # emit max_tokens every run, so tokens/s is measured over as many
    seed: int = 0                            # prompt sampling and decoding seed
    data_dir: str | None = None              # shared/data folder (None = found by walking up from cwd)
    pool: str = "local"                      # pool name written in each record
    hardware_json: str | None = None         # the pool's hardware profile as JSON (None = this machine's)
    warmup: bool = True                      # one untimed run per arm first
    progress: bool = True                    # tqdm progress bar


def local_hardware() -> dict[str, float | str]:
    """This machine as a hardware profile. On a CPU every core can hold one half of a PEARL pair."""
    cores = os.cpu_count() or 1
    mem_gb = 0.0
    try:
        with open("/proc/meminfo") as f:
            mem_gb = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2**20
    except (OSError, StopIteration):
        pass
    return {"accelerator": "cpu", "mem_gb": round(mem_gb, 1), "rel_speed": 1.0, "cores": cores, "devices": cores}


def json_schema_prompts(data_dir: Path) -> list[Prompt]:
    path = data_dir / JSON_SCHEMA_FILE
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in filter(str.strip, f):
            row = json.loads(line)
            schema = json.dumps(row["schema"], separators=(",", ":"))
            text = f"Write a JSON object that satisfies this JSON schema.\nSchema: {schema}\nJSON:\n"
            out.append(Prompt(f"jsonschema/{row['subset']}/{row['id']}", "json_schema", text))
    return out


def choose_prompts(cfg: CollectConfig, data_dir: Path) -> list[Prompt]:
    wanted = cfg.categories or COLLECT_CATEGORIES
    if unknown := set(wanted) - set(COLLECT_CATEGORIES):
        raise ValueError(f"unknown categories {sorted(unknown)}; known: {', '.join(COLLECT_CATEGORIES)}")
    base = [c for c in wanted if c != "json_schema"]
    chosen = sample_prompts(load_prompts(data_dir), cfg.n_per_category, cfg.seed, tuple(base)) if base else []
    if "json_schema" in wanted:
        pool = json_schema_prompts(data_dir)
        chosen += random.Random(f"{cfg.seed}/json_schema").sample(pool, min(cfg.n_per_category, len(pool)))
    return chosen


def _outcome(prompt: Prompt, method: str, pool: str, feats: dict, temperature: float, max_tokens: int,
             result, repeat: int) -> Outcome:
    s = result.stats
    return Outcome(
        request_id=f"collect/{prompt.prompt_id}/{method}/t{temperature}/r{repeat}", ts=time.time(), source="collect",
        pool=pool, method=method, status="OK", features=feats, prompt_id=prompt.prompt_id,
        category=prompt.category, reason="collect", selector_version="collect", prompt_tokens=result.prompt_tokens,
        completion_tokens=len(result.token_ids), ttft_s=result.ttft_s, wall_s=result.wall_s,
        tokens_per_s=result.tokens_per_s, acceptance_length=float(s.get("acceptance_length", 1.0)),
        acceptance_rate=float(s.get("acceptance_rate", 0.0)), finish_reason=result.finish_reason,
        fallback=s.get("fallback"), temperature=temperature, max_tokens=max_tokens, has_constraint=False)


def runs(cfg: CollectConfig, engine, prompts: list[Prompt], methods: list[str], hardware: dict
         ) -> Iterator[Outcome]:
    """Every (repeat, prompt, temperature, arm) run, arms rotated per prompt so drift hits all alike."""
    from metaspec.workers.engine import Request
    from metaspec.workers.types import SamplingParams

    budget = engine.target.max_context - cfg.max_tokens - engine.cfg.k_max - 2
    pool_feats = pool_features(hardware, 0.0)
    table = engine.resources.get("ngram_table")
    hit_rate = ngram_tail_hit_rate(table) if table is not None else None
    turn = 0
    for repeat in range(cfg.repeats):
        for prompt in prompts:
            ids = engine.tokenizer.encode(prompt.text, add_special_tokens=False)
            text = prompt.text if len(ids) <= budget else engine.tokenizer.decode(ids[-budget:])
            ids = ids[-budget:]
            for t in cfg.temperatures:
                params = SamplingParams(temperature=t, max_tokens=cfg.max_tokens, ignore_eos=cfg.ignore_eos,
                                        seed=zlib.crc32(f"{cfg.seed}/{prompt.prompt_id}".encode()))
                feats = request_features(RequestInput(ids, text, cfg.max_tokens, t, params.top_p, False), hit_rate)
                feats |= pool_feats | {"feature_version": float(FEATURE_VERSION)}
                turn += 1
                first = None
                for method in methods[turn % len(methods):] + methods[: turn % len(methods)]:
                    result = engine.generate(Request(prompt_ids=tuple(ids), params=params, method=method))
                    first = first or result
                    yield _outcome(prompt, method, cfg.pool, feats, t, cfg.max_tokens, result, repeat)
                if table is not None:  # once, after every arm ran: no arm drafts from this prompt's own output
                    table.learn(ids, first.token_ids)


def build_engine(cfg: CollectConfig):
    """An in-process engine with local (Redis-less) n-gram and adjacency tables, so the table-driven arms run;
    the tables warm up from the collected traffic itself, as a fresh service's would (the n-gram table learns each
    request once, in `runs`, not from every arm's run of it)."""
    import torch

    from metaspec.workers.engine import Engine, EngineConfig
    from metaspec.workers.model import ModelConfig

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    drafter = ModelConfig(cfg.drafter, cfg.dtype, threads=cfg.threads) if cfg.drafter else None
    engine = Engine(EngineConfig(ModelConfig(cfg.target, cfg.dtype, threads=cfg.threads), drafter,
                                 default_method="ar", learn_emitted=False))
    try:
        from metaspec.workers.store import AdjacencyTable, NgramConfig, NgramTable
    except ImportError:      # a build without the table-driven arms
        return engine
    vocab = engine.target.vocab_size
    engine.resources.update({"ngram_table": NgramTable(NgramConfig(), vocab), "adjacency_table": AdjacencyTable(vocab)})
    return engine


def collect(cfg: CollectConfig, out: Path, append: bool = False) -> dict:
    """Run the collection, appending one JSON line per run to `out` as it finishes; returns a summary."""
    from tqdm import tqdm

    engine = build_engine(cfg)
    available = engine.available_methods()
    methods = list(cfg.arms or available)
    if missing := [m for m in methods if m not in available]:
        raise ValueError(f"arms {missing} cannot run here; available: {', '.join(available)}")
    hardware = json.loads(cfg.hardware_json) if cfg.hardware_json else local_hardware()
    prompts = choose_prompts(cfg, Path(cfg.data_dir) if cfg.data_dir else find_data_dir())
    if cfg.warmup:
        warm = list(runs(CollectConfig(**(asdict(cfg) | {"repeats": 1, "temperatures": (0.0,)})), engine,
                         prompts[:1], methods, hardware))
        del warm
    out.parent.mkdir(parents=True, exist_ok=True)
    total = cfg.repeats * len(prompts) * len(cfg.temperatures) * len(methods)
    n, t0 = 0, time.perf_counter()
    with open(out, "a" if append else "w", encoding="utf-8") as f, \
            tqdm(total=total, desc="collect", unit="run", disable=not cfg.progress) as bar:
        for outcome in runs(cfg, engine, prompts, methods, hardware):
            f.write(outcome.to_json() + "\n")
            f.flush()
            n += 1
            bar.set_postfix_str(f"{outcome.category}/{outcome.method}", refresh=False)
            bar.update()
    return {"records": n, "prompts": len(prompts), "methods": methods, "out": str(out), "hardware": hardware,
            "wall_s": round(time.perf_counter() - t0, 1)}
