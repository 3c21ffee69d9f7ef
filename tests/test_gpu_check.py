"""The GPU check's own code path, run on the CPU (the GPU machine is not always lent): it must pass here too."""

from __future__ import annotations

import json

from metaspec import gpu_check


def test_gpu_check_runs_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--device", "cpu", "--levels", "1,4", "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0 and report["ok"], report.get("tiny_contract")
    assert report["tiny_contract"]["mismatches"] == [] and len(report["tiny_contract"]["methods"]) >= 5
    assert [row["concurrency"] for row in report["throughput"]["levels"]] == [1, 4]
    assert report["memory"]["slots"] == 64


def test_gpu_check_says_when_the_device_is_missing(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert json.loads(capsys.readouterr().out)["available"] is False
