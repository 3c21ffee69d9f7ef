"""`metaspec collect`: every arm on a categorised prompt set at several concurrency levels and temperatures, with
and without constraints, written as outcome records.

The records are `selector.types.Outcome` JSON lines with source="collect" — the format of the service's outcome
log — so `metaspec retrain` learns from both the same way. Prompts come from `metaspec.prompts` (Spec-Bench
groups, HumanEval, GSM8K) plus JSONSchemaBench schemas (category `json_schema`), which carry their schema as a
constraint. At concurrency c, c prompts of one arm decode together in the replica's batch; each run's tokens/s is
its own output tokens over its own wall time (its submit to its last token) inside that batch, and its features
hold the load it joined (`selector.features.load_features`: its c - 1 peers).

>>> cfg = CollectConfig(target="/tmp/t", drafter="/tmp/d", concurrency=(1, 4), max_tokens=(8,))  # doctest: +SKIP
>>> summary = collect(cfg, Path("outcomes.jsonl"))                                                # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import queue
import random
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from metaspec.prompts import CATEGORIES, Prompt, find_data_dir, load_prompts, sample_prompts
from metaspec.selector.features import (FEATURE_VERSION, RequestInput, load_features, ngram_tail_hit_rate,
                                        pool_features, request_features)
from metaspec.selector.types import Outcome

DEFAULT_CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
JSON_SCHEMA_FILE = "jsonschemabench_sample.jsonl"
COLLECT_CATEGORIES = (*CATEGORIES, "json_schema")


@dataclass(frozen=True)
class CollectConfig:
    target: str = str(DEFAULT_CHECKPOINTS / "target")        # HF causal LM
    drafter: str | None = str(DEFAULT_CHECKPOINTS / "drafter")  # drafter sharing the tokenizer; None = none
    dtype: str = "auto"                      # compute dtype of both models
    threads: int | None = None               # torch intra-op threads (None = torch's default)
    arms: tuple[str, ...] | None = None      # arms to run (None = every arm the engine can run)
    categories: tuple[str, ...] | None = None  # None = COLLECT_CATEGORIES
    n_per_category: int = 8                  # prompts sampled per category
    max_tokens: tuple[int, ...] = (64,)      # each (prompt, temperature, concurrency) draws one of these
    temperatures: tuple[float, ...] = (0.0,)  # each prompt runs once per temperature (0 = greedy)
    concurrency: tuple[int, ...] = (1,)      # requests of one arm decoded together; each prompt runs at each level
    constrain: bool = True                   # json_schema prompts carry their schema as a constraint
    repeats: int = 1                         # interleaved passes over all prompts
    ignore_eos: bool = True                  # emit max_tokens every run (a constrained run ends where its grammar does)
    seed: int = 0                            # prompt sampling, batching and decoding seed
    data_dir: str | None = None              # shared/data folder (None = found by walking up from cwd)
    pool: str = "local"                      # pool name written in each record
    hardware_json: str | None = None         # the pool's hardware profile as JSON (None = this machine's)
    warmup: bool = True                      # one untimed batch per arm first
    progress: bool = True                    # tqdm progress bar

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, int):     # one length for every run
            object.__setattr__(self, "max_tokens", (self.max_tokens,))
        if not self.max_tokens or min(self.max_tokens) < 1:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")


@dataclass(frozen=True)
class Prepared:
    """A prompt ready to run: its ids cut to fit, and its constraint."""

    prompt: Prompt
    ids: tuple[int, ...]
    text: str
    constraint: object | None                # workers.constraint.ConstraintSpec


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
            out.append(Prompt(f"jsonschema/{row['subset']}/{row['id']}", "json_schema", text, schema))
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


def prepare(cfg: CollectConfig, engine, prompts: list[Prompt]) -> tuple[list[Prepared], list[str]]:
    """Prompts cut to fit the context, with their constraint compiled once (so no arm pays the compile); and the
    ids of prompts dropped because their schema cannot be served."""
    from metaspec.workers.constraint import ConstraintSpec
    from metaspec.workers.types import RequestError

    budget = engine.target.max_context - max(cfg.max_tokens) - engine.cfg.k_max - 2
    out, dropped = [], []
    for p in prompts:
        spec = ConstraintSpec("json_schema", p.schema) if cfg.constrain and p.schema else None
        if spec is not None:
            try:
                engine.grammars.compile(spec)
            except RequestError:
                dropped.append(p.prompt_id)
                continue
        ids = engine.tokenizer.encode(p.text, add_special_tokens=False)
        text = p.text if len(ids) <= budget else engine.tokenizer.decode(ids[-budget:])
        out.append(Prepared(p, tuple(ids[-budget:]), text, spec))
    return out, dropped


def _fill(items: list, size: int, pool: list) -> list:
    """`items` filled up to `size` from the start of `pool` (when `pool` can fill it without repeats)."""
    return items + pool[: size - len(items)] if len(pool) >= size else items


def chunks(prepared: list[Prepared], size: int, key: str) -> Iterator[tuple[list[Prepared], int]]:
    """Shuffled groups of `size` prompts (categories mixed) and how many of each are recorded: the last group is
    filled up from the start, and those prompts run (so the batch is full) but are not recorded."""
    order = list(prepared)
    random.Random(key).shuffle(order)
    for i in range(0, len(order), size):
        group = order[i: i + size]
        yield _fill(group, size, order), len(group)


def run_batch(engine, requests: list) -> list:
    """Like `Engine.generate_many` (every request submitted at once, sharing the replica's steps), but each
    Result's wall_s and ttft_s are timed by its own events as the step loop emits them (submit → first token,
    submit → end), not by when this thread gets round to reading them."""
    from metaspec.workers.engine import Result

    live = []
    try:
        for request in requests:
            events: queue.SimpleQueue = queue.SimpleQueue()
            times: dict[str, float] = {}
            t0 = time.perf_counter()

            def sink(event: tuple, events=events, times=times) -> None:
                now = time.perf_counter()
                times.setdefault("first", now) if event[0] == "tokens" else times.setdefault("end", now)
                events.put(event)

            live.append((engine.output(request, engine.submit(request, sink), t0), events, times, t0))
        results = []
        for out, events, times, t0 in live:
            while (event := events.get())[0] == "tokens":
                out.push(event[1])
            if event[0] == "error":
                raise event[1]
            result = next(r for r in out.finish() if isinstance(r, Result))
            results.append(replace(result, wall_s=times["end"] - t0, ttft_s=times.get("first", times["end"]) - t0))
        return results
    finally:
        for out, _, times, _ in live:
            if "end" not in times:
                engine.cancel(out.seq)


def batch_load(engine, level: int, drafts: str = "none") -> dict[str, float]:
    """The load each of `level` requests submitted together joins: its level - 1 peers, all of one arm whose
    drafts are of kind `drafts` (the registry's), on the replica as it is now (the router sees the same
    counters before it adds a request)."""
    free, slots = engine.pool.free, engine.pool.slots
    peers, base = level - 1, engine.scheduler.load
    running = base["running"] + min(peers, free)
    return load_features(running, base["waiting"] + max(0, peers - free), free - min(peers, free), slots,
                         {drafts: min(peers, free)})


def _outcome(run: Prepared, method: str, cfg: CollectConfig, feats: dict, t: float, max_tokens: int, level: int,
             result, repeat: int) -> Outcome:
    s, prompt = result.stats, run.prompt
    return Outcome(
        request_id=f"collect/{prompt.prompt_id}/{method}/t{t}/c{level}/m{max_tokens}/r{repeat}", ts=time.time(),
        source="collect", pool=cfg.pool, method=method, status="OK", features=feats, prompt_id=prompt.prompt_id,
        category=prompt.category, reason="collect", selector_version="collect", prompt_tokens=result.prompt_tokens,
        completion_tokens=len(result.token_ids), ttft_s=result.ttft_s, wall_s=result.wall_s,
        tokens_per_s=result.tokens_per_s, acceptance_length=s.acceptance_length,
        acceptance_rate=s.acceptance_rate, finish_reason=result.finish_reason,
        fallback=s.fallback, temperature=t, max_tokens=max_tokens, has_constraint=run.constraint is not None,
        concurrency=level, batch_mean=s.batch_mean, budget_cut=s.budget_cut)


def run_group(cfg: CollectConfig, engine, group: list[Prepared], recorded: int, t: float, methods: list[str],
              turn: int, pool_feats, hit_rate, repeat: int) -> tuple[list[Outcome], list]:
    """One batch of prompts run by every arm in turn (all its requests decoding together); the outcomes of its
    first `recorded` prompts, and the first arm's results."""
    from metaspec.workers.engine import Request
    from metaspec.workers.types import SamplingParams

    level = len(group)
    lengths = [cfg.max_tokens[zlib.crc32(f"{cfg.seed}/{r.prompt.prompt_id}/{t}/{level}".encode())
                              % len(cfg.max_tokens)] for r in group]
    requests = [Request(prompt_ids=r.ids, constraint=r.constraint, params=SamplingParams(
        temperature=t, max_tokens=n, ignore_eos=cfg.ignore_eos, seed=zlib.crc32(f"{cfg.seed}/{r.prompt.prompt_id}"
                                                                                  .encode())))
                for r, n in zip(group, lengths)]
    inputs = [RequestInput(r.ids, r.text, n, t, 1.0, r.constraint is not None) for r, n in zip(group, lengths)]
    own = [request_features(i, hit_rate) for i in inputs]
    outcomes, first = [], None
    for method in methods[turn % len(methods):] + methods[: turn % len(methods)]:
        pool = pool_feats(level, method)
        feats = [{k: round(v, 6) for k, v in (f | pool).items()}   # 6 decimals: half the file
                 | {"feature_version": float(FEATURE_VERSION)} for f in own[:recorded]]
        results = run_batch(engine, [replace(q, method=method) for q in requests])
        first = first or results
        outcomes += [_outcome(group[i], method, cfg, feats[i], t, lengths[i], level, results[i], repeat)
                     for i in range(recorded)]
    return outcomes, first


def runs(cfg: CollectConfig, engine, prepared: list[Prepared], methods: list[str], hardware: dict
         ) -> Iterator[list[Outcome]]:
    """Every (repeat, chunk, temperature, concurrency, batch) as one list of every arm's outcomes.

    Prompts go in chunks of the highest level; each chunk runs at every temperature and level (batches of
    `level` of its prompts) before the shared n-gram table learns its outputs, so the table never holds a
    prompt's own continuation while that prompt is measured. Arms rotate per batch so drift hits all alike."""
    from metaspec.workers.registry import arms

    table = engine.resources.get("ngram_table")
    hit_rate = ngram_tail_hit_rate(table) if table is not None else None

    def pool_feats(level: int, method: str) -> dict[str, float]:   # pool_load as the router's: / (max_batch + 4)
        return pool_features(hardware, (level - 1) / (engine.pool.slots + 4),
                             batch_load(engine, level, arms()[method].drafts))

    turn = 0
    for repeat in range(cfg.repeats):
        for chunk, in_chunk in chunks(prepared, max(cfg.concurrency), f"{cfg.seed}/{repeat}"):
            learnt: dict[int, list[int]] = {}
            for t in cfg.temperatures:
                for level in cfg.concurrency:
                    for i in range(0, in_chunk, level):
                        group = _fill(chunk[i: i + level], level, chunk)
                        turn += 1
                        outcomes, first = run_group(cfg, engine, group, min(level, in_chunk - i), t, methods, turn,
                                                    pool_feats, hit_rate, repeat)
                        learnt.update({i + j: first[j].token_ids for j in range(min(level, in_chunk - i))
                                       if i + j not in learnt})
                        yield outcomes
            if table is not None:   # after the chunk: no arm drafts from its prompts' own output
                for j, tokens in learnt.items():
                    table.learn(list(chunk[j].ids), tokens)


def build_engine(cfg: CollectConfig):
    """An in-process engine with local (Redis-less) n-gram and adjacency tables, so the table-driven arms run;
    the tables warm up from the collected traffic itself, as a fresh service's would (the n-gram table learns each
    request once, in `runs`, not from every arm's run of it)."""
    import torch

    from metaspec.workers.engine import Engine, EngineConfig
    from metaspec.workers.model import ModelConfig
    from metaspec.workers.scheduler import SchedulerConfig

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    drafter = ModelConfig(cfg.drafter, cfg.dtype, threads=cfg.threads) if cfg.drafter else None
    batch = SchedulerConfig(max_batch=max(SchedulerConfig().max_batch, *cfg.concurrency))   # no level waits
    engine = Engine(EngineConfig(ModelConfig(cfg.target, cfg.dtype, threads=cfg.threads), drafter,
                                 default_method="ar", learn_emitted=False, batch=batch))
    fresh_tables(engine)
    return engine


def fresh_tables(engine) -> None:
    """Empty local n-gram and adjacency tables for the engine's table-driven arms (none in a build without them)."""
    try:
        from metaspec.workers.store import AdjacencyTable, NgramConfig, NgramTable
    except ImportError:
        return
    vocab = engine.target.vocab_size
    engine.resources.update({"ngram_table": NgramTable(NgramConfig(), vocab), "adjacency_table": AdjacencyTable(vocab)})


def collect(cfg: CollectConfig, out: Path, append: bool = False) -> dict:
    """Run the collection, appending one JSON line per run to `out` as each batch finishes; returns a summary."""
    from tqdm import tqdm

    engine = build_engine(cfg)
    available = engine.available_methods()
    methods = list(cfg.arms or available)
    if missing := [m for m in methods if m not in available]:
        raise ValueError(f"arms {missing} cannot run here; available: {', '.join(available)}")
    hardware = json.loads(cfg.hardware_json) if cfg.hardware_json else local_hardware()
    prompts = choose_prompts(cfg, Path(cfg.data_dir) if cfg.data_dir else find_data_dir())
    prepared, dropped = prepare(cfg, engine, prompts)
    if cfg.warmup:   # one untimed batch per arm at the highest level
        top = max(cfg.concurrency)
        warm = CollectConfig(**(asdict(cfg) | {"repeats": 1, "temperatures": (0.0,), "concurrency": (top,)}))
        for _ in runs(warm, engine, prepared[: max(cfg.concurrency)], methods, hardware):
            pass
        fresh_tables(engine)     # the measured runs start from tables that never saw the warm-up's outputs
    out.parent.mkdir(parents=True, exist_ok=True)
    total = cfg.repeats * len(prepared) * len(cfg.temperatures) * len(cfg.concurrency) * len(methods)
    n, t0 = 0, time.perf_counter()
    with open(out, "a" if append else "w", encoding="utf-8") as f, \
            tqdm(total=total, desc="collect", unit="run", disable=not cfg.progress) as bar:
        for outcomes in runs(cfg, engine, prepared, methods, hardware):
            f.writelines(o.to_json() + "\n" for o in outcomes)
            f.flush()
            n += len(outcomes)
            if outcomes:
                o = outcomes[-1]
                bar.set_postfix_str(f"c={o.concurrency} t={o.temperature} {o.category}", refresh=False)
            bar.update(len(outcomes))
    return {"records": n, "prompts": len(prepared), "dropped_prompts": dropped, "methods": methods, "out": str(out),
            "hardware": hardware, "wall_s": round(time.perf_counter() - t0, 1)}
