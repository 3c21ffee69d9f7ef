"""`metaspec cluster up|down|status|deploy --dry-run`: the Ray commands each would run."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaspec.cli import main
from metaspec.cluster.launch import ClusterArgs, commands

REPO = Path(__file__).resolve().parents[2]
AWS = str(REPO / "cluster" / "aws.yaml")
SERVE = str(REPO / "cluster" / "serve.yaml")


def dry_run(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main(["cluster", *argv, "--dry-run"])
    return code, capsys.readouterr().out.splitlines()


@pytest.fixture
def in_checkout(monkeypatch):
    monkeypatch.chdir(REPO)


def test_up_runs_ray_up_on_the_yaml(capsys, in_checkout):
    code, lines = dry_run(capsys, "up", AWS, "--yes")
    assert code == 0 and lines[-1] == f"ray up {AWS} --yes"


def test_up_first_creates_the_auth_token_when_there_is_none(tmp_path):
    missing = [c.line() for c in commands("up", ClusterArgs(AWS), token_file=tmp_path / "auth_token")]
    assert missing == ["ray get-auth-token --generate > /dev/null", f"ray up {AWS}"]   # the token is not printed
    (tmp_path / "auth_token").write_text("x")
    assert [c.line() for c in commands("up", ClusterArgs(AWS), token_file=tmp_path / "auth_token")] == [f"ray up {AWS}"]


def test_up_outside_the_checkout_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["cluster", "up", AWS, "--dry-run"]) == 2
    assert "repository root" in capsys.readouterr().err


def test_down_and_status(capsys):
    assert dry_run(capsys, "down", AWS, "--yes") == (0, [f"ray down {AWS} --yes"])
    assert dry_run(capsys, "status", AWS) == (0, [f"ray exec {AWS} 'ray status && serve status'"])


def test_deploy_runs_serve_deploy_on_the_head_or_against_an_address(capsys):
    code, lines = dry_run(capsys, "deploy", AWS, "--serve-config", SERVE)
    assert code == 0 and lines == [f"ray rsync-up {AWS} {SERVE} '~/metaspec-serve.yaml'",
                                   f"ray exec {AWS} 'serve deploy ~/metaspec-serve.yaml'"]
    code, lines = dry_run(capsys, "deploy", "--serve-config", SERVE, "--address", "http://10.0.0.5:8265")
    assert code == 0 and lines == [f"serve deploy {SERVE} --address http://10.0.0.5:8265"]


def test_the_shipped_yamls_are_the_defaults(capsys):
    code, lines = dry_run(capsys, "status")
    assert code == 0 and lines == [f"ray exec {AWS} 'ray status && serve status'"]


def test_a_missing_cluster_yaml_is_an_error(capsys, in_checkout, tmp_path):
    assert main(["cluster", "up", str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert "error" in capsys.readouterr().err
