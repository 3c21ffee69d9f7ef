"""`metaspec bench`: every chosen arm over categorized prompts, interleaved, against AR measured in the same run.

For each repeat and each prompt every runner (our arms, and HF's own `generate` variants with `--compare-hf`)
runs once, in an order rotated per prompt, so machine noise hits all of them alike. Output: `bench.json` (raw
per-run records, summary, machine info), a table on stdout and `speedup.png`. The table-driven arms run once per
table mode, as `ngram_store:cold` / `ngram_store:warm` (metaspec/bench_tables.py): from empty tables, and from
tables a pass over other prompts of the same category filled (locally, or through Redis with `redis_url`).

>>> result = run_bench(BenchConfig(categories=("qa", "humaneval"), n_per_category=2, max_tokens=32))
>>> [(r["category"], r["arm"]) for r in result["summary"]][:3]
[('qa', 'ar'), ('qa', 'pld'), ('qa', 'sps')]
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from metaspec.bench_generate import DEFAULT_CHECKPOINTS, GenerateConfig, local_engine
from metaspec.prompts import Prompt, find_data_dir, load_prompts, sample_prompts
from metaspec.bench_report import table_gains
from metaspec.workers.engine import Engine, Request
from metaspec.workers.model import resolve_dtype
from metaspec.workers.store import redact_url
from metaspec.workers.types import SamplingParams


@dataclass(frozen=True)
class BenchConfig:
    target: str = str(DEFAULT_CHECKPOINTS / "target")    # HF causal LM (path or hub id)
    drafter: str | None = str(DEFAULT_CHECKPOINTS / "drafter")  # draft model sharing the tokenizer; None = none
    dtype: str = "auto"                      # compute dtype of both models
    threads: int | None = None               # torch intra-op threads (None = torch's default)
    arms: tuple[str, ...] | None = None      # our arms to run (None = every arm the engine can run); ar always runs
    categories: tuple[str, ...] | None = None  # prompt categories (None = all, see metaspec.prompts.CATEGORIES)
    n_per_category: int = 5                  # prompts sampled per category
    repeats: int = 1                         # interleaved passes over all prompts
    max_tokens: int = 128                    # tokens generated per run (EOS ignored so every run emits as many)
    temperature: float = 0.0                 # 0 = greedy
    seed: int = 0                            # prompt sampling and decoding seed
    data_dir: str | None = None              # shared/data folder (None = found by walking up from cwd)
    max_prompt_tokens: int | None = None     # keep the last N prompt tokens (None = what the context allows)
    compare_hf: bool = False                 # also run HF generate: greedy, assisted, prompt lookup
    hf_prompt_lookup_tokens: int = 10        # HF's prompt_lookup_num_tokens
    warmup: bool = True                      # one untimed run per runner before measuring
    progress: bool = True                    # tqdm progress bar
    table_modes: tuple[str, ...] = ("cold", "warm")  # table-driven arms run from empty and/or warmed tables
    warm_per_category: int = 5               # other prompts per category run once to warm that category's tables
    redis_url: str | None = None             # warm tables pass through this Redis (None = in-process tables)

    def __post_init__(self) -> None:
        for name in ("n_per_category", "repeats", "max_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.table_modes or set(self.table_modes) - {"cold", "warm"}:
            raise ValueError(f"table_modes must be a non-empty subset of cold, warm; got {self.table_modes}")
        if self.warm_per_category < 0:
            raise ValueError(f"warm_per_category must be >= 0, got {self.warm_per_category}")


@dataclass(frozen=True)
class RunOutput:
    token_ids: list[int]       # generated tokens (prompt excluded)
    wall_s: float              # request wall time
    ttft_s: float | None       # time to first token (None where the runner cannot tell)
    stats: dict                # DecodeStats fields for our arms; {} for HF


@dataclass(frozen=True)
class Runner:
    name: str                               # "ar", "sps", ... or "hf_greedy", "hf_assisted", "hf_pld"
    family: str                             # "ours" | "hf"
    run: Callable[[list[int]], RunOutput]   # prompt ids → one timed generation
    baseline_of: str | None = None          # for HF runners: which of our arms it is compared with
    prepare: Callable[[BenchPrompt], dict] | None = None  # untimed set-up before each run (the table copy it
                                                          # starts from); returns fields for the run's record


@dataclass(frozen=True)
class BenchPrompt:
    prompt: Prompt
    ids: tuple[int, ...]       # tokenized (and left-truncated) prompt
    truncated: bool            # True when the prompt's head was cut to fit the context


# ---- peak memory -------------------------------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_mb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB: since the last reset on Linux, since start elsewhere."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024


def rss_mb() -> float | None:
    """Resident memory now in MiB (None where /proc is missing)."""
    return _proc_status_mb("VmRSS")


# ---- runners -----------------------------------------------------------------------------------------------

def build_engine(cfg: BenchConfig) -> Engine:
    """The bench engine: runs never teach the tables, which start empty (so the table-driven arms can run)."""
    from metaspec.bench_tables import Tables

    engine = local_engine(GenerateConfig(cfg.target, cfg.drafter, cfg.dtype, cfg.threads), learn_emitted=False)
    engine.resources.update(Tables.empty(engine.target.vocab_size).resources())
    return engine


def choose_arms(engine: Engine, wanted: tuple[str, ...] | None) -> list[str]:
    """AR first, then the wanted arms (all the engine can run by default); unknown or unrunnable ones raise."""
    available = engine.available_methods()
    wanted = tuple(available) if wanted is None else wanted
    if missing := [a for a in wanted if a not in available]:
        raise ValueError(f"arms {missing} cannot run here; available: {', '.join(available)}")
    return ["ar"] + [a for a in wanted if a != "ar"]


def our_runner(engine: Engine, method: str, params: SamplingParams) -> Runner:
    def run(ids: list[int]) -> RunOutput:
        result = engine.generate(Request(prompt_ids=tuple(ids), params=params, method=method))
        return RunOutput(result.token_ids, result.wall_s, result.ttft_s, result.stats.to_dict())

    return Runner(method, "ours", run)


def bench_params(cfg: BenchConfig) -> SamplingParams:
    return SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed, ignore_eos=True)


def table_runner(engine: Engine, method: str, params: SamplingParams, mode: str, warm: dict) -> Runner:
    """`method` from a fresh copy of its category's warm tables (or from empty ones) at every run."""
    from metaspec.bench_tables import Tables

    def prepare(bp: BenchPrompt) -> dict:
        start = warm.get(bp.prompt.category) if mode == "warm" else None
        tables = start.copy() if start is not None else Tables.empty(engine.target.vocab_size)
        engine.resources.update(tables.resources())
        return {"table_mode": mode} | {f"table_{k}": v for k, v in tables.size().items()}

    return Runner(f"{method}:{mode}", "ours", our_runner(engine, method, params).run, prepare=prepare)


def make_runners(cfg: BenchConfig, engine: Engine, warm: dict | None = None) -> list[Runner]:
    """Our arms (table-driven ones once per table mode, from `warm`: category -> Tables), then HF's."""
    from metaspec.bench_tables import table_arms

    params = bench_params(cfg)
    methods = choose_arms(engine, cfg.arms)
    tabled = set(table_arms(methods))
    runners = [table_runner(engine, m, params, mode, warm or {}) if m in tabled else our_runner(engine, m, params)
               for m in methods for mode in (cfg.table_modes if m in tabled else ("",))]
    if cfg.compare_hf:
        from metaspec.bench_hf import hf_runners
        runners += hf_runners(cfg, engine.tokenizer)
    return runners


# ---- prompts -----------------------------------------------------------------------------------------------

def prompt_budget(cfg: BenchConfig, engine: Engine) -> int:
    """Most prompt tokens that leave room for max_tokens, a full draft and its bonus in the context."""
    room = engine.target.max_context - cfg.max_tokens - engine.cfg.k_max - 2
    if room <= 0:
        raise ValueError(f"max_tokens={cfg.max_tokens} leaves no room for a prompt in {engine.target.max_context}")
    return min(room, cfg.max_prompt_tokens) if cfg.max_prompt_tokens else room


def tokenize(prompts: list[Prompt], engine: Engine, budget: int) -> list[BenchPrompt]:
    out = []
    for p in prompts:
        ids = engine.tokenizer.encode(p.text, add_special_tokens=False)
        out.append(BenchPrompt(p, tuple(ids[-budget:]), len(ids) > budget))
    return out


def select_prompts(cfg: BenchConfig, engine: Engine) -> list[BenchPrompt]:
    data_dir = Path(cfg.data_dir) if cfg.data_dir else find_data_dir()
    chosen = sample_prompts(load_prompts(data_dir), cfg.n_per_category, cfg.seed, cfg.categories)
    return tokenize(chosen, engine, prompt_budget(cfg, engine))


# ---- the interleaved loop ----------------------------------------------------------------------------------

def rotated(runners: list[Runner], shift: int) -> list[Runner]:
    shift %= len(runners)
    return runners[shift:] + runners[:shift]


def measure(runner: Runner, bp: BenchPrompt, repeat: int) -> dict:
    """One timed run → one raw record (without the AR comparison, added later)."""
    extra = runner.prepare(bp) if runner.prepare is not None else {}
    reset_peak_rss()
    rss_start = rss_mb()
    out = runner.run(list(bp.ids))
    peak = peak_rss_mb()
    s = out.stats
    return {
        "repeat": repeat, "prompt_id": bp.prompt.prompt_id, "category": bp.prompt.category,
        "arm": runner.name, "family": runner.family, "baseline_of": runner.baseline_of,
        "prompt_tokens": len(bp.ids), "prompt_truncated": bp.truncated,
        "tokens": len(out.token_ids), "wall_s": out.wall_s, "ttft_s": out.ttft_s,
        "tokens_per_s": len(out.token_ids) / out.wall_s if out.wall_s > 0 else 0.0,
        "drafts": s.get("drafts"), "drafted": s.get("drafted"), "accepted": s.get("accepted"),
        "steps": s.get("steps"), "acceptance_length": s.get("acceptance_length"),
        "acceptance_rate": s.get("acceptance_rate"), "fallback": s.get("fallback"),
        "peak_rss_mb": peak, "rss_start_mb": rss_start, "token_ids": list(out.token_ids),
    } | extra


def mark_matches(records: list[dict], eos_ids: frozenset[int]) -> None:
    """Set `matches_ar` on each record: our arms must equal AR token for token; HF runners are compared up to
    AR's first EOS (HF's min_new_tokens masks EOS, so it continues differently after it)."""
    ar = {(r["repeat"], r["prompt_id"]): r["token_ids"] for r in records if r["arm"] == "ar"}
    for r in records:
        ref = ar.get((r["repeat"], r["prompt_id"]))
        if ref is None:
            r["matches_ar"] = None
            continue
        if r["family"] == "hf":
            cut = next((i for i, t in enumerate(ref) if t in eos_ids), len(ref))
            r["matches_ar"] = r["token_ids"][:cut] == ref[:cut]
        else:
            r["matches_ar"] = r["token_ids"] == ref


def run_loop(runners: list[Runner], prompts: list[BenchPrompt], cfg: BenchConfig) -> list[dict]:
    from tqdm import tqdm

    if cfg.warmup:
        for runner in runners:
            if runner.prepare is not None:
                runner.prepare(prompts[0])
            runner.run(list(prompts[0].ids))
    records = []
    total = cfg.repeats * len(prompts) * len(runners)
    with tqdm(total=total, desc="bench", unit="run", disable=not cfg.progress) as bar:
        for repeat in range(cfg.repeats):
            for i, bp in enumerate(prompts):
                for runner in rotated(runners, i + repeat * len(prompts)):
                    bar.set_postfix_str(f"{bp.prompt.category}/{runner.name}", refresh=False)
                    records.append(measure(runner, bp, repeat))
                    bar.update()
    return records


# ---- machine info and the whole run ------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(cfg: BenchConfig, engine: Engine) -> dict:
    import transformers

    return {
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "dtype": resolve_dtype(cfg.dtype), "target": cfg.target,
        "drafter": cfg.drafter,
        "target_class": type(engine.target).__name__,
        "drafter_class": type(engine.drafter).__name__ if engine.drafter else None,
        "peak_rss_resettable": reset_peak_rss(), "git_commit": _git_commit(),
        "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,  # others' load skews timings
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def prompt_digest(prompts: list[BenchPrompt]) -> str:
    return hashlib.sha256(repr([(p.prompt.prompt_id, p.ids) for p in prompts]).encode()).hexdigest()[:16]


def run_bench(cfg: BenchConfig) -> dict:
    """Run the benchmark and return {config, machine, prompts, records, summary, hf_ratios} (nothing written)."""
    from metaspec.bench_report import hf_ratios, summarize

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    engine = build_engine(cfg)
    prompts, warm = select_prompts(cfg, engine), {}
    tables = {"modes": list(cfg.table_modes), "through_redis": cfg.redis_url is not None, "warm": {}}
    if "warm" in cfg.table_modes and table_arms_wanted(cfg, engine):
        warm, tables["warm"] = warm_up(cfg, engine, prompts)
    runners = make_runners(cfg, engine, warm)
    records = run_loop(runners, prompts, cfg)
    mark_matches(records, engine.eos_ids)
    order = [r.name for r in runners]
    return {
        "config": asdict(cfg) | {"redis_url": redact_url(cfg.redis_url)}, "machine": machine_info(cfg, engine),
        "tables": tables, "table_gains": table_gains(records),
        "prompts": [{"prompt_id": p.prompt.prompt_id, "category": p.prompt.category, "prompt_tokens": len(p.ids),
                     "truncated": p.truncated} for p in prompts],
        "prompt_digest": prompt_digest(prompts),
        "records": records, "summary": summarize(records, order), "hf_ratios": hf_ratios(records),
        "hf_settings": _hf_settings(cfg),
    }


def table_arms_wanted(cfg: BenchConfig, engine: Engine) -> bool:
    from metaspec.bench_tables import table_arms

    return bool(table_arms(choose_arms(engine, cfg.arms)))


def warm_up(cfg: BenchConfig, engine: Engine, measured: list[BenchPrompt]) -> tuple[dict, dict]:
    """Fill each measured category's warm tables from other prompts of it: (category -> Tables, a JSON report)."""
    from tqdm import tqdm

    from metaspec.bench_tables import warm_prompts, warm_tables

    data_dir = Path(cfg.data_dir) if cfg.data_dir else find_data_dir()
    chosen = warm_prompts(load_prompts(data_dir), [bp.prompt for bp in measured], cfg.warm_per_category, cfg.seed)
    budget = prompt_budget(cfg, engine)
    ids = {c: [list(bp.ids) for bp in tokenize(ps, engine, budget)] for c, ps in chosen.items()}
    with tqdm(total=len(ids), desc="warm tables", unit="category", disable=not cfg.progress) as bar:
        warm = warm_tables(engine, ids, bench_params(cfg), cfg.redis_url, lambda c: bar.update())
    report = {c: {"prompts": [p.prompt_id for p in chosen[c]]} | warm[c].size() for c in warm}
    return warm, report


def _hf_settings(cfg: BenchConfig) -> dict | None:
    if not cfg.compare_hf:
        return None
    from metaspec.bench_hf import hf_settings
    return hf_settings(cfg)


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("bench-%Y%m%d-%H%M%S")


def write_outputs(result: dict, out_dir: Path) -> dict[str, Path]:
    """bench.json, table.txt and speedup.png under out_dir."""
    from metaspec.bench.report import write_files
    from metaspec.bench_report import format_tables, plot_speedup

    return write_files(out_dir, ("bench.json", "table.txt", "speedup.png"), result, format_tables(result),
                       lambda path: plot_speedup(result["summary"], path, title=_plot_title(result)))


def _plot_title(result: dict) -> str:
    m, c = result["machine"], result["config"]
    return (f"speed-up vs AR · {Path(c['target']).name}/{Path(c['drafter'] or '-').name} {m['dtype']} · "
            f"{m['torch_threads']} threads · {m['cpu_model']}")
