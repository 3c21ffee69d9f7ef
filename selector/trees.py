"""Numpy evaluators for the fitted estimators the selector uses: the router scores a handful of rows per request,
where scikit-learn's per-call overhead (input validation, a joblib pass over 100+ trees, an OpenMP pool for
k-NN that stalls for milliseconds on a busy CPU) costs far more than the arithmetic.

Trees: all nodes are laid end to end; every (row, tree) pair walks one level per step, leaves loop onto
themselves, and the walk runs for the deepest tree's depth. k-NN and ridge are re-expressed from their fitted
attributes. Each result is checked against the estimator's own `predict` on random rows at compile time and
rejected (None, so sklearn's predict is used) on any mismatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def _flatten(trees: list[Any]) -> tuple[np.ndarray, ...]:
    feats, thrs, lefts, rights, values, roots, offset = [], [], [], [], [], [], 0
    for tree in trees:
        n = tree.node_count
        leaf = tree.children_left == -1
        self_idx = np.arange(n) + offset
        lefts.append(np.where(leaf, self_idx, tree.children_left + offset))
        rights.append(np.where(leaf, self_idx, tree.children_right + offset))
        feats.append(np.where(leaf, 0, tree.feature))
        thrs.append(np.where(leaf, np.inf, tree.threshold))
        values.append(tree.value[:, 0, 0])
        roots.append(offset)
        offset += n
    return (np.concatenate(feats), np.concatenate(thrs), np.concatenate(lefts), np.concatenate(rights),
            np.concatenate(values), np.asarray(roots))


def _walker(trees: list[Any]) -> Callable[[np.ndarray], np.ndarray]:
    feat, thr, left, right, value, roots = _flatten(trees)
    depth = max(int(t.max_depth) for t in trees)

    def leaf_values(rows: np.ndarray) -> np.ndarray:          # [R, F] -> [R, T]
        x = np.asarray(rows, dtype=np.float32).astype(np.float64)  # trees compare in float32, like sklearn
        node = np.broadcast_to(roots, (len(x), len(roots))).copy()  # [R, T]
        r = np.arange(len(x))[:, None]
        for _ in range(depth):
            node = np.where(x[r, feat[node]] <= thr[node], left[node], right[node])
        return value[node]

    return leaf_values


def _trees(estimator: Any, check: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
    name = type(estimator).__name__
    if name in ("RandomForestRegressor", "ExtraTreesRegressor"):
        walk, scale = _walker([t.tree_ for t in estimator.estimators_]), 1.0 / len(estimator.estimators_)
    elif name == "GradientBoostingRegressor" and estimator.estimators_.shape[1] == 1:
        walk, scale = _walker([t.tree_ for t in estimator.estimators_[:, 0]]), float(estimator.learning_rate)
    else:
        return None
    offset = float(np.median(estimator.predict(check) - scale * walk(check).sum(axis=1)))  # GB's init

    def predict(rows: np.ndarray) -> np.ndarray:
        return offset + scale * walk(rows).sum(axis=1)

    return predict


def _column_weights(columns: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    """ColumnTransformer of (StandardScaler | "passthrough") parts with transformer_weights, as numpy."""
    parts = []
    for name, step, cols in columns.transformers_:
        weight = (columns.transformer_weights or {}).get(name, 1.0)
        if isinstance(step, str) and step == "drop" or not len(cols):
            continue
        if isinstance(step, str) and step == "passthrough" or (
                type(step).__name__ == "FunctionTransformer" and step.func is None):   # fitted "passthrough"
            parts.append((np.asarray(cols), 0.0, 1.0, weight))
        elif type(step).__name__ == "StandardScaler":
            parts.append((np.asarray(cols), step.mean_, step.scale_, weight))
        else:
            return None
    return lambda x: np.hstack([(x[:, c] - m) / s * w for c, m, s, w in parts])


def _knn(estimator: Any, check: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
    steps = getattr(estimator, "steps", None)
    if not steps or len(steps) != 2 or type(steps[1][1]).__name__ != "KNeighborsRegressor":
        return None
    transform, knn = _column_weights(steps[0][1]), steps[1][1]
    if transform is None or knn.weights != "distance" or knn.effective_metric_ != "euclidean":
        return None
    train, y, k = knn._fit_X, np.asarray(knn._y, dtype=float).ravel(), min(knn.n_neighbors, len(knn._fit_X))
    train_sq = (train ** 2).sum(1)                                                  # [N]

    def predict(rows: np.ndarray) -> np.ndarray:
        q = transform(np.asarray(rows, dtype=float))
        # One matrix-vector product per row: a [R, F] x [F, N] product goes to a multi-threaded BLAS GEMM,
        # whose thread pool stalls for tens of milliseconds on a busy CPU.
        cross = np.stack([train @ row for row in q])                                # [R, N]
        d2 = (q ** 2).sum(1)[:, None] + train_sq[None] - 2.0 * cross
        d = np.sqrt(np.where(d2 < 1e-9, 0.0, d2))             # exact duplicates must stay at distance 0
        idx = np.argpartition(d, k - 1, axis=1)[:, :k]
        dk = np.take_along_axis(d, idx, 1)
        with np.errstate(divide="ignore"):
            w = np.where((dk == 0).any(1, keepdims=True), (dk == 0).astype(float), 1.0 / dk)
        return (w * y[idx]).sum(1) / w.sum(1)

    return predict


def _ridge(estimator: Any, check: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
    names = [type(s).__name__ for _, s in getattr(estimator, "steps", [])]
    if names != ["StandardScaler", "PolynomialFeatures", "Ridge"]:
        return None
    scaler, poly, ridge = (s for _, s in estimator.steps)
    powers = poly.powers_                                              # [out, in]
    if powers.max() > 1 or powers.sum(1).max() > 2:
        return None
    n_in = powers.shape[1]
    first = np.array([np.flatnonzero(p)[0] if p.any() else n_in for p in powers])   # n_in = the ones column
    second = np.array([np.flatnonzero(p)[1] if p.sum() == 2 else n_in for p in powers])
    coef, intercept = np.asarray(ridge.coef_, dtype=float).ravel(), float(np.ravel(ridge.intercept_)[0])

    def predict(rows: np.ndarray) -> np.ndarray:
        x = (np.asarray(rows, dtype=float) - scaler.mean_) / scaler.scale_
        x = np.hstack([x, np.ones((len(x), 1))])
        return (x[:, first] * x[:, second]) @ coef + intercept

    return predict


def compile_fast(estimator: Any, n_check: int = 64, seed: int = 0) -> Callable[[np.ndarray], np.ndarray] | None:
    """A numpy `predict` for the selector's estimators (forest, boosting, k-NN, ridge pipelines), else None."""
    check = np.random.default_rng(seed).normal(size=(n_check, int(estimator.n_features_in_)))
    for build in (_trees, _knn, _ridge):
        try:
            predict = build(estimator, check)
        except (AttributeError, IndexError, ValueError):
            predict = None
        if predict is not None:
            return predict if np.allclose(predict(check), estimator.predict(check), rtol=1e-6, atol=1e-6) else None
    return None
