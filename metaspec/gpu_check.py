"""One-command check of the batched engine on an accelerator: `python -m metaspec.gpu_check [--out FILE]`.

1. Every registered arm's greedy contract on the device: each arm's tokens equal AR's, alone and inside one mixed
   batch of every arm (fp32, tiny seeded random models built here, then the shipped models when present).
2. Batched AR throughput at a few concurrency levels (shipped target, bf16 when the device supports it).
3. KV pool memory per device and peak device memory.
Prints one JSON object (and writes it to --out). Exit status 0 when every contract holds, 1 otherwise, 2 when the
asked device is missing. `--device cpu` runs the same checks here (how the module itself is tested).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
PROMPTS = ["def add(a, b):\n    return", "import os\nimport sys\n\ndef main(", "The quick brown fox jumps over",
           "class Stack:\n    def __init__(self):", "for i in range(10):\n    print(i", "Once upon a time"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tiny_pair(root: Path) -> tuple[str, str]:
    """A seeded random Llama target + noisy-copy drafter sharing the shipped tokenizer (no download)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(CHECKPOINTS / "target")
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    target = LlamaForCausalLM(conf).eval()
    drafter = LlamaForCausalLM(conf).eval()
    drafter.load_state_dict(target.state_dict())
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn_like(p) * 0.1 * p.std())
    for name, model in (("target", target), ("drafter", drafter)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return str(root / "target"), str(root / "drafter")


def engine(target: str, drafter: str, device: str, dtype: str, max_batch: int):
    from metaspec.workers.engine import Engine, EngineConfig
    from metaspec.workers.model import ModelConfig
    from metaspec.workers.scheduler import SchedulerConfig
    from metaspec.workers.store import AdjacencyTable, NgramConfig, NgramTable

    cfg = EngineConfig(target=ModelConfig(target, dtype=dtype, device=device),
                       drafter=ModelConfig(drafter, dtype=dtype, device=device), default_method="ar",
                       batch=SchedulerConfig(max_batch=max_batch, slot_tokens=512))
    e = Engine(cfg)
    vocab = e.target.vocab_size
    e.resources.update(ngram_table=NgramTable(NgramConfig(), vocab), adjacency_table=AdjacencyTable(vocab))
    return e


def contract(e, max_tokens: int = 32) -> dict:
    """Every available arm alone and inside one mixed batch, against AR alone: mismatching (arm, prompt)s."""
    from metaspec.workers.engine import Request
    from metaspec.workers.types import SamplingParams

    params = SamplingParams(max_tokens=max_tokens)
    methods = sorted(e.available_methods())
    reference = {p: e.generate(Request(prompt=p, method="ar", params=params)).token_ids for p in PROMPTS}
    requests = [Request(prompt=p, method=m, params=params) for m in methods for p in PROMPTS]
    alone = [e.generate(r) for r in requests]
    mixed = e.generate_many(requests)
    bad = [f"{r.method} {'alone' if i == 0 else 'batched'}: {r.prompt[:24]!r}"
           for r, a, b in zip(requests, alone, mixed) for i, got in enumerate((a, b))
           if got.token_ids != reference[r.prompt]]
    drafted = {m: sum(a.stats.drafted for r, a in zip(requests, alone) if r.method == m) for m in methods}
    return {"methods": methods, "mismatches": bad, "drafted": drafted, "ok": not bad}


def throughput(e, device: str, levels: list[int], max_tokens: int = 64) -> list[dict]:
    """Output tokens/s of batched AR at each concurrency level (ignore_eos: every request emits max_tokens)."""
    from metaspec.workers.engine import Request
    from metaspec.workers.types import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    out = []
    for c in levels:
        requests = [Request(prompt=PROMPTS[i % len(PROMPTS)], method="ar", params=params) for i in range(c)]
        e.generate_many(requests[:1])                       # warm-up
        _sync(device)
        t0 = time.perf_counter()
        results = e.generate_many(requests)
        _sync(device)
        wall = time.perf_counter() - t0
        out.append({"concurrency": c, "output_tokens_per_s": sum(len(r.token_ids) for r in results) / wall,
                    "wall_s": wall})
    base = out[0]["output_tokens_per_s"]
    for row in out:
        row["x_concurrency_1"] = row["output_tokens_per_s"] / base
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"device": args.device, "available": False}))
        return 2
    report: dict = {"device": args.device, "torch": torch.__version__,
                    "name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = engine(*tiny_pair(Path(tmp)), args.device, "float32", 64)
        report["tiny_contract"] = contract(tiny)
        tiny.close()
    if (CHECKPOINTS / "target" / "config.json").exists():
        shipped = engine(str(CHECKPOINTS / "target"), str(CHECKPOINTS / "drafter"), args.device, "float32", 64)
        report["shipped_contract"] = contract(shipped)
        shipped.close()
        dtype = "bfloat16" if args.device == "cpu" or torch.cuda.is_bf16_supported() else "float16"
        fast = engine(str(CHECKPOINTS / "target"), str(CHECKPOINTS / "drafter"), args.device, dtype, 64)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        report["throughput"] = {"dtype": dtype,
                                "levels": throughput(fast, args.device, [int(c) for c in args.levels.split(",")])}
        report["memory"] = fast.memory()
        if args.device.startswith("cuda"):
            report["memory"]["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        fast.close()
    ok = all(v["ok"] for k, v in report.items() if k.endswith("_contract"))
    report["ok"] = ok
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
