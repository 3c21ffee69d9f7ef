"""The selector that follows its file: a new valid file swaps in, a corrupted or foreign one is refused and the
current selector stays, and `metaspec retrain` writes files a watcher can only see whole."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import skops.io as sio

from metaspec.selector.live import LiveConfig, LiveSelector, signature
from metaspec.selector.model import FILE_FORMAT
from metaspec.selector.retrain import RetrainConfig, retrain
from metaspec.selector.selector import FixedSelector, SelectorConfig
from metaspec.selector.train import build_table, design, fit_model
from metaspec.selector.types import PoolInfo

from .synth import HARDWARE, synthetic_outcomes

POOLS = [PoolInfo("cpu", ("ar", "sps", "pld"), HARDWARE)]
NO_EXPLORE = SelectorConfig(epsilon=0.0)


@pytest.fixture(scope="module")
def table():
    return build_table(synthetic_outcomes(40, seed=11))


def save(table, path, version: str, kind: str = "ridge") -> None:
    model = fit_model(table, kind, meta={"version": version})
    model.save(path, design(table, model.methods)[0][:8])


def request():
    from metaspec.selector.features import RequestInput

    return RequestInput(prompt_ids=[5, 6, 7, 5, 6, 7, 5, 6, 7], prompt_text="abc abc abc", max_tokens=16)


def replace_with(path, data: bytes) -> None:
    """What an atomic writer does: the new bytes appear under the name all at once (new inode)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_a_new_file_swaps_in_and_a_bad_one_keeps_the_current_selector(table, tmp_path):
    path = tmp_path / "selector.skops"
    save(table, path, "v1")
    live = LiveSelector(LiveConfig(str(path), check_s=10.0, selector=NO_EXPLORE))
    assert live.version == "v1" and live.choose(request(), POOLS).selector_version == "v1"

    save(table, path, "v2", kind="rf")
    assert live.poll(now=0.0) is None                         # not yet: at most one look every check_s
    assert live.poll(now=1e9).result() is None                # changed → loaded in the background → no error
    assert live.version == "v2" and live.choose(request(), POOLS).selector_version == "v2"
    assert live.reloads == 1

    good = path.read_bytes()
    bad_files = {"truncated": good[: len(good) // 2], "noise": np.random.default_rng(0).bytes(2048),
                 "pickle": pickle.dumps({"format": FILE_FORMAT}), "empty": b""}
    for i, (name, data) in enumerate(bad_files.items()):
        replace_with(path, data)
        error = live.poll(now=2e9 + i * 1e9).result()
        assert error and ("corrupted" in error or "not a" in error), (name, error)
        assert live.version == "v2" and live.last_error == error, name
        assert live.choose(request(), POOLS).selector_version == "v2"
        assert live.poll(now=2.5e9 + i * 1e9) is None          # the same refused file is not tried again

    sio.dump({"weights": np.zeros(3)}, tmp_path / "foreign.skops")   # a skops file that is not a selector
    replace_with(path, (tmp_path / "foreign.skops").read_bytes())
    assert "not a metaspec selector file" in live.poll(now=9e9).result()
    assert live.version == "v2"

    save(table, path, "v3")
    assert live.poll(now=1e10).result() is None and live.version == "v3" and live.last_error is None
    assert live.reloads == 2


def test_switch_is_a_no_op_for_the_file_in_use_and_loads_another(table, tmp_path):
    first, second = tmp_path / "a.skops", tmp_path / "b.skops"
    save(table, first, "a")
    save(table, second, "b")
    cfg = LiveConfig(str(first), check_s=0.0, selector=NO_EXPLORE)
    live = LiveSelector(cfg)
    model = live.current
    assert live.switch(cfg) is None and live.current is model   # Serve's first reconfigure: nothing to do
    assert live.poll(now=1e12) is None                          # check_s = 0: the file is never watched
    assert live.switch(LiveConfig(str(second), check_s=0.0, selector=NO_EXPLORE)) is None
    assert live.version == "b"
    (tmp_path / "bad.skops").write_bytes(b"garbage")
    error = live.switch(LiveConfig(str(tmp_path / "bad.skops"), selector=NO_EXPLORE))
    assert "corrupted" in error and live.version == "b"


def test_a_missing_file_serves_the_fixed_fallback_until_it_appears(table, tmp_path):
    path = tmp_path / "later.skops"
    live = LiveSelector(LiveConfig(str(path), check_s=1.0, selector=NO_EXPLORE))
    assert isinstance(live.current, FixedSelector) and "does not exist" in live.last_error
    assert live.choose(request(), POOLS).method in ("ar", "sps", "pld")
    assert signature(path) is None
    save(table, path, "arrived")
    assert live.poll(now=1e9).result() is None and live.version == "arrived"


def test_retrain_writes_atomically_with_a_new_version_each_time(tmp_path):
    data = tmp_path / "outcomes.jsonl"
    data.write_text("".join(o.to_json() + "\n" for o in synthetic_outcomes(40, seed=12)))
    out = tmp_path / "selector.skops"
    cfg = RetrainConfig(kinds=("ridge",), n_splits=3)
    first = retrain([data], None, out, cfg)
    live = LiveSelector(LiveConfig(str(out), check_s=1.0, selector=NO_EXPLORE))
    assert live.version == first["version"] and first["version"].startswith("ridge-")
    second = retrain([data], out, out, cfg)                      # same data, same score: not worse → written
    assert second["written"] and second["version"] != first["version"]
    assert live.poll(now=1e9).result() is None and live.version == second["version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outcomes.jsonl", "selector.skops"]   # no temp left


def test_a_file_that_breaks_loading_in_any_way_is_refused_once_until_it_changes(table, tmp_path, monkeypatch):
    from metaspec.selector import model as model_module

    path = tmp_path / "selector.skops"
    save(table, path, "v1")
    live = LiveSelector(LiveConfig(str(path), check_s=1.0, selector=NO_EXPLORE))
    calls = []

    def broken(cls, p):
        calls.append(p)
        raise RuntimeError("not a SelectorFileError")

    monkeypatch.setattr(model_module.SelectorModel, "load", classmethod(broken))
    replace_with(path, b"PK\x03\x04 something new")
    assert live.poll(now=1e9).result() is not None           # refused, not raised
    assert live.version == "v1" and "RuntimeError" in live.last_error and len(calls) == 1
    for t in range(2, 6):                                   # unchanged: never tried again
        assert live.poll(now=1e9 * t) is None
    assert len(calls) == 1
    replace_with(path, b"PK\x03\x04 changed again")
    assert live.poll(now=1e10).result() is not None and len(calls) == 2
