"""`metaspec.bench.loop_mix` on a hand-made log whose answers are worked out in the comments."""

from __future__ import annotations

import json

import pytest

from metaspec.bench.loop_mix import analyse, format_mix, main


def rec(rid: str, wall_s: float, temperature: float = 0.0, method: str | None = None, tokens: int = 10) -> dict:
    return {"request_id": rid, "wall_s": wall_s, "temperature": temperature, "completion_tokens": tokens,
            "status": "OK", "method": method or rid.split("/")[2]}


# level 4, two requests: 0 greedy, 1 sampled. Round 0, single-arm passes: arm t (table) 1.0 / 2.0 s, arm d
# (drafter) 2.5 / 1.0 s: t is the best fixed arm (3.0 s against 3.5), the oracle takes t then d (2.0 s).
ROUND0 = [rec("r0/c4/t/0", 1.0), rec("r0/c4/t/1", 2.0, 0.7), rec("r0/c4/d/0", 2.5), rec("r0/c4/d/1", 1.0, 0.7),
          rec("r0/c4/auto/0", 9.0, method="t")]


def test_choices_and_mixing_are_read_against_round_zero():
    # round 1: auto chose t for 0 (ran 1.5 s, 1.5x its single-arm time) and d for 1 (ran 1.0 s, as alone)
    log = ROUND0 + [rec("r1/c4/auto/0", 1.5, method="t"), rec("r1/c4/auto/1", 1.0, 0.7, method="d"),
                    rec("probe/v/0", 0.1, method="t")]
    (row,) = analyse(log, sampled_arm="d")["rows"]
    assert row["best_fixed"] == "t" and row["requests"] == 2
    assert row["choices"] == pytest.approx(3.0 / 2.0) and row["oracle"] == pytest.approx(1.5)
    assert row["sampled_d_greedy_best"] == pytest.approx(1.5)
    assert row["mixing"]["greedy/t"] == {"requests": 1, "slowdown": pytest.approx(1.5)}
    assert row["mixing"]["sampled/d"]["slowdown"] == pytest.approx(1.0)
    assert "greedy/t 1.50 (1)" in format_mix({"sampled_arm": "d", **analyse(log, "d")}, min_requests=1)


def test_a_bad_choice_shows_below_one(tmp_path):
    # auto sent the greedy request to d (2.5 s at round 0) and the sampled one to t (2.0 s): 3.0 / 4.5
    log = ROUND0 + [rec("r1/c4/auto/0", 2.0, method="d"), rec("r1/c4/auto/1", 3.0, 0.7, method="t")]
    folder = tmp_path / "outcomes"
    folder.mkdir()
    (folder / "o.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    out = tmp_path / "mix.json"
    assert main([str(folder), "--sampled-arm", "d", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["choices"] == pytest.approx(3.0 / 4.5)
    assert main([str(tmp_path / "empty")]) == 1     # no rounds: said, exit 1
