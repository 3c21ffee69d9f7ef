"""Outcome logs → a table → candidate regressors compared by cross-validation on prompt groups → a model file.

A "request" is a prompt with its sampling settings and load (prompt_id, temperature, max_tokens, constraint,
concurrency level); each row is one (pool, method) that served it. Selection quality is measured on requests that
were served by every arm being compared (collect runs give that; the service's log rarely does), always
out-of-fold with GroupKFold on prompt ids, so no prompt is in both a training and a test fold.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .features import FEATURE_VERSION, POOL_FEATURES, REQUEST_FEATURES, upgrade
from .model import SelectorModel, feature_names
from .rules import DEFAULT_ARMS
from .types import Outcome

BASE_FEATURES = (*REQUEST_FEATURES, *POOL_FEATURES)
MODEL_KINDS = ("rf", "gb", "knn", "ridge")


def load_outcomes(paths: Iterable[str | Path]) -> tuple[list[Outcome], int]:
    """Outcome records from JSONL files and folders of them (recursively); also the count of unreadable lines."""
    records, bad = [], 0
    for path in map(Path, paths):
        files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            with open(file, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        records.append(Outcome.from_json(line))
                    except (ValueError, TypeError, KeyError):
                        bad += 1
    return records, bad


@dataclass(frozen=True)
class Table:
    base: np.ndarray           # [N, R+P] request + pool features
    method: np.ndarray         # [N] method name
    arm: np.ndarray            # [N] "pool/method"
    tps: np.ndarray            # [N] tokens/s
    tokens: np.ndarray         # [N] completion tokens
    wall_s: np.ndarray         # [N] request wall time
    key: np.ndarray            # [N] request id (prompt + sampling settings)
    group: np.ndarray          # [N] prompt id: the unit no train/test split may cut
    category: np.ndarray       # [N] dataset category ("" when unknown)
    concurrency: np.ndarray    # [N] requests decoding together: collect's level, else 1 + the load it was chosen at
    temperature: np.ndarray    # [N] sampling temperature
    data_hash: str             # sha256 of the records used
    skipped: int               # records left out (failed, other feature version, missing features)
    waived: tuple[str, ...] = ()   # methods a request need not have served to count as complete: where the
                                   # router cannot choose them, their rows are dropped (`retrain.routable`)

    def __len__(self) -> int:
        return len(self.tps)

    @property
    def greedy(self) -> np.ndarray:
        """[N] True where the request decoded greedily (temperature 0)."""
        return self.temperature == 0

    @property
    def methods(self) -> list[str]:
        seen = sorted(set(self.method.tolist()))
        return sorted(seen, key=lambda m: m != "ar")    # "ar" first, then alphabetical

    def subset(self, idx: np.ndarray) -> "Table":
        cut = {f: getattr(self, f)[idx] for f in ("base", "method", "arm", "tps", "tokens", "wall_s", "key", "group",
                                                  "category", "concurrency", "temperature")}
        return Table(**cut, data_hash=self.data_hash, skipped=self.skipped, waived=self.waived)


def load_level(others: float) -> int:
    """The batch a request joined (1 + `others` running and waiting) at the nearest power of two (in log terms):
    a closed loop of 16 clients on 16 slots shows 14 or 15 others.

    >>> [load_level(n) for n in (0, 1, 2, 3, 4, 10, 14, 15, 40)]
    [1, 2, 4, 4, 4, 8, 16, 16, 32]
    """
    return 1 << round(math.log2(max(1.0, 1.0 + others)))


def concurrency_of(o: Outcome, features: dict[str, float]) -> int:
    """Collect's concurrency level, else `load_level` of the load it was chosen at: a service's log has no
    levels, and the same prompt served under two arms at one client load sees 2 or 3 batch-mates by chance; one
    bucket makes it one request of the table (`key`), so the arms compare on it."""
    return o.concurrency or load_level(features.get("load_running", 0.0) + features.get("load_waiting", 0.0))


def _peers_drafts(o: Outcome) -> str | None:
    """The `drafts` kind of a collect record's batch-mates (collect runs one arm a batch: the record's own);
    None for any other record, whose batch-mates the log does not say."""
    if o.source != "collect" or o.features.get("feature_version") == FEATURE_VERSION:
        return None
    spec = DEFAULT_ARMS.get(o.method)
    return spec.drafts if spec is not None else None


def build_table(outcomes: list[Outcome]) -> Table:
    """Usable records only: status OK, tokens/s > 0, features of this FEATURE_VERSION (or one `upgrade` brings to
    it: a version-2 service record cannot be) with every key present."""
    rows, used, conc, skipped = [], [], [], 0
    for o in outcomes:
        f = upgrade(o.features, _peers_drafts(o))
        if o.status != "OK" or o.tokens_per_s <= 0 or f is None or any(k not in f for k in BASE_FEATURES):
            skipped += 1
            continue
        used.append(o)
        rows.append([float(f[k]) for k in BASE_FEATURES])
        conc.append(concurrency_of(o, f))
    digest = hashlib.sha256(json.dumps(sorted([o.request_id, o.pool, o.method, o.tokens_per_s, o.wall_s, r]
                                              for o, r in zip(used, rows))).encode()).hexdigest()
    return Table(
        base=np.asarray(rows, dtype=float).reshape(len(used), len(BASE_FEATURES)),
        method=np.asarray([o.method for o in used], dtype=object),
        arm=np.asarray([f"{o.pool}/{o.method}" for o in used], dtype=object),
        tps=np.asarray([o.tokens_per_s for o in used], dtype=float),
        tokens=np.asarray([max(o.completion_tokens, 1) for o in used], dtype=float),
        wall_s=np.asarray([o.wall_s if o.wall_s > 0 else max(o.completion_tokens, 1) / o.tokens_per_s
                           for o in used], dtype=float),
        key=np.asarray([f"{o.prompt_id or o.request_id}|{o.temperature}|{o.max_tokens}|{o.has_constraint}|c{c}"
                        for o, c in zip(used, conc)], dtype=object),
        group=np.asarray([o.prompt_id or o.request_id for o in used], dtype=object),
        category=np.asarray([o.category or "" for o in used], dtype=object),
        concurrency=np.asarray(conc, dtype=int),
        temperature=np.asarray([o.temperature for o in used], dtype=float),
        data_hash=digest, skipped=skipped)


def design(table: Table, methods: list[str], extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[N, F] model input for `methods`' column layout, and a [N] mask of rows whose method the layout knows.
    `extra` [N, E] columns (an ablation's features) go between the base features and the method columns."""
    onehot = np.zeros((len(table), len(methods)))
    col = {m: i for i, m in enumerate(methods)}
    known = np.asarray([m in col for m in table.method], dtype=bool)
    for i, m in enumerate(table.method):
        if m in col:
            onehot[i, col[m]] = 1.0
    parts = [table.base] + ([extra] if extra is not None else []) + [onehot]
    return np.hstack(parts), known


def make_estimator(kind: str, n_methods: int, seed: int = 0, n_base: int = len(BASE_FEATURES)) -> Any:
    """A fresh, unfitted regressor of log tokens/s."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from sklearn.linear_model import Ridge
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    if kind == "rf":
        return RandomForestRegressor(n_estimators=100, min_samples_leaf=3, max_features=0.5, max_samples=0.5,
                                     n_jobs=1, random_state=seed)
    if kind == "gb":
        return GradientBoostingRegressor(n_estimators=150, max_depth=4, learning_rate=0.1, subsample=0.5,
                                         min_samples_leaf=3, random_state=seed)
    if kind == "knn":
        # Method columns weigh 10x a standardised feature, so neighbours are runs of the same arm.
        columns = ColumnTransformer([("feats", StandardScaler(), list(range(n_base))),
                                     ("methods", "passthrough", list(range(n_base, n_base + n_methods)))],
                                    transformer_weights={"feats": 1.0, "methods": 10.0})
        return make_pipeline(columns, KNeighborsRegressor(n_neighbors=8, weights="distance"))
    if kind == "ridge":
        # Pairwise products give the linear model method x feature interactions.
        return make_pipeline(StandardScaler(), PolynomialFeatures(2, interaction_only=True, include_bias=False),
                             Ridge(alpha=10.0))
    raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")


def fit_estimator(estimator, kind: str, x: np.ndarray, y: np.ndarray):
    """Fit; k-NN first merges rows with identical features into one with their mean target. The service log holds
    the same request on the same arm many times: with distance weights, duplicates of a queried point sit at
    distances that are float noise (1e-8 or 0, depending on the BLAS's threads), so their weights, and the
    prediction, changed from one process to the next (a router refused a retrained knn file for it)."""
    if kind == "knn":
        x, inverse = np.unique(x, axis=0, return_inverse=True)
        inverse = inverse.ravel()
        y = np.bincount(inverse, weights=y) / np.bincount(inverse)
    return estimator.fit(x, y)


def fit_model(table: Table, kind: str, seed: int = 0, meta: dict | None = None) -> SelectorModel:
    methods = table.methods
    x, _ = design(table, methods)
    estimator = fit_estimator(make_estimator(kind, len(methods), seed), kind, x, np.log(table.tps))
    info = {"kind": kind, "data_hash": table.data_hash, "n_records": len(table), "feature_version": FEATURE_VERSION,
            "feature_names": feature_names(methods)} | (meta or {})
    return SelectorModel(estimator, methods, info)


def predict_table(model: SelectorModel, table: Table) -> np.ndarray:
    """[N] predicted log tokens/s; -inf for rows whose method the model never saw (it cannot choose them)."""
    x, known = design(table, model.methods)
    out = np.full(len(table), -np.inf)
    if known.any():
        out[known] = model.predict(x[known])
    return out


def oof_predictions(table: Table, kind: str, n_splits: int = 5, seed: int = 0,
                    extra: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold predicted log tokens/s, folds grouped by prompt id."""
    from sklearn.model_selection import GroupKFold

    methods = table.methods
    x, _ = design(table, methods, extra)
    n_base = len(BASE_FEATURES) + (extra.shape[1] if extra is not None else 0)
    y = np.log(table.tps)
    pred = np.zeros(len(table))
    n_groups = len(set(table.group.tolist()))
    for train, test in GroupKFold(n_splits=min(n_splits, n_groups)).split(x, y, table.group):
        est = fit_estimator(make_estimator(kind, len(methods), seed, n_base), kind, x[train], y[train])
        pred[test] = est.predict(x[test])
    return pred


def by_request(table: Table, arms: list[str] | None = None) -> dict[str, dict[str, list[int]]]:
    """key → arm → row indices, for requests served by every arm in `arms` (default: every arm in the table) but
    the table's `waived` methods."""
    arms = arms or sorted(set(table.arm.tolist()))
    grouped: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (k, a) in enumerate(zip(table.key, table.arm)):
        grouped[k][a].append(i)
    return {k: dict(v) for k, v in grouped.items() if all(a in v or a.rpartition("/")[2] in table.waived
                                                          for a in arms)}
