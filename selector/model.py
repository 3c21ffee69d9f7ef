"""The selector's model file: one scikit-learn regressor of log tokens/s over (request, pool, method) features.

One regressor for every arm, with the method as a one-hot input, rather than one regressor per arm: the part of
speed that every arm shares (prompt length → prefill cost, hardware speed, load) is learnt once from all rows,
arms that the online log covers thinly (explored a few percent of the time) borrow it, and trees still split on
the method wherever an arm responds differently. The target is log tokens/s so errors are relative and a fast
pool does not drown a slow one.

The file is a skops archive (no pickle: only an explicit list of types is ever constructed) holding the
estimator, feature names, FEATURE_VERSION, library versions, the training data hash, and a probe batch with the
predictions made at save time: a file whose predictions differ after loading is refused. Its meta may carry a
`hedge` (selector/hedge.py: when the selector keeps a level's best fixed arm over the argmax), checked on load.

>>> model = SelectorModel.load("selector/default_model.skops")      # doctest: +SKIP
>>> model.predict(model.rows(request_feats, [(pool_feats, "sps")]))  # log tokens/s  # doctest: +SKIP
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .features import FEATURE_VERSION, POOL_FEATURES, REQUEST_FEATURES
from .hedge import check as check_hedge
from .trees import compile_fast

FILE_FORMAT = "metaspec-selector"
FILE_FORMAT_VERSION = 1
# Types skops does not trust by default that our estimators contain; nothing else is ever loaded.
TRUSTED_TYPES = ["sklearn.tree._tree.Tree", "sklearn.neighbors._kd_tree.KDTree",
                 "sklearn.metrics._dist_metrics.EuclideanDistance64"]


class SelectorFileError(Exception):
    """A selector file that cannot be trusted or used: corrupted, foreign, from another feature version..."""


def feature_names(methods: list[str]) -> list[str]:
    """Column order of a model's input: request features, pool features, then one column per method."""
    return [*REQUEST_FEATURES, *POOL_FEATURES, *(f"method={m}" for m in methods)]


def library_versions() -> dict[str, str]:
    import sklearn
    import skops

    return {"python": platform.python_version(), "sklearn": sklearn.__version__, "numpy": np.__version__,
            "skops": skops.__version__}


class SelectorModel:
    """A fitted estimator plus everything needed to feed it and to trust it."""

    def __init__(self, estimator: Any, methods: list[str], meta: Mapping[str, Any] | None = None) -> None:
        self.estimator = estimator
        self.methods = list(methods)
        self.names = feature_names(self.methods)
        self.meta = dict(meta or {})
        self._method_col = {m: len(REQUEST_FEATURES) + len(POOL_FEATURES) + i for i, m in enumerate(self.methods)}
        self._fast = compile_fast(estimator)   # None: use the estimator's own predict

    @property
    def data_version(self) -> str:
        """Estimator kind and training data: `<kind>-<data hash>`."""
        return f"{self.meta.get('kind', 'model')}-{str(self.meta.get('data_hash', ''))[:8]}"

    @property
    def hedge(self) -> dict | None:
        """How the selector routes on this model's predictions (selector/hedge.py); None: the plain argmax."""
        return self.meta.get("hedge") or None

    @property
    def version(self) -> str:
        """What outcomes record as `selector_version`: the file's own version (set by retrain), else kind + data."""
        return str(self.meta.get("version") or self.data_version)

    def rows(self, request: Mapping[str, float], candidates: list[tuple[Mapping[str, float], str]]) -> np.ndarray:
        """[C, F] input rows for one request on each (pool features, method) candidate; the method must be known."""
        head = [request[k] for k in REQUEST_FEATURES]
        out = np.zeros((len(candidates), len(self.names)))
        for i, (pool, method) in enumerate(candidates):
            out[i, : len(head)] = head
            out[i, len(head): len(head) + len(POOL_FEATURES)] = [pool[k] for k in POOL_FEATURES]
            out[i, self._method_col[method]] = 1.0
        return out

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """[C] predicted log tokens/s."""
        if self._fast is not None:
            return self._fast(rows)
        return np.asarray(self.estimator.predict(rows), dtype=float)

    def save(self, path: str | Path, probe: np.ndarray) -> None:
        """Write the model file; `probe` [P, F] rows are stored with their predictions to verify loads."""
        import skops.io as sio

        payload = {"format": FILE_FORMAT, "format_version": FILE_FORMAT_VERSION,
                   "feature_version": FEATURE_VERSION, "feature_names": list(self.names),
                   "methods": list(self.methods), "estimator": self.estimator, "meta": _plain(self.meta),
                   "versions": library_versions(), "probe_x": np.asarray(probe, dtype=float),
                   "probe_y": np.asarray(self.estimator.predict(probe), dtype=float)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")   # same directory: the rename stays atomic
        try:
            sio.dump(payload, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())             # the bytes are on disk before the name points at them
            os.replace(tmp, path)                # readers (a watching router) see the old file or the new one
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)                     # and the rename itself survives a crash
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: str | Path) -> "SelectorModel":
        """Load and verify a model file; raise SelectorFileError with the reason when it cannot be trusted.

        Every shape a file can hold is checked before it is used (a dict with the marker, each field of the
        expected type and size, an estimator with `predict`); whatever else goes wrong while building or
        probing the model is a SelectorFileError too, never another exception.
        """
        payload = _read(Path(path))
        _check_payload(payload, path)
        try:
            model = cls(payload["estimator"], list(payload["methods"]), payload.get("meta"))
            if list(payload["feature_names"]) != model.names:
                raise SelectorFileError(f"{path}: its feature names differ from this build's")
            if why := check_hedge(model.meta.get("hedge")):
                raise SelectorFileError(f"{path}: {why}")
            probe_x, probe_y = _probe(payload, len(model.names), path)
            got = np.asarray(model.predict(probe_x), dtype=float)
            if got.shape != probe_y.shape or not np.allclose(got, probe_y, rtol=1e-6, atol=1e-6):
                raise SelectorFileError(f"{path}: predictions after loading differ from those saved "
                                        f"(saved with {payload.get('versions')}, running {library_versions()})")
        except SelectorFileError:
            raise
        except Exception as e:  # noqa: BLE001 - a file we cannot use is refused, whatever the reason
            raise SelectorFileError(f"{path}: malformed selector file: {type(e).__name__}: {e}") from e
        model.meta["versions"] = payload.get("versions", {})
        return model


def _check_payload(payload: Any, path: str | Path) -> None:
    """The top-level shape of a selector file; raises SelectorFileError naming the first field that is wrong."""
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise SelectorFileError(f"{path} is not a metaspec selector file (format marker missing)")
    if payload.get("format_version") != FILE_FORMAT_VERSION:
        raise SelectorFileError(f"{path}: file format {payload.get('format_version')!r}, "
                                f"this build reads {FILE_FORMAT_VERSION}")
    if payload.get("feature_version") != FEATURE_VERSION:
        raise SelectorFileError(f"{path} was trained on feature version {payload.get('feature_version')!r}; "
                                f"this build computes version {FEATURE_VERSION}: retrain it")
    for name in ("methods", "feature_names"):
        value = payload.get(name)
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
            raise SelectorFileError(f"{path}: `{name}` must be a non-empty list of strings")
    if len(set(payload["methods"])) != len(payload["methods"]):
        raise SelectorFileError(f"{path}: `methods` lists a method twice")
    for name in ("meta", "versions"):
        if not isinstance(payload.get(name, {}), (dict, type(None))):
            raise SelectorFileError(f"{path}: `{name}` must be a mapping")
    if not callable(getattr(payload.get("estimator"), "predict", None)):
        raise SelectorFileError(f"{path}: `estimator` is not a fitted regressor (no predict)")


def _probe(payload: dict, width: int, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """probe_x [P, width] and probe_y [P], finite floats, at least one row."""
    x, y = payload.get("probe_x"), payload.get("probe_y")
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray) or x.dtype.kind not in "fiu" \
            or y.dtype.kind not in "fiu":
        raise SelectorFileError(f"{path}: `probe_x` and `probe_y` must be numeric arrays")
    if x.ndim != 2 or x.shape[1] != width or not 0 < len(x) <= 100_000 or y.shape != (len(x),):
        raise SelectorFileError(f"{path}: probe shapes {x.shape} / {y.shape} do not fit {width} features")
    x, y = x.astype(float), y.astype(float)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise SelectorFileError(f"{path}: the probe holds non-finite values")
    return x, y


def _read(path: Path) -> Any:
    import skops.io as sio

    if not path.is_file():
        raise SelectorFileError(f"selector file {path} does not exist")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is not ours
        raise SelectorFileError(f"{path} is corrupted or not a skops file: {type(e).__name__}: {e}") from e
    if unexpected := sorted(set(untrusted) - set(TRUSTED_TYPES)):
        raise SelectorFileError(f"{path} holds types a selector never contains, refused: {', '.join(unexpected)}")
    try:
        return sio.load(path, trusted=TRUSTED_TYPES)
    except Exception as e:  # noqa: BLE001
        raise SelectorFileError(f"{path} could not be loaded: {type(e).__name__}: {e}") from e


def _plain(value: Any) -> Any:
    """Metadata as JSON-like builtins (skops stores these without custom types)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
