"""`metaspec cluster up|down|status|deploy --dry-run`: the Ray commands each would run."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from metaspec.cli import main
from metaspec.cluster.launch import TLS_NAME, ClusterArgs, commands, secret_commands

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
    secrets = tmp_path / "secrets"
    subprocess.run([c.argv for c in secret_commands(secrets)][0], check=True)   # mkdir
    for c in secret_commands(secrets):
        subprocess.run(c.argv, check=True, capture_output=True)

    def up() -> list[str]:
        return [c.line() for c in commands("up", ClusterArgs(AWS), token_file=tmp_path / "auth_token",
                                           secrets_dir=secrets)]

    assert up() == ["ray get-auth-token --generate > /dev/null", f"ray up {AWS}"]   # the token is not printed
    (tmp_path / "auth_token").write_text("x")
    assert up() == [f"ray up {AWS}"]


def test_up_creates_the_missing_secrets_readable_by_the_user_only_and_prints_none(tmp_path):
    """The Redis password and a self-signed certificate (for the name `metaspec`) that the gRPC ingress serves
    and a client verifies with --ca-cert and --tls-server-name metaspec."""
    import grpc

    from metaspec.deploy.ingress import IngressSpec, binder

    root = tmp_path / "secrets"
    made = secret_commands(root)
    assert [c.argv[0] for c in made] == ["mkdir", "openssl", "chmod", "openssl", "chmod"]
    for c in made:
        out = subprocess.run(c.argv, check=True, capture_output=True, text=True)
        assert not (c.quiet and out.stdout)
    password = (root / "redis_password").read_text().strip()
    assert len(password) == 64 and all(line.argv[-1] != password for line in made)
    assert root.stat().st_mode & 0o077 == 0
    for f in (root / "redis_password", root / "server.key"):
        assert f.stat().st_mode & 0o077 == 0, f
    assert secret_commands(root) == []                      # nothing is replaced once there

    crt, key = root / "server.crt", root / "server.key"
    server = grpc.server(ThreadPoolExecutor(1))
    port = binder(IngressSpec("127.0.0.1", str(crt), str(key)))(server, "[::]:0")
    server.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=crt.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                 options=[("grpc.ssl_target_name_override", TLS_NAME)]) as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel, pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=3)    # 127.0.0.1 is not the certificate's name
    finally:
        server.stop(0)


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
