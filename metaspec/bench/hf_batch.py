"""`--compare-hf` in `metaspec bench serve`: HF transformers' own continuous batching (`generate_batch`, a paged
cache and one forward per step over every running request) on the same target, prompts and max_tokens, with
`max_requests_per_batch` = the concurrency level. Greedy, EOS disabled, as our runs.

HF submits every prompt at once and admits at most `concurrency` at a time, which is what closed-loop clients
see; TTFT is measured from admission (the request leaving HF's queue) to its first token, per-token timestamps
give TPOT and ITL.
"""

from __future__ import annotations

import time

from metaspec.bench.load import Trace


class HFBatch:
    """The target loaded once through HF (same dtype as ours, SDPA attention)."""

    def __init__(self, target: str, dtype: str, pad_token_id: int | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from metaspec.workers.model import resolve_dtype

        self.model = AutoModelForCausalLM.from_pretrained(target, dtype=getattr(torch, resolve_dtype(dtype))).eval()
        self.pad_token_id = pad_token_id
        self.version = _version()

    def _configs(self, max_tokens: int, concurrency: int):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1,
                               pad_token_id=self.pad_token_id)
        return gen, ContinuousBatchingConfig(max_requests_per_batch=concurrency)

    def run(self, prompts: list[list[int]], max_tokens: int, concurrency: int) -> tuple[list[Trace], float]:
        """One timed generate_batch over all prompts: (one trace per request, wall seconds)."""
        gen, cb = self._configs(max_tokens, concurrency)
        t0 = time.perf_counter()
        outputs = self.model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb,
                                            record_timestamps=True, warmup=False)
        wall = time.perf_counter() - t0
        return [_trace(o) for o in outputs.values()], wall

    def warm(self, prompts: list[list[int]], max_tokens: int) -> None:
        self.run(prompts[:2], min(max_tokens, 8), 2)


def _trace(out) -> Trace:
    start = out.lifespan[0] if out.lifespan[0] > 0 else out.created_time
    stamps = list(out.timestamps or [])
    trace = Trace(start, t_chunks=stamps, n_chunks=[1] * len(stamps), error=out.error)
    if len(stamps) < len(out.generated_tokens) and stamps:   # tokens without a stamp count on the last one
        trace.n_chunks[-1] += len(out.generated_tokens) - len(stamps)
    return trace


def _version() -> str:
    import transformers

    return transformers.__version__
