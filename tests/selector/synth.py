"""A synthetic outcome table with a planted winner: `pld` wins when the prompt repeats itself, `sps` otherwise."""

from __future__ import annotations

import numpy as np

from metaspec.selector.features import FEATURE_VERSION, RequestInput, pool_features, request_features
from metaspec.selector.types import Outcome

HARDWARE = {"accelerator": "cpu", "mem_gb": 16.0, "rel_speed": 1.0, "cores": 2, "devices": 2}


def prompt_ids(rng: np.random.Generator, repetitive: bool, length: int) -> list[int]:
    if repetitive:   # a short motif repeated with a little noise: high n-gram self-repetition
        motif = rng.integers(0, 8000, size=int(rng.integers(4, 12)))
        ids = np.tile(motif, length // len(motif) + 1)[:length]
        flips = rng.random(length) < 0.05
        ids[flips] = rng.integers(0, 8000, size=int(flips.sum()))
        return ids.tolist()
    return rng.integers(0, 8000, size=length).tolist()


def planted_tps(method: str, repetitive: bool, rng: np.random.Generator) -> float:
    base = {"ar": 100.0, "sps": 160.0, "pld": 230.0 if repetitive else 90.0}[method]
    return base * float(rng.uniform(0.95, 1.05))


def synthetic_outcomes(n_prompts: int, seed: int = 0, methods=("ar", "sps", "pld")) -> list[Outcome]:
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_prompts):
        repetitive = bool(rng.random() < 0.5)
        ids = prompt_ids(rng, repetitive, int(rng.integers(20, 300)))
        text = " ".join(f"w{t}" for t in ids[:200])
        feats = request_features(RequestInput(ids, text, 64)) | pool_features(HARDWARE, 0.0)
        feats["feature_version"] = float(FEATURE_VERSION)
        category = "repetitive" if repetitive else "plain"
        for m in methods:
            tps = planted_tps(m, repetitive, rng)
            out.append(Outcome(request_id=f"r{p}/{m}", ts=0.0, source="collect", pool="cpu", method=m, status="OK",
                               features=feats, prompt_id=f"p{p}", category=category, completion_tokens=64,
                               wall_s=64 / tps, tokens_per_s=tps, max_tokens=64))
    return out


def planted_winner(outcome: Outcome) -> str:
    return "pld" if outcome.category == "repetitive" else "sps"


def planted_load_tps(method: str, repetitive: bool, level: int, temperature: float, rng: np.random.Generator
                     ) -> float:
    """At concurrency 1 the planted winner above; at 16 every draft costs the batch and AR wins; sampling
    halves pld's lead (its deterministic drafts are accepted less)."""
    draft_gain = {"ar": 1.0, "sps": 1.6, "pld": 2.3 if repetitive else 0.9}[method]
    if method == "pld" and temperature > 0:
        draft_gain = 1.0 + (draft_gain - 1.0) / 2
    cost = 1.0 if method == "ar" else {1: 1.0, 4: 1.25, 16: 2.6}[level]
    return 100.0 * draft_gain / cost * float(rng.uniform(0.95, 1.05))


def synthetic_load_outcomes(n_prompts: int, seed: int = 0, methods=("ar", "sps", "pld"),
                            levels=(1, 4, 16), temperatures=(0.0, 1.0)) -> list[Outcome]:
    """Every prompt at every concurrency level and temperature, with the load features collect records."""
    from metaspec.selector.features import load_features

    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_prompts):
        repetitive = bool(rng.random() < 0.5)
        ids = prompt_ids(rng, repetitive, int(rng.integers(20, 300)))
        text = " ".join(f"w{t}" for t in ids[:200])
        for level in levels:
            for t in temperatures:
                feats = (request_features(RequestInput(ids, text, 64, t)) | pool_features(
                    HARDWARE, 0.0, load_features(level - 1, 0, 16 - (level - 1), 16)))
                feats["feature_version"] = float(FEATURE_VERSION)
                for m in methods:
                    tps = planted_load_tps(m, repetitive, level, t, rng)
                    out.append(Outcome(request_id=f"r{p}/{m}/c{level}/t{t}", ts=0.0, source="collect", pool="cpu",
                                       method=m, status="OK", features=feats, prompt_id=f"p{p}",
                                       category="repetitive" if repetitive else "plain", completion_tokens=64,
                                       wall_s=64 / tps, tokens_per_s=tps, max_tokens=64, temperature=t,
                                       concurrency=level))
    return out
