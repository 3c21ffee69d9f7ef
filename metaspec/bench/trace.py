"""`metaspec bench serve --trace mixed`: one seeded mixed-traffic trace replayed per policy and concurrency level.

The mix (`TraceMix`, defaults; the realised counts are in the JSON under `trace.mix`):
- prompts: Spec-Bench's 6 groups 1/12 each (1/2 in all), HumanEval 1/6, GSM8K 1/6, JSONSchemaBench 1/6; the
  JSON-schema prompts carry their schema as a `json_schema` constraint (the schema is the request, never an
  expected output);
- temperature: 60% 0.0, 25% 0.7, 15% 1.0; max_tokens: 1/3 each of 32, 64, 128;
- every attribute is dealt by quota (largest remainder) and shuffled independently with `seed`, so a trace of n
  requests is the same list every run; request i samples with seed i under every policy.
- unconstrained requests ignore EOS (each emits its max_tokens, so policies emit the same tokens); constrained
  ones stop where the grammar ends.

Policies: `auto` (no method named: the service's selector; on the engine backend its default arm), every arm
the backend runs, `ar`. Each level replays the whole trace once per policy, policies in an order rotated per
level; with `repeats` k, k times per policy, the order reversed on every other repeat (A B C, C B A: a machine
drifting over the passes weighs on every policy alike), records pooled over the passes and each ratio also given
repeat by repeat (its spread); each pass also records the machine's speed (`measure`). Records, ratios, table,
JSON and plot (tokens/s against concurrency, one line per policy): `trace_report.py`.

>>> result = run_trace(TraceConfig(concurrency=(1, 4), mix=TraceMix(n_requests=16)))
>>> sorted({r["policy"] for r in result["records"]})[:2]
['ar', 'auto']
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from metaspec.bench import report
from metaspec.bench.backends import EngineSpec
from metaspec.bench.load import Trace, canary_ms, closed_loop, cpu_jiffies, cpu_shares
from metaspec.bench.trace_report import AUTO, format_trace, ratios, summarize, write_trace
from metaspec.prompts import SPECBENCH_GROUPS, find_data_dir, load_prompts

JSON_SCHEMA_FILE = "jsonschemabench_sample.jsonl"
DEFAULT_CATEGORIES = tuple((g, 1 / 12) for g in SPECBENCH_GROUPS) + (
    ("humaneval", 1 / 6), ("gsm8k", 1 / 6), ("json_schema", 1 / 6))


@dataclass(frozen=True)
class TraceMix:
    n_requests: int = 48                                            # requests in the trace
    categories: tuple[tuple[str, float], ...] = DEFAULT_CATEGORIES  # (category, share)
    temperatures: tuple[tuple[float, float], ...] = ((0.0, 0.60), (0.7, 0.25), (1.0, 0.15))   # (value, share)
    max_tokens: tuple[tuple[int, float], ...] = ((32, 1 / 3), (64, 1 / 3), (128, 1 / 3))      # (value, share)
    max_prompt_tokens: int = 512                                    # keep the last N prompt tokens
    seed: int = 0                                                   # which prompts, and the order of everything

    def __post_init__(self) -> None:
        if self.n_requests < 1 or self.max_prompt_tokens < 1:
            raise ValueError("n_requests and max_prompt_tokens must be >= 1")


@dataclass(frozen=True)
class TraceRequest:
    index: int                     # position in the trace (also its sampling seed)
    prompt_id: str
    category: str
    ids: tuple[int, ...]           # prompt tokens (left-truncated)
    temperature: float
    max_tokens: int
    schema: str | None = None      # JSON Schema text: the request is constrained to it


@dataclass
class RoutedTrace(Trace):
    """A trace with what the service said about the request (grpc backend)."""

    request_id: str = ""
    method: str = ""
    selector_version: str = ""
    reason: str = ""


def quota(items: tuple[tuple[object, float], ...], n: int, rng: random.Random) -> list:
    """n values dealt by share (largest remainder, ties in listed order), shuffled."""
    total = sum(w for _, w in items)
    exact = [n * w / total for _, w in items]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(items)), key=lambda i: counts[i] - exact[i])[: n - sum(counts)]:
        counts[i] += 1
    out = [v for (v, _), c in zip(items, counts) for _ in range(c)]
    rng.shuffle(out)
    return out


def json_schema_rows(data_dir: Path) -> list[tuple[str, str, str]]:
    """(prompt_id, prompt text, schema text) of the JSONSchemaBench sample (the text as `metaspec collect`'s)."""
    path = data_dir / JSON_SCHEMA_FILE
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for row in rows:
        schema = json.dumps(row["schema"], separators=(",", ":"))
        text = f"Write a JSON object that satisfies this JSON schema.\nSchema: {schema}\nJSON:\n"
        out.append((f"jsonschema/{row['subset']}/{row['id']}", text, schema))
    return out


def _draw(pool: list, n: int, rng: random.Random, servable) -> list:
    """n items of `pool` in a seeded order, skipping those `servable` refuses (schemas the grammar engine cannot
    compile, as `metaspec collect` drops them)."""
    order = rng.sample(pool, len(pool))
    if servable is None:
        return order[:n]
    out = []
    for item in order:
        if len(out) == n:
            break
        if item[2] is None or servable(item[2]):
            out.append(item)
    return out


def grammar_check(compiler):
    """`servable(schema) -> bool` over a workers.constraint.GrammarCompiler."""
    from metaspec.workers.constraint import ConstraintSpec
    from metaspec.workers.types import RequestError

    def servable(schema: str) -> bool:
        try:
            compiler.compile(ConstraintSpec("json_schema", schema))
        except RequestError:
            return False
        return True
    return servable


def local_grammar_check(tokenizer, target: str):
    """The same check as the service's workers, built here from the target's tokenizer and vocabulary."""
    from metaspec.workers.constraint import GrammarCompiler

    vocab = json.loads((Path(target) / "config.json").read_text())["vocab_size"]
    eos = frozenset(i for i in [tokenizer.eos_token_id] if i is not None)
    return grammar_check(GrammarCompiler(tokenizer, vocab, eos))


def build_trace(mix: TraceMix, tokenizer, data_dir: Path, servable=None) -> list[TraceRequest]:
    """The trace: categories, temperatures and max_tokens dealt by quota; prompts drawn without repeats (schemas
    that `servable` refuses are skipped)."""
    rng = random.Random(f"{mix.seed}/mixed")
    cats = quota(mix.categories, mix.n_requests, rng)
    temps = quota(mix.temperatures, mix.n_requests, rng)
    lengths = quota(mix.max_tokens, mix.n_requests, rng)
    pools: dict[str, list[tuple[str, str, str | None]]] = {
        c: [(p.prompt_id, p.text, None) for p in load_prompts(data_dir) if p.category == c] for c in set(cats)}
    if "json_schema" in pools:
        pools["json_schema"] = json_schema_rows(data_dir)
    drawn = {c: _draw(pool, cats.count(c), rng, servable) for c, pool in sorted(pools.items())}
    out = []
    for i, (cat, temp, n) in enumerate(zip(cats, temps, lengths)):
        if not drawn[cat]:
            raise ValueError(f"no prompts of category {cat!r} in {data_dir}")
        pid, text, schema = drawn[cat][sum(1 for c in cats[:i] if c == cat) % len(drawn[cat])]
        ids = tokenizer.encode(text, add_special_tokens=False)[-mix.max_prompt_tokens:]
        out.append(TraceRequest(i, pid, cat, tuple(ids), float(temp), int(n), schema))
    return out


def mix_summary(requests: list[TraceRequest], mix: TraceMix) -> dict:
    return {"stated": asdict(mix), "n": len(requests),
            "categories": dict(sorted(Counter(r.category for r in requests).items())),
            "temperatures": {str(k): v for k, v in sorted(Counter(r.temperature for r in requests).items())},
            "max_tokens": {str(k): v for k, v in sorted(Counter(r.max_tokens for r in requests).items())},
            "constrained": sum(r.schema is not None for r in requests),
            "prompt_tokens_mean": sum(len(r.ids) for r in requests) / len(requests),
            "ids": [r.prompt_id for r in requests]}


# ---- senders: one blocking call per trace request --------------------------------------------------------

def engine_sender(backend, policy: str):
    """Through an in-process EngineBackend (its engine's default arm for `auto`)."""
    from metaspec.workers.constraint import ConstraintSpec
    from metaspec.workers.engine import Request
    from metaspec.workers.types import SamplingParams

    def send(r: TraceRequest) -> Trace:
        params = SamplingParams(temperature=r.temperature, max_tokens=r.max_tokens, seed=r.index,
                                ignore_eos=r.schema is None)
        constraint = ConstraintSpec("json_schema", r.schema) if r.schema else None
        return backend._send(Request(prompt_ids=r.ids, params=params, method=None if policy == AUTO else policy,
                                     constraint=constraint))
    return send


def grpc_sender(client, policy: str, tag: str):
    """Through the running service (a `protocol.client.Client`); request ids `tag/policy/index` join the
    outcome log."""
    from metaspec.protocol.types import Constraint

    def send(r: TraceRequest) -> Trace:
        trace = RoutedTrace(time.perf_counter(), request_id=f"{tag}/{policy}/{r.index}")
        constraint = Constraint("json_schema", r.schema) if r.schema else None
        for reply in client.stream(list(r.ids), max_tokens=r.max_tokens, temperature=r.temperature, seed=r.index,
                                   method="" if policy == AUTO else policy, ignore_eos=r.schema is None,
                                   constraint=constraint, request_id=trace.request_id):
            if reply.finish_reason:
                trace.chunk(max(0, reply.completion_tokens - trace.tokens))
                trace.drafts = int(reply.acceptance.get("drafts", 0))
                trace.accepted = int(reply.acceptance.get("accepted", 0))
                trace.method, trace.selector_version, trace.reason = reply.method, reply.selector_version, \
                    reply.reason
            else:
                trace.chunk(len(reply.token_ids))
        return trace
    return send


# ---- measuring -----------------------------------------------------------------------------------------------

# what a run keeps of each of its passes (with the arms it was routed to)
PASS_FIELDS = ("output_tokens", "wall_s", "output_tokens_per_s", "canary_ms", "busy_frac", "steal_frac")


def measure(send, requests: list[TraceRequest], level: int, bar=None) -> tuple[dict, list[Trace]]:
    """One pass; its metrics carry the machine's state: `canary_ms` just before it, busy and steal shares during."""
    canary, before = canary_ms(), cpu_jiffies()
    traces, wall = closed_loop(send, requests, level, bar.update if bar is not None else None)
    return report.run_metrics(traces, wall) | {"canary_ms": canary, **cpu_shares(before, cpu_jiffies())}, traces


def routed_counts(traces: list[Trace]) -> dict:
    """Which arms the service ran, and under which selector versions (grpc traces)."""
    routed = [t for t in traces if isinstance(t, RoutedTrace) and t.method]
    return {"methods": dict(Counter(t.method for t in routed)),
            "selector_versions": dict(Counter(t.selector_version for t in routed)),
            "explored": sum(t.reason == "explore" for t in routed)}


def pass_order(policies: list[str], level_index: int, repeat: int) -> list[str]:
    """The policies' order in one pass over a level: rotated per level, reversed on every other repeat (A B C,
    C B A, ...), so that a machine drifting over a level's passes weighs on every policy alike.

    >>> [pass_order(["a", "b", "c"], 1, k) for k in range(2)]
    [['b', 'c', 'a'], ['a', 'c', 'b']]
    """
    shift = level_index % max(1, len(policies))
    order = policies[shift:] + policies[:shift]
    return order[::-1] if repeat % 2 else order


def run_policies(make_send, policies: list[str], requests: list[TraceRequest], levels: tuple[int, ...],
                 bar=None, reset=None, repeats: int = 1) -> list[dict]:
    """One run per (level, policy): [{policy, concurrency, metrics..., passes, traces}]. Each level replays the
    trace `repeats` times per policy, interleaved in `pass_order`; a run's metrics pool its passes (every pass's
    tokens over their summed wall time; latencies over every request) and `passes` keeps each pass's own
    tokens/s. `make_send(policy, level, repeat)`. `reset()`, when given, runs before every pass: the table arms'
    learnt state starts the same for each."""
    runs = []
    for i, level in enumerate(levels):
        passes: dict[str, list[tuple[dict, list[Trace]]]] = {p: [] for p in policies}
        for k in range(repeats):
            for policy in pass_order(policies, i, k):
                if reset is not None:
                    reset()
                passes[policy].append(measure(make_send(policy, level, k), requests, level, bar))
        for policy in pass_order(policies, i, 0):
            traces = [t for _, ts in passes[policy] for t in ts]
            wall = sum(m["wall_s"] for m, _ in passes[policy])
            runs.append({"policy": policy, "concurrency": level, **report.run_metrics(traces, wall),
                         **routed_counts(traces), "traces": traces,
                         "passes": [{"repeat": k, **{f: m[f] for f in PASS_FIELDS}, **routed_counts(ts)}
                                    for k, (m, ts) in enumerate(passes[policy])]})
    return runs


# ---- the whole run -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TraceConfig:
    backend: str = "engine"                  # "engine" (in process) | "grpc" (the running service at `server`)
    engine: EngineSpec = field(default_factory=EngineSpec)   # models (engine backend; tokenizer for grpc)
    server: str | None = None                # HOST:PORT of the gRPC service
    api_key: str | None = None
    policies: tuple[str, ...] | None = None  # None = auto + every arm the backend runs (ar included)
    concurrency: tuple[int, ...] = (1, 4, 16)   # closed-loop clients per level
    mix: TraceMix = field(default_factory=TraceMix)
    data_dir: str | None = None              # shared/data (None = found above cwd)
    tag: str = "trace"                       # request-id prefix (grpc): `tag/policy/index`
    progress: bool = True                    # tqdm bar
    repeats: int = 1                         # passes per (policy, level), interleaved (`pass_order`)

    def __post_init__(self) -> None:
        if self.backend not in ("engine", "grpc"):
            raise ValueError(f"the mixed trace runs on the engine or grpc backend, not {self.backend!r}")
        if self.backend == "grpc" and not self.server:
            raise ValueError("--backend grpc needs --server")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency levels must be >= 1")
        if self.repeats < 1:
            raise ValueError("repeats must be >= 1")


def repeat_tag(tag: str, repeat: int) -> str:
    """The request-id prefix of a repeat: `tag` for the first, `tag.k` after (ids stay unique in the log)."""
    return f"{tag}.{repeat}" if repeat else tag


def service_methods(client) -> list[str]:
    """The arms some pool of the service runs, in ListMethods order."""
    info = client.list_methods()
    pooled = {m for p in info.pools for m in p.methods}
    return [m.name for m in info.methods if not pooled or m.name in pooled]


def default_policies(methods: list[str]) -> list[str]:
    return [AUTO] + [m for m in methods if m != "ar"] + ["ar"]


def clear_tables(resources: dict) -> dict[str, int]:
    """Empty an in-process engine's n-gram and recycling tables; {resource: rows dropped}."""
    return {name: resources[name].clear() for name in ("ngram_table", "adjacency_table") if name in resources}


def run_trace(cfg: TraceConfig, engine=None, client=None, reset=None) -> dict:
    """Replay the trace per level and policy; returns {config, machine, trace, records, ratios, runs}.
    `engine` / `client`: an Engine or a protocol Client to drive instead of opening one.

    The trace replays the same prompts for every policy, and the table arms (ngram_store, recycling) learn from
    every reply: without a reset, a later pass drafts from the earlier passes' answers to the very same prompts
    (greedy ones token for token), which no user's traffic gives. So every pass starts from empty tables:
    `reset()` empties them (the engine backend's own by default; through a service, the caller's hook, e.g.
    DecodeWorker.reset_tables on each replica). Without one the result says `tables_reset: false`."""
    from tqdm import tqdm

    from metaspec.bench.backends import EngineBackend, build_engine
    from metaspec.bench.serve import ServeConfig, machine_info

    owned = []
    if cfg.backend == "engine":
        backend = EngineBackend(engine if engine is not None else build_engine(cfg.engine))
        owned += [backend] if engine is None else []
        tokenizer, methods = backend.engine.tokenizer, backend.methods()
        make_send = lambda policy, level, k: engine_sender(backend, policy)     # noqa: E731
        if reset is None:
            reset = lambda: clear_tables(backend.engine.resources)                 # noqa: E731
    else:
        from transformers import AutoTokenizer

        from metaspec.protocol.client import Client

        if client is None:
            client = Client(cfg.server, api_key=cfg.api_key)
            owned.append(client)
        tokenizer, methods = AutoTokenizer.from_pretrained(cfg.engine.target), service_methods(client)
        def make_send(policy: str, level: int, k: int):
            return grpc_sender(client, policy, f"{repeat_tag(cfg.tag, k)}/c{level}")
    try:
        policies = list(cfg.policies) if cfg.policies else default_policies(methods)
        if missing := [p for p in policies if p != AUTO and p not in methods]:
            raise ValueError(f"policies {missing} cannot run here; available: {', '.join(methods)}")
        servable = grammar_check(backend.engine.grammars) if cfg.backend == "engine" else \
            local_grammar_check(tokenizer, cfg.engine.target)
        requests = build_trace(cfg.mix, tokenizer, Path(cfg.data_dir) if cfg.data_dir else find_data_dir(), servable)
        machine = machine_info(ServeConfig(engine=cfg.engine))
        total = len(policies) * len(cfg.concurrency) * len(requests) * cfg.repeats
        with tqdm(total=total, desc=f"trace {cfg.tag}", unit="req", disable=not cfg.progress) as bar:
            runs = run_policies(make_send, policies, requests, cfg.concurrency, bar, reset, cfg.repeats)
    finally:
        for thing in owned:
            thing.close()
    records = summarize(runs)
    return {"config": asdict(cfg), "machine": machine | {"load_avg_at_end": machine_info(
                ServeConfig(engine=cfg.engine))["load_avg_1_5_15"]},
            "trace": mix_summary(requests, cfg.mix) | {"tables_reset": reset is not None}, "records": records,
            "ratios": ratios(records),
            "runs": [{k: v for k, v in r.items() if k != "traces"} for r in runs]}


# ---- CLI (`metaspec bench serve --trace mixed ...`; options in metaspec/cli.py) ------------------------------

def run_from_cli(args) -> int:
    import sys

    try:
        levels = tuple(int(c) for c in args.concurrency.split(","))
        mix = TraceMix(n_requests=args.trace_requests, max_prompt_tokens=args.max_prompt_tokens, seed=args.seed)
        drafter = None if (args.drafter or "").lower() in ("", "none") else args.drafter
        spec = EngineSpec(target=args.target, drafter=drafter, dtype=args.dtype, threads=args.threads,
                          max_batch=args.max_batch or max(levels), slot_tokens=args.slot_tokens or
                          args.max_prompt_tokens + max(n for n, _ in mix.max_tokens) + 16)
        policies = tuple(args.trace_policies.split(",")) if args.trace_policies else None
        cfg = TraceConfig(backend=args.backend, engine=spec, server=args.server, api_key=args.api_key,
                          policies=policies, concurrency=levels, mix=mix, data_dir=args.data_dir,
                          repeats=args.trace_repeats)
        result = run_trace(cfg)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("runs") / time.strftime("bench-trace-%Y%m%d-%H%M%S")
    paths = write_trace(result, out)
    print(format_trace(result))
    print("\n" + "  ".join(f"{k}: {v}" for k, v in paths.items()))
    return 0
