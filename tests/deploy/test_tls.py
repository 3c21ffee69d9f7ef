"""TLS and the bind address of the gRPC ingress (deploy/ingress.py) in a running Ray Serve app with direct ingress
(the shipped deploy/metaspec.yaml): the Router replica's own gRPC port and the head's fallback Serve proxy both speak
TLS only and listen on loopback only; a TLS client that trusts the certificate is served, a plaintext client and a
client trusting another CA are not. The certificates are made here, self-signed."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from metaspec.deploy.app import LOW_LATENCY_ENV, ServeOptions, load_serve_file, start
from metaspec.deploy.config import hash_api_key, load_app_config
from metaspec.deploy.ingress import CALLBACK, CALLBACK_ENV, IngressSpec, bind_address, binder
from metaspec.protocol.client import Client, ServiceError

from .conftest import QUICK_SHUTDOWN, stop_serve
from .test_service import SLOW_MACHINE, _free_port

KEY = "tls-test-key"
APP = "metaspec-tls"


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost (its own CA) and its key, as PEM files."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:        # the openssl CLI instead
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(private.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


def other_interface() -> str | None:
    """An address of this machine that is not loopback (None when it has none)."""
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


# ---- without Ray ----------------------------------------------------------------------------------------------

def test_bind_addresses_and_a_half_tls_config_is_refused():
    assert bind_address("127.0.0.1", 9000) == "127.0.0.1:9000"
    assert bind_address("::", "9000") == "[::]:9000"
    with pytest.raises(ValueError, match="both"):
        IngressSpec(tls_cert_file="server.crt")
    spec = IngressSpec(host="0.0.0.0", tls_cert_file="c", tls_key_file="k")
    assert spec.env()[CALLBACK_ENV] == CALLBACK and spec.env()["METASPEC_GRPC_TLS_KEY_FILE"] == "k"


def test_a_certificate_that_cannot_be_read_fails_at_start_not_plaintext(tmp_path):
    with pytest.raises(FileNotFoundError):
        binder(IngressSpec(tls_cert_file=str(tmp_path / "missing.crt"), tls_key_file=str(tmp_path / "x.key")))


def test_the_serve_file_carries_host_and_tls_to_serve_s_processes(tmp_path):
    cert, key = self_signed(tmp_path, "server")
    path = tmp_path / "serve.yaml"
    path.write_text(f"""
grpc_options: {{port: 9100}}
controller_options:
  runtime_env:
    env_vars:
      RAY_SERVE_ENABLE_DIRECT_INGRESS: "1"
      METASPEC_GRPC_HOST: 0.0.0.0
      METASPEC_GRPC_TLS_CERT_FILE: {cert}
      METASPEC_GRPC_TLS_KEY_FILE: {key}
applications: [{{name: metaspec, import_path: "metaspec.deploy.app:build_app"}}]
""")
    _, opts = load_serve_file(path)
    assert opts.ingress == IngressSpec("0.0.0.0", str(cert), str(key))
    env = opts.serve_env()
    assert env[CALLBACK_ENV] == CALLBACK and env["METASPEC_GRPC_HOST"] == "0.0.0.0"
    shipped = load_serve_file(Path(__file__).resolve().parents[2] / "deploy" / "metaspec.yaml")[1]
    assert shipped.ingress == IngressSpec()                        # loopback, no TLS: nothing to configure first
    path.write_text(path.read_text().replace("env_vars:", f"env_vars:\n      {CALLBACK_ENV}: my.middlewares"))
    with pytest.raises(ValueError, match=CALLBACK_ENV):
        load_serve_file(path)


# ---- a running app ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    return {"server": self_signed(root, "server"), "other": self_signed(root, "other")}


@pytest.fixture(scope="module")
def service(ray_local, tiny_pair, tmp_path_factory, certs):
    cfg = load_app_config({
        "pools": [{"name": "a", "target": tiny_pair.target, "drafter": "", "tables": None}],
        "router": {"outcome_dir": str(tmp_path_factory.mktemp("outcomes")), "default_max_tokens": 8,
                   "api_key_hashes": [hash_api_key(KEY)]}})
    cert, key = certs["server"]
    port, http_port = _free_port(), _free_port()
    opts = ServeOptions(grpc_port=port, http_port=http_port, app_name=APP,
                        ingress=IngressSpec("127.0.0.1", str(cert), str(key)),
                        controller_env=SLOW_MACHINE | QUICK_SHUTDOWN | LOW_LATENCY_ENV)
    try:
        start(cfg, opts)
        yield opts
    finally:
        stop_serve()


def _ready(address: str, ca: Path) -> None:
    """Wait for the app behind `address` (Serve answers UNAVAILABLE/NOT_FOUND until the app has a route)."""
    import time

    deadline = time.monotonic() + 300
    with Client(address, api_key=KEY, tls=True, ca_cert=ca.read_bytes(), timeout_s=60) as client:
        while True:
            try:
                client.health()
                return
            except ServiceError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


@pytest.mark.parametrize("which", ["router", "fallback proxy"])
def test_a_tls_client_is_served_and_plaintext_or_another_ca_is_not(service, certs, which):
    port = service.grpc_port if which == "router" else service.fallback_grpc_port
    address, ca = f"127.0.0.1:{port}", certs["server"][0]
    _ready(address, ca)
    with Client(address, api_key=KEY, tls=True, ca_cert=ca.read_bytes(), timeout_s=120) as client:
        reply = client.generate("def add(a, b):", max_tokens=4, method="ar")
        assert reply.completion_tokens == 4 and reply.pool == "a"
    with Client(address, api_key=KEY, timeout_s=20) as plain, pytest.raises(ServiceError) as err:
        plain.health()
    assert err.value.code == "UNAVAILABLE"
    with Client(address, api_key=KEY, ca_cert=certs["other"][0].read_bytes(), timeout_s=20) as wrong, \
            pytest.raises(ServiceError) as err:
        wrong.health()
    assert err.value.code == "UNAVAILABLE"
    # the same plaintext bytes a gRPC client would send: the server hangs up instead of answering them
    channel = grpc.insecure_channel(address)
    with pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=5)
    channel.close()


def test_the_ingress_listens_on_loopback_only(service, certs):
    _ready(f"127.0.0.1:{service.grpc_port}", certs["server"][0])
    if (other := other_interface()) is None:
        pytest.skip("this machine has no interface besides loopback")
    for port in (service.grpc_port, service.fallback_grpc_port):
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(5)
            s.connect((other, port))


def test_metaspec_generate_over_tls_with_the_key_from_the_environment(service, certs):
    address = f"127.0.0.1:{service.grpc_port}"
    _ready(address, certs["server"][0])
    cmd = [sys.executable, "-m", "metaspec.cli", "generate", "--server", address, "--tls", "--ca-cert",
           str(certs["server"][0]), "--method", "ar", "--max-tokens", "4", "--json", "def add(a, b):"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"METASPEC_API_KEY": KEY})
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"completion_tokens": 4' in out.stdout
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "METASPEC_API_KEY"})
    assert out.returncode == 2 and "UNAUTHENTICATED" in out.stdout
