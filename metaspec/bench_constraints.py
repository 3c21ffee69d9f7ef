"""`metaspec bench --constraints`: JSON Schema-constrained decoding over JSONSchemaBench, per subset.

For each sampled schema: compile it (cold, timed; a refusal counts against coverage), then with a prompt that
shows the schema and asks for a matching object, run greedily
  - `unconstrained`: AR without the schema (the speed of free text on the same prompt),
  - `ar/no-ff`: constrained AR without fast-forward (every token costs a target forward),
  - `ar`: constrained AR with fast-forward (the grammar drafts the tokens it forces),
  - every other arm under the constraint (fast-forward on).
Outputs that end are checked with a JSON Schema validator (jsonschema, format not asserted); outputs cut by
max_tokens are counted apart. Greedy constrained outputs are identical across arms (the contract), so speed-ups
are ratios of summed wall time over the same tokens.

>>> result = run_constraint_bench(ConstraintBenchConfig(n_per_subset=1, max_tokens=64))
>>> print(format_table(result))
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from metaspec.bench_generate import DEFAULT_CHECKPOINTS, GenerateConfig, local_engine
from metaspec.workers.constraint import ConstraintSpec, GrammarCompiler
from metaspec.workers.engine import Engine, Request
from metaspec.workers.types import RequestError, SamplingParams

DATA_FILE = "jsonschemabench_sample.jsonl"
PROMPT_HEAD = "Here is a JSON Schema:\n"
PROMPT_TAIL = "\nWrite one JSON object that is valid under this schema.\nJSON: "


@dataclass(frozen=True)
class ConstraintBenchConfig:
    target: str = str(DEFAULT_CHECKPOINTS / "target")             # HF causal LM (path or hub id)
    drafter: str | None = str(DEFAULT_CHECKPOINTS / "drafter")    # draft model sharing the tokenizer; None = none
    dtype: str = "auto"                      # compute dtype of both models
    threads: int | None = None               # torch intra-op threads (None = torch's default)
    arms: tuple[str, ...] | None = None      # arms under the constraint (None = every arm the engine can run)
    subsets: tuple[str, ...] | None = None   # JSONSchemaBench subsets (None = all in the file)
    n_per_subset: int = 3                    # schemas sampled per subset
    max_tokens: int = 256                    # tokens per run at most (outputs cut here are counted apart)
    seed: int = 0                            # schema sampling seed
    data_dir: str | None = None              # folder holding jsonschemabench_sample.jsonl (None = shared/data)

    def __post_init__(self) -> None:
        if self.n_per_subset <= 0 or self.max_tokens <= 0:
            raise ValueError("n_per_subset and max_tokens must be > 0")


def load_schemas(cfg: ConstraintBenchConfig) -> list[dict]:
    """{subset, id, schema} rows: n_per_subset per subset, sampled with the seed, in file order per subset."""
    from metaspec.prompts import find_data_dir

    path = (Path(cfg.data_dir) if cfg.data_dir else find_data_dir()) / DATA_FILE
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    by_subset: dict[str, list[dict]] = {}
    for row in rows:
        by_subset.setdefault(row["subset"], []).append(row)
    if cfg.subsets and (unknown := set(cfg.subsets) - set(by_subset)):
        raise ValueError(f"unknown subsets {sorted(unknown)}; known: {', '.join(sorted(by_subset))}")
    rng, out = random.Random(cfg.seed), []
    for subset in cfg.subsets or sorted(by_subset):
        pool = by_subset[subset]
        out += sorted(rng.sample(pool, min(cfg.n_per_subset, len(pool))), key=pool.index)
    return out


def prompt_ids(engine: Engine, schema: dict, max_tokens: int) -> tuple[int, ...]:
    """The schema (cut to fit the context) between an instruction head and tail."""
    enc = lambda text: engine.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    head, tail = enc(PROMPT_HEAD + json.dumps(schema)), enc(PROMPT_TAIL)
    room = engine.target.max_context - max_tokens - engine.cfg.k_max - 2 - len(tail)
    return tuple(head[:room] + tail)


def check_output(schema: dict, text: str) -> str:
    """"valid" | "invalid_json" | "schema_violation" | "validator_error" (the validator cannot use the schema)."""
    import jsonschema

    try:
        value = json.loads(text)
    except ValueError:
        return "invalid_json"
    try:
        jsonschema.validators.validator_for(schema)(schema).validate(value)
    except jsonschema.ValidationError:
        return "schema_violation"
    except Exception:  # unresolvable $ref, a schema the validator rejects...
        return "validator_error"
    return "valid"


def _run(engine: Engine, ids: tuple[int, ...], spec: ConstraintSpec | None, method: str, max_tokens: int) -> dict:
    result = engine.generate(Request(prompt_ids=ids, params=SamplingParams(max_tokens=max_tokens), method=method,
                                     constraint=spec))
    s = result.stats
    return {"tokens": len(result.token_ids), "wall_s": result.wall_s, "finish": result.finish_reason,
            "text": result.text, "token_ids": result.token_ids, "steps": s.steps, "forced": s.forced,
            "pruned": s.pruned, "drafted": s.drafted, "accepted": s.accepted,
            "fallback": s.fallback}


def bench_schema(engine: Engine, no_ff: GrammarCompiler, row: dict, arms: list[str], max_tokens: int) -> dict:
    """Compile one schema cold, then every configuration on its prompt: one record per schema."""
    spec = ConstraintSpec("json_schema", json.dumps(row["schema"]))
    record = {"subset": row["subset"], "id": row["id"], "runs": {}}
    t0 = time.perf_counter()
    try:
        engine.grammars.compile(spec)
        record["compiled"], record["error"] = True, None
    except RequestError as exc:
        record["compiled"], record["error"] = False, str(exc)[:300]
    record["compile_s"] = time.perf_counter() - t0
    ids = prompt_ids(engine, row["schema"], max_tokens)
    record["prompt_tokens"] = len(ids)
    record["runs"]["unconstrained"] = _run(engine, ids, None, "ar", max_tokens)
    if not record["compiled"]:
        return record
    ff = engine.grammars
    engine.grammars = no_ff
    try:
        record["runs"]["ar/no-ff"] = _run(engine, ids, spec, "ar", max_tokens)
    finally:
        engine.grammars = ff
    for method in ["ar"] + [a for a in arms if a != "ar"]:
        record["runs"][method] = _run(engine, ids, spec, method, max_tokens)
    reference = record["runs"]["ar"]
    record["check"] = check_output(row["schema"], reference["text"]) if reference["finish"] == "stop" else "cut"
    record["same_as_ar"] = {m: r["token_ids"] == reference["token_ids"] for m, r in record["runs"].items()
                            if m not in ("unconstrained", "ar")}
    return record


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summarize(records: list[dict], configs: list[str]) -> list[dict]:
    """One row per subset and one for all: coverage, validity, compile time, tokens/s and speed-ups."""
    groups = {s: [r for r in records if r["subset"] == s] for s in dict.fromkeys(r["subset"] for r in records)}
    groups["all"] = records
    out = []
    for subset, rs in groups.items():
        done = [r for r in rs if r["compiled"]]
        checks = [r["check"] for r in done]
        wall = {c: sum(r["runs"][c]["wall_s"] for r in done if c in r["runs"]) for c in configs}
        tokens = {c: sum(r["runs"][c]["tokens"] for r in done if c in r["runs"]) for c in configs}
        emitted_ar = sum(r["runs"]["ar"]["tokens"] for r in done)
        out.append({
            "subset": subset, "schemas": len(rs), "compiled": len(done),
            "coverage": len(done) / len(rs) if rs else 0.0,
            "finished": sum(c != "cut" for c in checks), "cut_by_max_tokens": checks.count("cut"),
            "valid": checks.count("valid"), "invalid": sum(c in ("invalid_json", "schema_violation") for c in checks),
            "validator_error": checks.count("validator_error"),
            "validity": checks.count("valid") / max(1, sum(c not in ("cut", "validator_error") for c in checks)),
            "compile_s_p50": _quantile([r["compile_s"] for r in rs], 0.5),
            "compile_s_p99": _quantile([r["compile_s"] for r in rs], 0.99),
            "tokens_per_s": {c: tokens[c] / wall[c] if wall[c] else None for c in configs},
            "speedup_vs_constrained_ar": {c: wall["ar"] / wall[c] if wall[c] else None
                                          for c in configs if c != "unconstrained"},
            "forced_share": sum(r["runs"]["ar"]["forced"] for r in done) / emitted_ar if emitted_ar else 0.0,
            "target_forwards": {c: sum(r["runs"][c]["steps"] for r in done if c in r["runs"]) for c in configs},
            "all_same_as_ar": all(all(r["same_as_ar"].values()) for r in done),
        })
    return out


def run_constraint_bench(cfg: ConstraintBenchConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    engine = local_engine(GenerateConfig(cfg.target, cfg.drafter, cfg.dtype, cfg.threads))
    available = engine.available_methods()
    arms = [a for a in (cfg.arms or available) if a != "ar"]
    if missing := [a for a in arms if a not in available]:
        raise ValueError(f"arms {missing} cannot run here; available: {', '.join(available)}")
    no_ff = engine.grammars.with_config(replace(engine.cfg.constraints, fast_forward=False))
    rows = load_schemas(cfg)
    warm = ConstraintSpec("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    for method in ["ar", *arms]:  # warm-up: first forwards, drafter start-up, kernels
        engine.generate(Request(prompt="{", params=SamplingParams(max_tokens=16), method=method, constraint=warm))
    records = [bench_schema(engine, no_ff, row, arms, cfg.max_tokens) for row in rows]
    configs = ["unconstrained", "ar/no-ff", "ar", *arms]
    return {"config": asdict(cfg), "machine": _machine(engine), "records": records,
            "summary": summarize(records, configs), "configs": configs}


def _machine(engine: Engine) -> dict:
    import platform

    from metaspec.bench.arms import cpu_model

    return {"cpu_model": cpu_model(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target_class": type(engine.target).__name__}


def format_table(result: dict) -> str:
    configs = result["configs"]
    arms = [c for c in configs if c not in ("unconstrained", "ar/no-ff", "ar")]
    head = (f"{'subset':<16}{'cover':>7}{'valid':>9}{'cut':>5}{'cmp p50':>9}{'cmp p99':>9}{'free t/s':>9}"
            f"{'json t/s':>9}{'forced':>7}{'ff fwd':>7}{'ff x':>6}" + "".join(f"{a[:10] + ' x':>13}" for a in arms)
            + "  same")
    lines = [head, "-" * len(head)]
    lines += [_row(s, arms) for s in result["summary"]]
    lines.append("cover: compiled/sampled · valid: valid/finished (validator errors excluded) · cut: stopped by "
                 "max_tokens · cmp: compile ms · t/s: tokens/s unconstrained vs constrained AR · forced: share of "
                 "tokens the grammar forced · ff fwd: target forwards without / with fast-forward · ff x: "
                 "fast-forward speed-up of constrained AR · <arm> x: speed-up vs constrained AR · same: every arm's "
                 "output equals constrained AR's")
    return "\n".join(lines)


def _row(s: dict, arms: list[str]) -> str:
    tps, sp, fwd = s["tokens_per_s"], s["speedup_vs_constrained_ar"], s["target_forwards"]

    def fmt(value: float | None, spec: str) -> str:
        return format(value, spec) if value is not None else format("-", ">" + spec.split(".")[0])

    ms = lambda v: v * 1e3 if v is not None else None  # noqa: E731
    checked = s["finished"] - s["validator_error"]
    return (f"{s['subset']:<16}{s['compiled']:>3}/{s['schemas']:<3}{s['valid']:>5}/{checked:<3}"
            f"{s['cut_by_max_tokens']:>5}{fmt(ms(s['compile_s_p50']), '8.1f')}m{fmt(ms(s['compile_s_p99']), '8.1f')}m"
            f"{fmt(tps['unconstrained'], '9.1f')}{fmt(tps['ar'], '9.1f')}{s['forced_share']:>7.0%}"
            f"{fmt(fwd['ar/no-ff'] / fwd['ar'] if fwd['ar'] else None, '7.2f')}"
            f"{fmt(sp['ar/no-ff'] and 1 / sp['ar/no-ff'], '6.2f')}" + "".join(fmt(sp[a], '13.2f') for a in arms)
            + ("   yes" if s["all_same_as_ar"] else "    NO"))


def run_from_cli(args) -> int:
    """The `metaspec bench --constraints` entry: bench options reused (categories = subsets)."""
    import sys

    from metaspec.cli import _csv, _drafter

    try:
        cfg = ConstraintBenchConfig(
            target=args.target, drafter=_drafter(args.drafter), dtype=args.dtype, threads=args.threads,
            arms=_csv(args.arms), subsets=_csv(args.categories), n_per_subset=args.n_per_category,
            max_tokens=args.max_tokens, seed=args.seed, data_dir=args.data_dir)
        result = run_constraint_bench(cfg)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("runs") / time.strftime("bench-constraints-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_constraints.json").write_text(json.dumps(result, indent=1))
    (out / "table.txt").write_text(format_table(result) + "\n")
    print(format_table(result))
    print(f"\njson: {out / 'bench_constraints.json'}  table: {out / 'table.txt'}")
    return 0
