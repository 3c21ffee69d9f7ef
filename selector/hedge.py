"""Leave a level's best fixed arm only for a clear predicted gain: the learnt selector's guard against its own noise.

A regressor of log tokens/s routes each request to the argmax of its predictions. Where the arms are within the
predictions' error of each other, that argmax is a coin toss between them, and a toss that often lands on a worse
arm than the one that is best on average at that load: the retraining loop measured auto at 0.83-0.87x the best
fixed arm at single levels (docs/benchmarks.md). So `metaspec retrain` fits a hedge beside the model: per level
(requests decoded together, `train.load_level`) the arm best on its training requests, and a margin in log
tokens/s. The selector keeps the level's arm unless another is predicted more than the margin faster. Margin 0 is
the plain argmax; the largest grid value (e^1 = 2.7x) is, in practice, the best fixed arm per level.

The margin is chosen on out-of-fold predictions of the training prompts (the routed throughput as a fraction of
the oracle's, each fold routed with the per-level arms of the other folds; ties to the smaller margin), and is
used only where it gains `evaluate.HEDGE_MIN_GAIN` over the plain argmax: margin 0 otherwise. On the retraining
loop's logs (2026-12-03) the out-of-fold curve was flat within 1.2% and the held-out prompts disagreed with its
best margin (0.78 vs 0.82 unhedged), so there it stays 0; it exists for a model that is clearly worse than the
fixed arms (a noise model: tests/selector/test_hedge.py) and for logs where that is shown.

>>> hedge = {"margin": 0.1, "defaults": {"1": "ngram_store", "16": "recycling"}}
>>> choose([4.0, 4.05], ["ngram_store", "sps"], [1, 1], hedge)      # sps predicted 5% faster: not enough
0
>>> choose([4.0, 4.2], ["ngram_store", "sps"], [1, 1], hedge)       # 22% faster: sps
1
>>> default_for(hedge["defaults"], 8)                               # nearest level in log terms
'recycling'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

MARGINS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)   # log tokens/s: +0% ... +172% predicted


def default_for(defaults: Mapping[str, str], level: int) -> str | None:
    """The arm of `level`, or of the nearest level in log2 (ties to the lower); None when there are none."""
    if not defaults:
        return None
    if str(level) in defaults:
        return defaults[str(level)]
    near = min(defaults, key=lambda lv: (abs(math.log2(int(lv)) - math.log2(max(level, 1))), int(lv)))
    return defaults[near]


def choose(pred: Sequence[float], methods: Sequence[str], levels: Sequence[int], hedge: Mapping | None) -> int:
    """Index of the candidate to run: the argmax of `pred` (log tokens/s), unless a candidate running its level's
    default arm is predicted within `hedge["margin"]` of it (then the best such candidate). `levels[i]`: the load
    level of candidate i's pool."""
    best = max(range(len(pred)), key=lambda i: pred[i])
    if not hedge:
        return best
    kept = [i for i in range(len(pred)) if methods[i] == default_for(hedge.get("defaults", {}), levels[i])]
    if not kept:
        return best
    keep = max(kept, key=lambda i: pred[i])
    return keep if pred[best] - pred[keep] <= float(hedge.get("margin", 0.0)) else best


def check(hedge: object) -> str | None:
    """Why a model file's hedge cannot be used (None when it can): read from a file, it is checked, not trusted."""
    if hedge is None:
        return None
    if not isinstance(hedge, Mapping) or not isinstance(hedge.get("defaults", {}), Mapping):
        return "hedge must be a mapping with a mapping of defaults"
    margin = hedge.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < math.inf:
        return f"hedge margin must be a finite number >= 0, got {margin!r}"
    for level, arm in hedge.get("defaults", {}).items():
        if not (isinstance(level, str) and level.isdigit() and int(level) >= 1 and isinstance(arm, str)):
            return f"hedge defaults map levels (\"1\", \"4\", ...) to arm names, got {level!r}: {arm!r}"
    return None
