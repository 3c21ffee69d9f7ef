"""Model files: round trip, and every kind of bad file refused with SelectorFileError and a clear message."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import skops.io as sio

from metaspec.selector.model import FILE_FORMAT, SelectorFileError, SelectorModel
from metaspec.selector.train import build_table, design, fit_model

from .synth import synthetic_outcomes


class Evil:
    """A type no selector file contains."""

    def __init__(self) -> None:
        self.command = "rm -rf /"


@pytest.fixture(scope="module")
def table():
    return build_table(synthetic_outcomes(30, seed=4))


@pytest.fixture(scope="module", params=["rf", "gb", "knn", "ridge"])
def saved(request, table, tmp_path_factory):
    model = fit_model(table, request.param)
    path = tmp_path_factory.mktemp("models") / f"{request.param}.skops"
    model.save(path, design(table, model.methods)[0][:16])
    return model, path


def test_round_trip_keeps_predictions_and_metadata(saved, table):
    model, path = saved
    loaded = SelectorModel.load(path)
    x = design(table, model.methods)[0]
    assert np.allclose(loaded.predict(x), model.estimator.predict(x))
    assert loaded.names == model.names and loaded.version == model.version
    assert loaded.meta["data_hash"] == table.data_hash and "sklearn" in loaded.meta["versions"]


def test_numpy_fast_path_matches_sklearn(table):
    for kind in ("rf", "gb", "knn", "ridge"):
        model = fit_model(table, kind)
        assert model._fast is not None
        x = design(table, model.methods)[0]
        assert np.allclose(model.predict(x), model.estimator.predict(x))


def _refused(path, fragment: str) -> None:
    with pytest.raises(SelectorFileError) as err:
        SelectorModel.load(path)
    assert fragment in str(err.value), str(err.value)


def test_corrupted_files_are_refused(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    (tmp_path / "cut.skops").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "cut.skops", "corrupted")
    (tmp_path / "noise.skops").write_bytes(np.random.default_rng(0).bytes(4096))
    _refused(tmp_path / "noise.skops", "corrupted")
    (tmp_path / "pickled.skops").write_bytes(pickle.dumps({"format": FILE_FORMAT}))
    _refused(tmp_path / "pickled.skops", "corrupted")
    _refused(tmp_path / "missing.skops", "does not exist")


def test_foreign_files_are_refused(tmp_path):
    sio.dump({"weights": np.zeros(3)}, tmp_path / "other.skops")
    _refused(tmp_path / "other.skops", "not a metaspec selector file")
    sio.dump({"format": FILE_FORMAT, "payload": Evil()}, tmp_path / "evil.skops")
    _refused(tmp_path / "evil.skops", "types a selector never contains")


def test_other_feature_version_or_tampered_predictions_are_refused(saved, tmp_path):
    model, path = saved
    payload = sio.load(path, trusted=sio.get_untrusted_types(file=path))
    sio.dump(payload | {"feature_version": 999}, tmp_path / "old.skops")
    _refused(tmp_path / "old.skops", "feature version 999")
    sio.dump(payload | {"probe_y": payload["probe_y"] + 1.0}, tmp_path / "drift.skops")
    _refused(tmp_path / "drift.skops", "predictions after loading differ")


def _payload(path):
    return sio.load(path, trusted=sio.get_untrusted_types(file=path))


MALFORMED = {
    "a list, not a dict": lambda p: [p],
    "no methods": lambda p: {k: v for k, v in p.items() if k != "methods"},
    "methods a string": lambda p: p | {"methods": "sps"},
    "methods of ints": lambda p: p | {"methods": [1, 2]},
    "methods empty": lambda p: p | {"methods": []},
    "methods repeated": lambda p: p | {"methods": p["methods"] + p["methods"][:1]},
    "feature names missing": lambda p: {k: v for k, v in p.items() if k != "feature_names"},
    "feature names a dict": lambda p: p | {"feature_names": {"a": 1}},
    "estimator missing": lambda p: {k: v for k, v in p.items() if k != "estimator"},
    "estimator a dict": lambda p: p | {"estimator": {"predict": 1}},
    "estimator an array": lambda p: p | {"estimator": np.zeros(3)},
    "meta a list": lambda p: p | {"meta": [1, 2]},
    "versions an int": lambda p: p | {"versions": 3},
    "probe missing": lambda p: {k: v for k, v in p.items() if k != "probe_x"},
    "probe a string": lambda p: p | {"probe_x": "rows"},
    "probe of strings": lambda p: p | {"probe_x": np.array([["a"] * p["probe_x"].shape[1]])},
    "probe 1-d": lambda p: p | {"probe_x": p["probe_x"][0]},
    "probe too narrow": lambda p: p | {"probe_x": p["probe_x"][:, :3]},
    "probe empty": lambda p: p | {"probe_x": p["probe_x"][:0], "probe_y": p["probe_y"][:0]},
    "probe_y too short": lambda p: p | {"probe_y": p["probe_y"][:1]},
    "probe non-finite": lambda p: p | {"probe_x": p["probe_x"] * np.nan},
    "format version a list": lambda p: p | {"format_version": [1]},
    "feature version a string": lambda p: p | {"feature_version": "2"},
    "hedge a list": lambda p: p | {"meta": p["meta"] | {"hedge": [0.1]}},
    "hedge margin negative": lambda p: p | {"meta": p["meta"] | {"hedge": {"margin": -0.1, "defaults": {}}}},
    "hedge margin a string": lambda p: p | {"meta": p["meta"] | {"hedge": {"margin": "0.1", "defaults": {}}}},
    "hedge defaults a list": lambda p: p | {"meta": p["meta"] | {"hedge": {"margin": 0.1, "defaults": ["ar"]}}},
    "hedge level not a number": lambda p: p | {"meta": p["meta"] | {"hedge": {"margin": 0.1,
                                                                              "defaults": {"x": "ar"}}}},
}


@pytest.mark.parametrize("shape", sorted(MALFORMED))
def test_every_malformed_shape_is_a_selector_file_error(saved, tmp_path, shape):
    _, path = saved
    bad = tmp_path / "bad.skops"
    sio.dump(MALFORMED[shape](_payload(path)), bad)
    with pytest.raises(SelectorFileError):
        SelectorModel.load(bad)


def test_an_estimator_that_fails_to_predict_is_a_selector_file_error(saved, tmp_path):
    from sklearn.linear_model import Ridge

    _, path = saved
    sio.dump(_payload(path) | {"estimator": Ridge()}, tmp_path / "unfitted.skops")   # predict raises NotFitted
    _refused(tmp_path / "unfitted.skops", "malformed selector file")
