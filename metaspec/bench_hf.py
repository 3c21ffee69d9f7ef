"""HF transformers' own `generate` as benchmark baselines: plain greedy, assisted generation, prompt lookup.

Each runs on the same checkpoints, dtype and prompt ids as our arms, with `min_new_tokens = max_new_tokens` so
every run emits exactly `max_tokens` (our arms run with `ignore_eos` for the same reason).
"""

from __future__ import annotations

import time

import torch

from metaspec.bench.arms import BenchConfig, Runner, RunOutput

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf(path: str, dtype: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype]).eval()


def hf_generate(model, ids: list[int], cfg: BenchConfig, pad_id: int | None, extra: dict) -> RunOutput:
    """One timed `model.generate` call; extra holds the method's own arguments (assistant_model=...)."""
    input_ids = torch.tensor([ids])                                            # [1, P]
    sampling = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if cfg.temperature > 0:
        sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=1.0, top_k=0)
        torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=cfg.max_tokens,
                             min_new_tokens=cfg.max_tokens, pad_token_id=pad_id, **sampling, **extra)
    wall = time.perf_counter() - t0
    return RunOutput(out[0, len(ids):].tolist(), wall, None, {})


def hf_runners(cfg: BenchConfig, tokenizer) -> list[Runner]:
    """hf_greedy (vs our ar), hf_pld (vs our pld) and, with a drafter, hf_assisted (vs our sps)."""
    target = load_hf(cfg.target, cfg.dtype)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    methods: list[tuple[str, str, dict]] = [
        ("hf_greedy", "ar", {}),
        ("hf_pld", "pld", {"prompt_lookup_num_tokens": cfg.hf_prompt_lookup_tokens}),
    ]
    if cfg.drafter:
        methods.insert(1, ("hf_assisted", "sps", {"assistant_model": load_hf(cfg.drafter, cfg.dtype)}))
    return [Runner(name, "hf", _bind(target, cfg, pad_id, extra), baseline_of=ours) for name, ours, extra in methods]


def _bind(model, cfg: BenchConfig, pad_id: int | None, extra: dict):
    return lambda ids: hf_generate(model, ids, cfg, pad_id, extra)


def hf_settings(cfg: BenchConfig) -> dict:
    """The HF generation settings that shape its speculation (defaults of the drafter's generation config)."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(cfg.drafter) if cfg.drafter else GenerationConfig()
    defaults = getattr(GenerationConfig, "_get_default_generation_params", dict)()  # transformers 5 fills Nones
    keys = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
            "max_matching_ngram_size")
    settings = {k: getattr(gen, k, None) if getattr(gen, k, None) is not None else defaults.get(k) for k in keys}
    return settings | {"prompt_lookup_num_tokens": cfg.hf_prompt_lookup_tokens}
