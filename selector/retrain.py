"""`metaspec retrain`: outcome logs → the best model kind by grouped CV → compared with the current model on
held-out prompts → written only when not worse.

The held-out prompt groups are fixed by a hash of the prompt id (share and seed in RetrainConfig) and no
written model ever trains on them, so every later retrain compares the current and the new model on prompts
neither has seen.

Score on held-out data: the routed throughput as a fraction of the oracle's on requests that every arm served
(collect runs), or, when there are too few of those (a pure service log), minus the RMSE of predicted log
tokens/s. Both models are scored on the same held-out rows, which the new model never saw, each routed as the
selector would route it: under its hedge (selector/hedge.py), which the retrain fits on the chosen kind's
out-of-fold predictions when the training prompts have enough requests that every arm served (`--no-hedge`:
none). The report gives the new model's held-out score with and without it (`unhedged_score`).

Fitted and scored only on rows the router could have chosen (`routable`, by the router's own rules): e.g. a
sampled request decoded beside others is never routed to an `alone_when_sampled` arm (sps, early_exit), nor any
request to a `second_device` arm (pearl) on a pool of one device. Those rows (from clients that named the arm)
would teach the hedge arms it cannot use and flatter the held-out score with choices the router cannot make.
`--caps-sampled-drafts` (the pools cap sampled drafts: that rule is off) keeps the first kind.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .evaluate import argmax_policy, best_fixed_arm, fit_hedge, fixed_policy, policy_metrics
from .model import SelectorFileError, SelectorModel
from .train import BASE_FEATURES, MODEL_KINDS, Table, build_table, by_request, fit_model, load_outcomes, \
    oof_predictions, predict_table

MIN_REQUESTS = 5           # complete requests needed to score by routing rather than by RMSE


@dataclass(frozen=True)
class RetrainConfig:
    kinds: tuple[str, ...] = MODEL_KINDS   # model kinds compared by grouped CV
    n_splits: int = 5                      # CV folds (grouped by prompt id)
    holdout_share: float = 0.2             # share of prompt groups held out to compare new vs current
    tolerance: float = 0.0                 # the new model may score this much below the current one
    hedge: bool = True                     # fit a hedge (selector/hedge.py): keep each level's best fixed arm
                                           # unless another is predicted more than a margin faster
    caps_sampled_drafts: bool = False      # the pools cap sampled drafts (the alone_when_sampled rule is off there):
                                           # keep the rows `routable` drops
    seed: int = 0


def routable(table: Table, caps_sampled_drafts: bool = False) -> Table:
    """The rows the router could have chosen (the rest come from clients that named the arm): each row's arm put
    to the router's own rules (`rules.allowed`) with what the row says of its pool and request: its devices, its
    batch (a level of c clients: c - 1 others running), its sampling and constraint; that the pools cap sampled
    drafts is not in the rows (`caps_sampled_drafts`). Requests count as complete without the arms dropped
    (`Table.waived`)."""
    from .rules import allowed
    from .types import PoolInfo

    devices, constrained = (table.base[:, BASE_FEATURES.index(k)] for k in ("pool_devices", "has_constraint"))
    caps = {"caps_sampled_drafts": True} if caps_sampled_drafts else {}

    def chosen(method: str, n_devices: float, level: int, has_constraint: float, greedy: bool) -> bool:
        pool = PoolInfo("pool", (method,), {"devices": float(n_devices), **caps}, batch={"load_running": level - 1.0})
        return allowed(method, pool, bool(has_constraint), sampled=not greedy)[0]

    rows = zip(table.method.tolist(), devices, table.concurrency, constrained, table.greedy)
    keep = np.asarray([chosen(*row) for row in rows], dtype=bool)
    return replace(table.subset(np.flatnonzero(keep)), waived=tuple(sorted(set(table.method[~keep].tolist()))))


def score(pred: np.ndarray, table: Table, hedge: dict | None = None) -> tuple[float, str]:
    """(higher is better, metric name) of predictions on a table, routed under `hedge` when given."""
    requests = by_request(table)
    if len(requests) >= MIN_REQUESTS:
        weights = argmax_policy(table, requests, pred, hedge)
        return policy_metrics(table, requests, weights)["oracle_frac"], "oracle_frac"
    ok = np.isfinite(pred)
    return -float(np.sqrt(np.mean((pred[ok] - np.log(table.tps[ok])) ** 2))) if ok.any() else -np.inf, "neg_rmse"


def choose_kind(table: Table, cfg: RetrainConfig) -> tuple[str, dict[str, float], np.ndarray]:
    """The model kind with the best out-of-fold score, every kind's score, and the best kind's out-of-fold
    predictions."""
    preds = {k: oof_predictions(table, k, cfg.n_splits, cfg.seed) for k in cfg.kinds}
    scores = {k: score(p, table)[0] for k, p in preds.items()}
    kind = max(scores, key=scores.get)
    return kind, scores, preds[kind]


def holdout_mask(table: Table, share: float, seed: int) -> np.ndarray:
    """[N] True for rows whose prompt group hashes into the held-out share (stable across runs and files)."""
    cut = int(share * 1000)
    return np.asarray([zlib.crc32(f"{seed}/{g}".encode()) % 1000 < cut for g in table.group], dtype=bool)


def retrain(outcome_paths: list[str | Path], current: str | Path | None, out: str | Path,
            cfg: RetrainConfig = RetrainConfig()) -> dict:
    """Fit, compare with `current` on held-out prompts, write `out` only when not worse. Returns a report."""
    t0 = time.perf_counter()
    outcomes, bad = load_outcomes(outcome_paths)
    built = build_table(outcomes)
    table = routable(built, cfg.caps_sampled_drafts)
    report = {"records": len(outcomes), "unreadable_lines": bad, "usable": len(table), "skipped": table.skipped,
              "unroutable": len(built) - len(table)}
    if len(table) < 10 or len(set(table.method.tolist())) < 2:
        return report | {"written": False, "reason": "too little data: need >= 10 usable records and >= 2 arms"}
    hold = holdout_mask(table, cfg.holdout_share, cfg.seed)
    if hold.all() or not hold.any():
        hold = np.zeros(len(table), bool)
        hold[np.unique(table.group, return_inverse=True)[1] % 5 == 0] = True
    train_t, hold_t = table.subset(np.flatnonzero(~hold)), table.subset(np.flatnonzero(hold))
    kind, cv, oof = choose_kind(train_t, cfg)
    hedge = fit_hedge(train_t, oof, cfg.n_splits) if cfg.hedge else None
    meta = {"cv_scores": cv, "holdout": {"share": cfg.holdout_share, "seed": cfg.seed},
            "trained_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} | ({"hedge": hedge} if hedge else {})
    new = fit_model(train_t, kind, cfg.seed, meta)
    new_pred = predict_table(new, hold_t)
    new_score, metric = score(new_pred, hold_t, new.hedge)
    report |= {"kind": kind, "cv_scores": cv, "metric": metric, "new_score": new_score,
               "unhedged_score": score(new_pred, hold_t)[0] if hedge else None,
               "hedge": {k: v for k, v in (hedge or {}).items() if k != "oof_oracle_frac"} or None,
               "holdout_rows": len(hold_t), **fixed_baseline(train_t, hold_t)}
    current_score, current_error = None, None
    if current and Path(current).exists():
        try:
            old = SelectorModel.load(current)
            current_score = score(predict_table(old, hold_t), hold_t, old.hedge)[0]
        except SelectorFileError as e:
            current_error = str(e)
    report |= {"current_score": current_score, "current_error": current_error}
    if current_score is not None and new_score < current_score - cfg.tolerance:
        return report | {"written": False, "reason": f"new {metric} {new_score:.4f} < current {current_score:.4f}",
                         "wall_s": round(time.perf_counter() - t0, 2)}
    new.meta |= {"holdout_score": new_score, "metric": metric, "version": model_version(new)}
    new.save(out, _probe_rows(new, table))      # atomic: a router watching `out` sees the old file or this one
    return report | {"written": True, "out": str(out), "version": new.version,
                     "wall_s": round(time.perf_counter() - t0, 2)}


def fixed_baseline(train: Table, hold: Table) -> dict:
    """The arm best on the training prompts, scored on the held-out ones as the selector is (oracle fraction);
    {} when either side has too few requests that every arm served."""
    train_req, hold_req = by_request(train), by_request(hold)
    if len(train_req) < MIN_REQUESTS or len(hold_req) < MIN_REQUESTS:
        return {}
    arm = best_fixed_arm(train, train_req)
    if arm not in next(iter(hold_req.values())):
        return {}
    return {"fixed_arm": arm, "fixed_score": policy_metrics(hold, hold_req, fixed_policy(hold_req, arm))["oracle_frac"]}


def model_version(model: SelectorModel) -> str:
    """A version unique to this write: kind, training data and time (outcomes record which one served)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}"
    return f"{model.data_version}-{stamp}"


def _probe_rows(model: SelectorModel, table: Table, n: int = 32) -> np.ndarray:
    from .train import design

    x, _ = design(table, model.methods)
    return x[np.linspace(0, len(x) - 1, min(n, len(x))).astype(int)]
