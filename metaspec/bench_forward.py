"""Micro-benchmark of one cached forward (batch 1, T new tokens): HF vs the lean Llama forward and its kernels.

    python -m metaspec.bench_forward [--model PATH ...] [--threads 2] [--context 256] [--clock wall|cpu] [--json F]

For every model and dtype it times `Session.forward(T tokens)` after `context` cached tokens, T = 1 and 9, for
    hf            HF's generic forward (DynamicCache)
    lean          lean forward, plain F.linear and attention in the model's dtype (bf16: bit-identical to HF)
    lean+prepack  lean forward, oneDNN GEMMs on weights prepacked at load, attention in the model's dtype
    lean+fast     the defaults of ModelConfig (prepack, and on CPU a bf16 model's KV cache/attention in fp32)
Variants run interleaved round by round (this machine is shared and noisy); each call is timed on its own and
the table shows the median (min in the JSON). Before timing, a sanity check compares every lean variant with HF
on the same chunked token stream (fp32: max |diff|; bf16: diff in bf16 ulps of each row's largest logit, argmax
agreement) and runs `exit_layer` against HF's hidden states; it exits non-zero when fp32 drifts by >= 1e-4.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from metaspec.workers.model import HFModel, LeanLlama

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
VARIANTS = {"lean": dict(prepack=False, cpu_fp32_attention=False),
            "lean+prepack": dict(prepack=True, cpu_fp32_attention=False),
            "lean+fast": dict(prepack=True, cpu_fp32_attention=True)}


@dataclass(frozen=True)
class ForwardBenchConfig:
    models: tuple[str, ...]                          # HF checkpoint directories
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    threads: int = 2                                 # torch intra-op threads
    context: int = 256                               # tokens in the cache before each timed forward
    lengths: tuple[int, ...] = (1, 9)                # T: new tokens per timed forward
    rounds: int = 10                                 # interleaved rounds over all variants
    calls: int = 10                                  # timed calls per variant, length and round
    seed: int = 0
    clock: str = "wall"                              # "wall" | "cpu": the calling thread's CPU time, which other
                                                     # processes on a shared machine disturb less (use with 1 thread)


def _variants(path: str, dtype: torch.dtype) -> tuple[object, dict[str, object]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    models = {"hf": HFModel(hf)}
    for name, kw in VARIANTS.items():
        if name != "lean+fast" or dtype != torch.float32:  # fp32 attention changes nothing for an fp32 model
            models[name] = LeanLlama(hf, **kw)
    return hf, models


def _stream(model, ids: list[int], chunks: list[int]) -> torch.Tensor:
    session, outs, pos = model.session(len(ids)), [], 0
    for n in chunks:
        outs.append(session.forward(ids[pos:pos + n]))
        pos += n
    return torch.cat(outs)                                                   # [sum(chunks), V]


def sanity(hf, models: dict, ids: list[int]) -> list[dict]:
    """Lean variants vs HF on one chunked stream (prefill, a verify-sized and single-token steps), plus exit_layer."""
    chunks = [len(ids) - 24, 9, 1, 1, 4, 9]
    ref = _stream(models["hf"], ids, chunks)
    scale = torch.ldexp(torch.ones(ref.shape[0], 1), torch.frexp(ref.abs().amax(-1, keepdim=True))[1] - 8)
    rows = []
    for name, model in models.items():
        if name == "hf":
            continue
        out = _stream(model, ids, chunks)
        diff = (out - ref).abs()
        rows.append({"variant": name, "max_abs_diff": diff.max().item(), "max_row_ulps": (diff / scale).max().item(),
                     "argmax_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item()})
    exit_layer = max(1, models["hf"].num_layers // 2)
    with torch.inference_mode():
        h = hf.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[exit_layer]
        early = hf.lm_head(hf.model.norm(h))[0].float()                      # [P, V]
    for name, model in models.items():
        if name != "hf":
            out = model.session(len(ids)).forward(ids, exit_layer=exit_layer)
            rows.append({"variant": name, "exit_layer": exit_layer, "max_abs_diff": (out - early).abs().max().item()})
    return rows


def time_forwards(models: dict, ids: list[int], cfg: ForwardBenchConfig) -> dict[tuple[str, int], list[float]]:
    sessions = {}
    for name, model in models.items():
        sessions[name] = model.session(cfg.context + max(cfg.lengths))
        sessions[name].forward(ids[:cfg.context])
    ms: dict[tuple[str, int], list[float]] = {(n, t): [] for n in models for t in cfg.lengths}
    clock = {"wall": time.perf_counter, "cpu": time.thread_time}[cfg.clock]
    for _ in range(cfg.rounds):
        for name, s in sessions.items():
            for t in cfg.lengths:
                new = ids[cfg.context:cfg.context + t]
                for i in range(cfg.calls + 2):                               # 2 warm-up calls
                    start = clock()
                    s.forward(new)
                    if i >= 2:
                        ms[(name, t)].append((clock() - start) * 1e3)
                    s.rollback(cfg.context)
    return ms


def run(cfg: ForwardBenchConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    report = {"config": asdict(cfg), "machine": {"cpu": _cpu_name(), "torch": torch.__version__,
                                                "threads": torch.get_num_threads()}, "results": [], "checks": []}
    for path in cfg.models:
        for dname in cfg.dtypes:
            hf, models = _variants(path, getattr(torch, dname))
            ids = torch.randint(0, models["hf"].vocab_size, (cfg.context + max(cfg.lengths),), generator=gen).tolist()
            params = sum(p.numel() for p in hf.parameters())
            for row in sanity(hf, models, ids[:96]):
                report["checks"].append({"model": path, "dtype": dname, **row})
            for (name, t), values in time_forwards(models, ids, cfg).items():
                report["results"].append({"model": path, "params": params, "dtype": dname, "variant": name, "T": t,
                                          "ms_median": statistics.median(values), "ms_min": min(values)})
    return report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def table(report: dict) -> str:
    """One row per model, dtype and variant: median and min ms at each T, T_max/T_1 and speed-up over HF (medians)."""
    res = {(r["model"], r["dtype"], r["variant"], r["T"]): r for r in report["results"]}
    lengths = report["config"]["lengths"]
    head = ["model", "params", "dtype", "variant"] + [f"T={t} ms med (min)" for t in lengths]
    head += [f"T={lengths[-1]}/T={lengths[0]}"] + [f"vs hf T={t}" for t in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (model, dtype, variant, t), r in res.items():
        if t != lengths[0]:
            continue
        ms = [res[(model, dtype, variant, x)]["ms_median"] for x in lengths]
        low = [res[(model, dtype, variant, x)]["ms_min"] for x in lengths]
        hf = [res[(model, dtype, "hf", x)]["ms_median"] for x in lengths]
        cells = [Path(model).name, f"{r['params'] / 1e6:.1f}M", dtype, variant]
        cells += [f"{v:.3f} ({lo:.3f})" for v, lo in zip(ms, low)]
        cells += [f"{ms[-1] / ms[0]:.2f}"] + [f"{h / v:.2f}x" for h, v in zip(hf, ms)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", help="checkpoint dir (repeatable); default: shipped target and drafter")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--json", help="also write the report here")
    a = p.parse_args(argv)
    models = tuple(a.model or [str(CHECKPOINTS / "target"), str(CHECKPOINTS / "drafter")])
    cfg = ForwardBenchConfig(models, tuple(a.dtypes.split(",")), a.threads, a.context, rounds=a.rounds, calls=a.calls,
                             clock=a.clock)
    from transformers.utils import logging

    logging.disable_progress_bar()
    report = run(cfg)
    print(json.dumps(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    print(table(report))
    for c in report["checks"]:
        print({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in c.items()})
    bad = [c for c in report["checks"] if c["dtype"] == "float32" and c["max_abs_diff"] >= 1e-4]
    if bad:
        print(f"FAIL: fp32 lean forward drifts from HF: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
