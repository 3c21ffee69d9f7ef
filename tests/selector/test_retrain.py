"""`metaspec retrain`: writes a model when there is none, keeps the current one when the new one is worse."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from metaspec.cli import main
from metaspec.selector.model import SelectorModel
from metaspec.selector.retrain import RetrainConfig, holdout_mask, retrain
from metaspec.selector.train import build_table

from .synth import synthetic_outcomes

CFG = RetrainConfig(kinds=("rf", "ridge"), n_splits=3)


def _write(path, outcomes) -> str:
    path.write_text("".join(o.to_json() + "\n" for o in outcomes))
    return str(path)


def _inverted_outside_holdout(outcomes):
    """Swap pld's and sps's speeds on every prompt outside the held-out groups: a model fit there learns the
    opposite rule, while the held-out prompts keep the true one."""
    table = build_table(outcomes)
    hold = {g for g, h in zip(table.group, holdout_mask(table, CFG.holdout_share, CFG.seed)) if h}
    speed = {(o.prompt_id, o.method): o.tokens_per_s for o in outcomes}
    swap = {"pld": "sps", "sps": "pld"}
    return [o if o.prompt_id in hold or o.method not in swap else
            dataclasses.replace(o, tokens_per_s=speed[(o.prompt_id, swap[o.method])]) for o in outcomes]


def test_writes_when_no_current_and_refuses_a_worse_model(tmp_path):
    good = _write(tmp_path / "good.jsonl", synthetic_outcomes(100, seed=5))
    report = retrain([good], None, tmp_path / "current.skops", CFG)
    assert report["written"] and report["new_score"] > 0.95, report
    current_bytes = (tmp_path / "current.skops").read_bytes()

    bad = _write(tmp_path / "bad.jsonl", _inverted_outside_holdout(synthetic_outcomes(100, seed=5)))
    report = retrain([bad], tmp_path / "current.skops", tmp_path / "current.skops", CFG)
    assert not report["written"] and report["new_score"] < report["current_score"], report
    assert (tmp_path / "current.skops").read_bytes() == current_bytes    # the current file was not touched

    # Through the CLI: refused → exit code 3 and no file; the same data with more prompts → written.
    rc = main(["retrain", "--outcomes", bad, "--current", str(tmp_path / "current.skops"),
               "--out", str(tmp_path / "new.skops"), "--kinds", "rf", "--folds", "3"])
    assert rc == 3 and not (tmp_path / "new.skops").exists()
    more = _write(tmp_path / "more.jsonl", synthetic_outcomes(60, seed=6))
    rc = main(["retrain", "--outcomes", good, more, "--current", str(tmp_path / "current.skops"),
               "--out", str(tmp_path / "new.skops"), "--kinds", "rf", "--folds", "3"])
    assert rc == 0 and SelectorModel.load(tmp_path / "new.skops").meta["n_records"] > 0


def test_unusable_current_is_replaced_and_reported(tmp_path):
    data = _write(tmp_path / "o.jsonl", synthetic_outcomes(40, seed=7))
    (tmp_path / "current.skops").write_bytes(b"garbage")
    report = retrain([tmp_path], tmp_path / "current.skops", tmp_path / "out.skops", CFG)
    assert report["written"] and "corrupted" in report["current_error"]
    assert report["usable"] == 120 and data


def test_service_log_without_complete_requests_scores_by_rmse(tmp_path):
    outcomes = synthetic_outcomes(60, seed=8)
    one_arm_each = [o for i, o in enumerate(outcomes) if i % 3 == (i // 3) % 3]   # one arm per prompt
    path = tmp_path / "service.jsonl"
    path.write_text("".join(o.to_json() + "\n" for o in one_arm_each) + "not json\n")
    report = retrain([path], None, tmp_path / "m.skops", CFG)
    assert report["metric"] == "neg_rmse" and report["written"] and report["unreadable_lines"] == 1
    assert np.isfinite(report["new_score"])
    json.dumps(report)


def test_the_report_scores_the_best_fixed_arm_on_the_same_held_out_prompts(tmp_path):
    from .synth import synthetic_load_outcomes

    data = _write(tmp_path / "load.jsonl", synthetic_load_outcomes(30, seed=3))
    report = retrain([data], None, tmp_path / "out.skops", CFG)
    assert report["written"] and report["fixed_arm"] in ("cpu/ar", "cpu/sps", "cpu/pld")
    assert 0 < report["fixed_score"] < report["new_score"] <= 1.0, report


def test_a_knn_over_repeated_requests_predicts_their_mean_and_reloads(tmp_path):
    """The service log holds the same request on the same arm many times, each with its own measured speed. k-NN
    merges such rows (their mean speed) before it fits: with distance weights the duplicates of a queried point
    sat at float-noise distances, and a retrained knn file failed its own load check in the router (the loop's
    file: predictions 0.18 apart in log tokens/s with 1 BLAS thread against 2)."""
    outcomes = synthetic_outcomes(12, seed=3)
    again = [dataclasses.replace(o, tokens_per_s=o.tokens_per_s * f) for o in outcomes for f in (0.5, 2.0)]
    table = build_table(outcomes + again)
    from metaspec.selector.train import design, fit_model

    model = fit_model(table, "knn")
    x, _ = design(table, model.methods)
    y = np.log(table.tps)
    first = {}
    for row, target in zip(map(tuple, x), y):
        first.setdefault(row, []).append(target)
    want = np.array([np.mean(first[tuple(row)]) for row in x])
    knn = model.estimator.steps[-1][1]
    assert len(knn._fit_X) == len(first) < len(x)                 # one point per distinct row
    assert np.allclose(model.predict(x), want, atol=1e-6)        # a duplicated point: its rows' mean, exactly
    path = tmp_path / "knn.skops"
    model.save(path, x[:32])
    assert np.allclose(SelectorModel.load(path).predict(x), want, atol=1e-6)
