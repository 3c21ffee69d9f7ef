"""Where the CLI's clients get an API key: a file or $METASPEC_API_KEY, never the command line."""

from __future__ import annotations

import pytest

from metaspec.cli import main
from metaspec.protocol.client import read_api_key


def test_the_key_comes_from_a_file_or_the_environment(tmp_path):
    path = tmp_path / "key"
    path.write_text("file-key\n# the rest is ignored\n")
    assert read_api_key(str(path), {"METASPEC_API_KEY": "env-key"}) == "file-key"
    assert read_api_key(None, {"METASPEC_API_KEY": "env-key"}) == "env-key"
    assert read_api_key(None, {}) is None
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_api_key(str(path), {})


@pytest.mark.parametrize("argv", [
    ["generate", "--server", "127.0.0.1:1", "--api-key", "secret", "x"],
    ["bench", "serve", "--backend", "grpc", "--server", "127.0.0.1:1", "--api-key", "secret"],
])
def test_a_key_on_the_command_line_is_refused_before_any_connection(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "METASPEC_API_KEY" in err and "--api-key-file" in err and "secret" not in err


def test_a_missing_key_file_or_ca_file_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--server", "127.0.0.1:1", "--api-key-file", str(tmp_path / "nope"), "x"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["generate", "--server", "127.0.0.1:1", "--ca-cert", str(tmp_path / "ca.pem"), "x"]) == 2
    assert "ca.pem" in capsys.readouterr().err


def test_serve_binds_the_config_s_interface_and_host_opts_in_to_another(monkeypatch):
    """`metaspec serve`: loopback from the shipped config; --host moves gRPC and HTTP together."""
    import metaspec.deploy.app as app

    seen = []
    monkeypatch.setattr(app, "serve_until_interrupted", lambda cfg, opts, **kw: seen.append(opts))
    assert main(["serve"]) == 0
    assert main(["serve", "--host", "0.0.0.0"]) == 0
    assert (seen[0].ingress.host, seen[0].http_host) == ("127.0.0.1", "127.0.0.1")
    assert (seen[1].ingress.host, seen[1].http_host) == ("0.0.0.0", "0.0.0.0")
    assert seen[1].serve_env()["METASPEC_GRPC_HOST"] == "0.0.0.0"
