"""How long featurisation + choice takes per request (p50/p99 in microseconds), on real prompt texts."""

from __future__ import annotations

import time

import numpy as np

from .features import RequestInput
from .types import PoolInfo

DEFAULT_POOLS = [
    PoolInfo("cpu", ("ar", "sps", "pld"), {"accelerator": "cpu", "mem_gb": 16, "rel_speed": 1.0, "cores": 2,
                                           "devices": 2}, load=0.3),
]


def choice_latency_us(selector, texts: list[str], pools: list[PoolInfo] = DEFAULT_POOLS, rounds: int = 5,
                      token_ids: list[list[int]] | None = None) -> dict[str, float]:
    """Time `selector.choose` (features included) over every text, `rounds` times; ids default to UTF-8 bytes
    (about 3-4x more ids than a BPE tokenizer gives, so the repetition features are timed pessimistically)."""
    ids = token_ids or [list(t.encode("utf-8")) for t in texts]
    requests = [RequestInput(i, t, 128) for i, t in zip(ids, texts)]
    for r in requests[:20]:                                   # warm caches and lazy imports
        selector.choose(r, pools)
    times = []
    for _ in range(rounds):
        for r in requests:
            t0 = time.perf_counter()
            selector.choose(r, pools)
            times.append(time.perf_counter() - t0)
    us = np.asarray(times) * 1e6
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "mean_us": float(us.mean()), "calls": len(us), "pools": len(pools),
            "candidates": sum(len(p.methods) for p in pools)}
