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

A hedge's cells are load levels ("4") or, finer, a level and the request's sampling ("4/greedy", "4/sampled"):
greedy and sampled requests favour different arms (n-gram drafts lose acceptance under sampling), so the fit
tries both granularities and keeps the finer one only where it routes better out of fold.

>>> hedge = {"margin": 0.1, "defaults": {"1": "ngram_store", "16": "recycling"}}
>>> choose([4.0, 4.05], ["ngram_store", "sps"], [1, 1], hedge)      # sps predicted 5% faster: not enough
0
>>> choose([4.0, 4.2], ["ngram_store", "sps"], [1, 1], hedge)       # 22% faster: sps
1
>>> default_for(hedge["defaults"], 8)                               # nearest level in log terms
'recycling'
>>> default_for({"4/greedy": "ngram_store", "4/sampled": "sps"}, 1, greedy=False)
'sps'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

MARGINS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)   # log tokens/s: +0% ... +172% predicted


SAMPLING = ("greedy", "sampled")


def cell(level: int, greedy: bool | None = None) -> str:
    """A hedge's key: the level alone, or the level and the request's sampling."""
    return str(level) if greedy is None else f"{level}/{SAMPLING[0] if greedy else SAMPLING[1]}"


def default_for(defaults: Mapping[str, str], level: int, greedy: bool | None = None) -> str | None:
    """The arm of `level` (and, where the hedge has sampling cells, of the request's sampling), or of the nearest
    level in log2 (ties to the lower); None when there are none."""
    want = None if greedy is None else cell(level, greedy).partition("/")[2]
    cells = {k.partition("/")[0]: v for k, v in defaults.items() if k.partition("/")[2] == want} if want else {}
    if not cells:
        cells = {k: v for k, v in defaults.items() if "/" not in k}
    if not cells:
        return None
    if str(level) in cells:
        return cells[str(level)]
    near = min(cells, key=lambda lv: (abs(math.log2(int(lv)) - math.log2(max(level, 1))), int(lv)))
    return cells[near]


def choose(pred: Sequence[float], methods: Sequence[str], levels: Sequence[int], hedge: Mapping | None,
           greedy: bool | None = None) -> int:
    """Index of the candidate to run: the argmax of `pred` (log tokens/s), unless a candidate running its cell's
    default arm is predicted within `hedge["margin"]` of it (then the best such candidate). `levels[i]`: the load
    level of candidate i's pool; `greedy`: the request's sampling (for a hedge with sampling cells)."""
    best = max(range(len(pred)), key=lambda i: pred[i])
    if not hedge:
        return best
    defaults = hedge.get("defaults", {})
    kept = [i for i in range(len(pred)) if methods[i] == default_for(defaults, levels[i], greedy)]
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
    for key, arm in hedge.get("defaults", {}).items():
        level, _, sampling = key.partition("/") if isinstance(key, str) else ("", "", "")
        if not (level.isdigit() and int(level) >= 1 and sampling in ("", *SAMPLING) and (sampling or "/" not in key)
                and isinstance(arm, str)):
            return (f"hedge defaults map cells (\"1\", \"4\", \"4/greedy\", \"4/sampled\", ...) to arm names, "
                    f"got {key!r}: {arm!r}")
    return None
