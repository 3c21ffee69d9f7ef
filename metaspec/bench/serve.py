"""`metaspec bench serve`: output tokens/s and latency under concurrent load, shaped like `vllm bench serve`.

For each repeat, each load level (a number of closed-loop clients, or one Poisson request rate) and each method
(in an order rotated per repeat and level, so machine noise hits them alike), the same prompts (a mix of the
shared data's categories) go through the backend; with `--baseline-ref` the same load then runs on another
commit's engine, with `--compare-hf` through HF's `generate_batch`, in the same pass: every ratio compares
numbers measured minutes apart on the same machine. Output: `bench_serve.json` (one record per method and
concurrency: request_throughput, output_tokens_per_s, ttft_ms, tpot_ms, itl_ms as mean/p50/p99, plus extras),
`table.txt`, and `throughput.png` (output tokens/s against concurrency, one line per method).

>>> result = run_serve(ServeConfig(methods=("ar", "pld"), concurrency=(1, 4), num_prompts=8, max_tokens=32))
>>> [(r["method"], r["concurrency"]) for r in result["records"]]
[('ar', 1), ('pld', 1), ('ar', 4), ('pld', 4)]
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from metaspec.bench import report
from metaspec.bench.backends import EngineBackend, EngineSpec, GrpcBackend, OpenAIBackend, arm_variant, build_engine
from metaspec.bench.load import ServeRequest, Trace, closed_loop, poisson
from metaspec.prompts import CATEGORIES, find_data_dir, load_prompts, sample_prompts

AUTO = "auto"   # no method in the request: the service's selector chooses (the engine backend: its default arm)


@dataclass(frozen=True)
class ServeConfig:
    backend: str = "engine"                  # "engine" (in process) | "grpc" (--server) | "openai" (--base-url)
    engine: EngineSpec = field(default_factory=EngineSpec)   # models and replica settings (engine backend,
                                                             # tokenizer and HF/baseline runs for the others)
    server: str | None = None                # HOST:PORT of the gRPC service
    base_url: str | None = None              # OpenAI-compatible base URL (http://host:port/v1)
    model: str = "metaspec"                  # model name sent to the OpenAI server
    api_key: str | None = None               # API key for grpc/openai
    methods: tuple[str, ...] = ("ar",)       # arms to measure; "auto" = no method named
    concurrency: tuple[int, ...] = (1, 4, 16, 64)  # closed-loop clients per load level
    request_rate: float | None = None        # Poisson arrivals per second instead of closed-loop clients
    max_concurrency: int | None = None       # in-flight cap under request_rate (None = num_prompts)
    num_prompts: int = 64                    # requests per load
    max_tokens: int = 64                     # output tokens per request
    ignore_eos: bool = True                  # every request emits max_tokens (comparable loads)
    repeats: int = 1                         # passes over every level and method
    categories: tuple[str, ...] | None = None  # prompt categories mixed (None = all)
    max_prompt_tokens: int = 512             # keep the last N prompt tokens
    seed: int = 0                            # prompt sampling and Poisson arrivals
    data_dir: str | None = None              # shared/data (None = found above cwd)
    warmup: bool = True                      # one short untimed load per method first
    compare_hf: bool = False                 # also HF generate_batch at each level
    hf_concurrency: tuple[int, ...] | None = None        # levels HF runs at (None = all)
    baseline_ref: str | None = None          # also the same load on this commit's engine (engine backend only)
    baseline_concurrency: tuple[int, ...] | None = None  # levels the baseline runs at (None = all)
    progress: bool = True                    # tqdm bar

    def __post_init__(self) -> None:
        if self.backend not in ("engine", "grpc", "openai"):
            raise ValueError(f"backend must be engine, grpc or openai; got {self.backend!r}")
        if self.backend == "grpc" and not self.server or self.backend == "openai" and not self.base_url:
            raise ValueError(f"--backend {self.backend} needs {'--server' if self.backend == 'grpc' else '--base-url'}")
        for name in ("num_prompts", "max_tokens", "repeats", "max_prompt_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.methods or not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("need at least one method and concurrency levels >= 1")

    @property
    def levels(self) -> tuple[int, ...]:
        return (self.max_concurrency or self.num_prompts,) if self.request_rate else self.concurrency


# ---- prompts -----------------------------------------------------------------------------------------------

def mix_prompts(cfg: ServeConfig, tokenizer) -> list[ServeRequest]:
    """num_prompts prompts, categories alternating (cycled when the data holds fewer), tokenised and cut to the
    last max_prompt_tokens (the text too: what a text backend sends is the cut prompt, decoded)."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else find_data_dir()
    cats = cfg.categories or CATEGORIES
    per = -(-cfg.num_prompts // len(cats))
    chosen = sample_prompts(load_prompts(data_dir), per, cfg.seed, cats)
    by_cat = defaultdict(list)
    for p in chosen:
        by_cat[p.category].append(p)
    mixed = [ps[i] for i in range(per) for ps in by_cat.values() if i < len(ps)]
    out = []
    for i in range(cfg.num_prompts):
        p = mixed[i % len(mixed)]
        ids = tokenizer.encode(p.text, add_special_tokens=False)
        text = p.text
        if len(ids) > cfg.max_prompt_tokens:   # backends that send text send the same cut prompt
            ids = ids[-cfg.max_prompt_tokens:]
            text = tokenizer.decode(ids)
        out.append(ServeRequest(p.prompt_id, p.category, text, tuple(ids)))
    return out


# ---- one measured load -------------------------------------------------------------------------------------

def measure(backend, cfg: ServeConfig, method: str, level: int, requests: list[ServeRequest], bar=None
            ) -> tuple[dict, list[Trace]]:
    from metaspec.bench.arms import peak_rss_mb, reset_peak_rss

    send = backend.sender(None if method == AUTO else method, cfg.max_tokens, cfg.ignore_eos)
    backend.reset()
    tick = bar.update if bar is not None else None
    before = backend.snapshot()
    reset_peak_rss()
    if cfg.request_rate:
        traces, wall = poisson(send, requests, cfg.request_rate, cfg.seed, level, tick)
    else:
        traces, wall = closed_loop(send, requests, level, tick)
    run = report.run_metrics(traces, wall) | report.step_stats(before, backend.snapshot())
    return run | {"method": method, "concurrency": level, "request_rate": cfg.request_rate,
                  "peak_rss_mb": peak_rss_mb()}, traces


def rotated(items: list, shift: int) -> list:
    shift %= max(1, len(items))
    return items[shift:] + items[:shift]


@dataclass
class Series:
    """The runs of one engine (ours, the baseline's, HF's) and their traces per (method, level)."""

    runs: list[dict] = field(default_factory=list)
    traces: dict[tuple, list[Trace]] = field(default_factory=lambda: defaultdict(list))

    def add(self, run: dict, traces: list[Trace]) -> None:
        self.runs.append(run)
        self.traces[(run["method"], run["concurrency"])].extend(traces)

    def records(self) -> list[dict]:
        return report.aggregate(self.runs, self.traces)


@dataclass
class Others:
    """What runs beside our backend in the same passes: another commit's engine, HF generate_batch."""

    baseline: object | None = None           # metaspec.bench.baseline.Baseline
    baseline_methods: list[str] = field(default_factory=list)
    hf: object | None = None                 # metaspec.bench.hf_batch.HFBatch


def measure_baseline(others: Others, cfg: ServeConfig, method: str, level: int, bar) -> tuple[dict, list[Trace]]:
    traces, wall, peak = others.baseline.run(None if method == AUTO else method, level)
    if bar is not None:
        bar.update(len(traces))
    return report.run_metrics(traces, wall) | {"method": method, "concurrency": level, "peak_rss_mb": peak}, traces


def measure_hf(others: Others, cfg: ServeConfig, level: int, requests: list[ServeRequest], bar
               ) -> tuple[dict, list[Trace]]:
    traces, wall = others.hf.run([list(r.ids) for r in requests], cfg.max_tokens, level)
    if bar is not None:
        bar.update(len(traces))
    return report.run_metrics(traces, wall) | {"method": "hf_generate_batch", "concurrency": level}, traces


def _wanted(levels: tuple[int, ...] | None, level: int) -> bool:
    return levels is None or level in levels


def run_passes(cfg: ServeConfig, backend, methods: list[str], requests: list[ServeRequest], others: Others,
               bar=None) -> dict[str, Series]:
    """Every repeat x level x method, ours then the baseline's for each method, then HF's, rotated per pass."""
    out = {"metaspec": Series(), "baseline": Series(), "hf": Series()}
    for repeat in range(cfg.repeats):
        for i, level in enumerate(cfg.levels):
            for m in rotated(methods, repeat + i):
                out["metaspec"].add(*measure(backend, cfg, m, level, requests, bar))
                if others.baseline is not None and m in others.baseline_methods \
                        and _wanted(cfg.baseline_concurrency, level):
                    out["baseline"].add(*measure_baseline(others, cfg, m, level, bar))
            if others.hf is not None and _wanted(cfg.hf_concurrency, level):
                out["hf"].add(*measure_hf(others, cfg, level, requests, bar))
    return out


def planned_requests(cfg: ServeConfig, methods: list[str], others: Others) -> int:
    per_level = [len(methods) + (len(others.baseline_methods) if _wanted(cfg.baseline_concurrency, lv) else 0)
                 + (1 if others.hf is not None and _wanted(cfg.hf_concurrency, lv) else 0) for lv in cfg.levels]
    return cfg.repeats * sum(per_level) * cfg.num_prompts


# ---- setting up ---------------------------------------------------------------------------------------------

def open_backend(cfg: ServeConfig, engine=None):
    """(backend, tokenizer): the engine backend over `engine` (built from cfg.engine when None), or a client."""
    if cfg.backend == "engine":
        backend = EngineBackend(engine if engine is not None else build_engine(cfg.engine))
        return backend, backend.engine.tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.engine.target)
    if cfg.backend == "grpc":
        return GrpcBackend(cfg.server, cfg.api_key), tokenizer
    return OpenAIBackend(cfg.base_url, cfg.model, cfg.api_key), tokenizer


def check_methods(cfg: ServeConfig, backend) -> list[str]:
    known = backend.methods()
    variants = [m for m in cfg.methods if ":" in m]
    if variants and backend.name != "engine":
        raise ValueError(f"methods {variants} carry settings, which only the engine backend applies")
    for m in variants:
        arm_variant(m)    # raises on a setting the arm does not take
    if known and (missing := [m for m in cfg.methods if m != AUTO and m.partition(":")[0] not in known]):
        raise ValueError(f"methods {missing} cannot run on this {backend.name} backend; available: {', '.join(known)}")
    return list(dict.fromkeys(cfg.methods))


def open_others(cfg: ServeConfig, methods: list[str], requests: list[ServeRequest], tokenizer) -> Others:
    others = Others()
    if cfg.baseline_ref:
        from metaspec.bench.baseline import Baseline

        spec = cfg.engine
        setup = {"target": spec.target, "drafter": spec.drafter, "dtype": spec.dtype, "threads": spec.threads,
                 "prompts": [list(r.ids) for r in requests], "max_tokens": cfg.max_tokens,
                 "ignore_eos": cfg.ignore_eos}
        others.baseline = Baseline(cfg.baseline_ref, setup)
        available = others.baseline.warm([m for m in methods if m != AUTO] if cfg.warmup else [])
        others.baseline_methods = [m for m in methods if m == AUTO or m in available]
    if cfg.compare_hf:
        from metaspec.bench.hf_batch import HFBatch

        others.hf = HFBatch(cfg.engine.target, cfg.engine.dtype, tokenizer.pad_token_id)
        if cfg.warmup:
            others.hf.warm([list(r.ids) for r in requests], cfg.max_tokens)
    return others


def warm(cfg: ServeConfig, backend, methods: list[str], requests: list[ServeRequest]) -> None:
    for m in methods:
        closed_loop(backend.sender(None if m == AUTO else m, min(cfg.max_tokens, 16), cfg.ignore_eos),
                    requests[:2], 2)


# ---- the whole run ------------------------------------------------------------------------------------------

def machine_info(cfg: ServeConfig) -> dict:
    import os
    import platform

    import torch
    import transformers

    from metaspec.bench.arms import _git_commit, cpu_model
    from metaspec.workers.model import resolve_dtype

    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "dtype": resolve_dtype(cfg.engine.dtype), "git_commit": _git_commit(),
            "load_avg_1_5_15": list(os.getloadavg()), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_serve(cfg: ServeConfig, engine=None) -> dict:
    """Run every load and return {config, machine, prompts, records, baseline_records, hf_records, ratios,
    memory, runs} (nothing written). `engine`: an Engine to drive instead of building one (engine backend)."""
    from tqdm import tqdm

    backend, tokenizer = open_backend(cfg, engine)
    others = Others()
    try:
        requests = mix_prompts(cfg, tokenizer)
        methods = check_methods(cfg, backend)
        load_before = machine_info(cfg)["load_avg_1_5_15"]
        if cfg.warmup:
            warm(cfg, backend, methods, requests)
        others = open_others(cfg, methods, requests, tokenizer)
        with tqdm(total=planned_requests(cfg, methods, others), desc="bench serve", unit="req",
                  disable=not cfg.progress) as bar:
            series = run_passes(cfg, backend, methods, requests, others, bar)
        memory = backend.engine.memory() if isinstance(backend, EngineBackend) else None
        baseline_commit = getattr(others.baseline, "commit", None)
    finally:
        if engine is None:
            backend.close()
        if others.baseline is not None:
            others.baseline.close()
    return assemble(cfg, requests, series, memory, load_before, baseline_commit)


def assemble(cfg: ServeConfig, requests: list[ServeRequest], series: dict[str, Series], memory: dict | None,
             load_before: list[float], baseline_commit: str | None) -> dict:
    records = {name: s.records() for name, s in series.items()}
    top = max(cfg.levels)
    peak = [r.get("peak_rss_mb") for r in series["metaspec"].runs if r["concurrency"] == top]
    return {
        "config": asdict(cfg), "machine": machine_info(cfg) | {"load_avg_at_start": load_before},
        "baseline_commit": baseline_commit,
        "prompts": {"n": len(requests), "categories": dict(sorted(_count(r.category for r in requests).items())),
                    "prompt_tokens_mean": sum(len(r.ids) for r in requests) / len(requests),
                    "ids": [r.prompt_id for r in requests]},
        "records": records["metaspec"], "baseline_records": records["baseline"], "hf_records": records["hf"],
        "ratios": report.ratios(records["metaspec"], records["hf"], records["baseline"]),
        "memory": {"kv_pool": memory, "concurrency": top, "peak_rss_mb": max(filter(None, peak), default=None)},
        "runs": [r | {"engine": name} for name, s in series.items() for r in s.runs],
    }


def _count(items) -> dict:
    out: dict = defaultdict(int)
    for x in items:
        out[x] += 1
    return dict(out)


def format_result(result: dict) -> str:
    m, c = result["machine"], result["config"]
    head = (f"machine: {m['cpu_model']} · {m['cpu_count']} cpus · {m['torch_threads']} torch threads · {m['dtype']} · "
            f"backend {c['backend']} · {result['prompts']['n']} prompts × {c['max_tokens']} tokens · "
            f"{c['repeats']} repeat(s) · load avg start/end {_load(m['load_avg_at_start'])} / "
            f"{_load(m['load_avg_1_5_15'])}")
    parts = [head, report.table(result["records"], "metaspec (this tree)"),
             report.table(result["baseline_records"], f"old engine @ {(result['baseline_commit'] or '')[:10]}"),
             report.table(result["hf_records"], f"HF generate_batch (transformers {m['transformers']})"),
             report.ratio_lines(result["ratios"]), _memory_line(result["memory"])]
    return "\n\n".join(p for p in parts if p)


def _load(xs) -> str:
    return "/".join(f"{x:.2f}" for x in xs) if xs else "-"


def _memory_line(mem: dict) -> str:
    pool = mem.get("kv_pool")
    if not pool:
        return ""
    kv = ", ".join(f"{d}: {b / 2**20:.0f} MiB" for d, b in pool["kv_bytes"].items())
    rss = mem.get("peak_rss_mb")
    return (f"memory: KV pool {pool['slots']} slots ({kv}), fixed at start; peak process RSS at concurrency "
            f"{mem['concurrency']}: {'-' if rss is None else f'{rss:.0f} MiB'}")


def write_outputs(result: dict, out_dir: Path) -> dict[str, Path]:
    """bench_serve.json, table.txt and throughput.png under out_dir."""
    m, c = result["machine"], result["config"]
    title = (f"output tokens/s vs concurrency · {Path(c['engine']['target']).name} {m['dtype']} · "
             f"{m['torch_threads']} threads · {c['max_tokens']} tokens · {m['cpu_model']}")
    series = {"metaspec": result["records"], f"old {(result['baseline_commit'] or '')[:7]}": result["baseline_records"],
              "hf": result["hf_records"]}
    return report.write_files(out_dir, ("bench_serve.json", "table.txt", "throughput.png"), result,
                              format_result(result),
                              lambda path: report.plot({k: v for k, v in series.items() if v}, path, title))


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("bench-serve-%Y%m%d-%H%M%S")
