"""The gRPC ingress's bind address and TLS, which Ray Serve (2.60) does not offer: its gRPC servers (each node's
proxy and, with direct ingress, each Router replica) call `ray.serve._private.default_impl.add_grpc_address`, which
binds `[::]:port` in plaintext. `configure_ingress` replaces that one function, in exactly those processes, before
their gRPC server starts: Serve calls it there as its documented HTTP-proxy callback
(RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, run by every proxy and direct-ingress replica while it sets up HTTP,
ahead of gRPC); it adds no HTTP middleware.

The settings travel the way Ray Serve's own do, as the controller's runtime_env env_vars (inherited by its proxies and
replicas); `ServeOptions.serve_env()` writes them from the YAML / `metaspec serve --host`:

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH: metaspec.deploy.ingress.configure_ingress
    METASPEC_GRPC_HOST: 127.0.0.1                          # the interface to bind; 0.0.0.0 / :: = every one
    METASPEC_GRPC_TLS_CERT_FILE: /etc/metaspec/tls/server.crt   # PEM chain; with the key: TLS only, no plaintext
    METASPEC_GRPC_TLS_KEY_FILE: /etc/metaspec/tls/server.key

A certificate or key that cannot be read fails the proxy / replica at start (Serve reports it): never a silent
fallback to plaintext. The internal Router -> worker gRPC (RAY_SERVE_USE_GRPC_BY_DEFAULT) is Ray's own and follows
Ray's RAY_USE_TLS.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "metaspec.deploy.ingress.configure_ingress"
HOST_ENV = "METASPEC_GRPC_HOST"
CERT_ENV = "METASPEC_GRPC_TLS_CERT_FILE"
KEY_ENV = "METASPEC_GRPC_TLS_KEY_FILE"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class IngressSpec:
    """Where the service's gRPC servers listen, and with which certificate."""

    host: str = LOOPBACK                  # interface to bind; "0.0.0.0" or "::" = every interface
    tls_cert_file: str | None = None      # PEM server certificate (chain); None = plaintext
    tls_key_file: str | None = None       # PEM private key of that certificate

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both a server certificate and its key (tls_cert_file, tls_key_file)")

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    def env(self) -> dict[str, str]:
        """The env vars that carry this spec to Serve's processes (see the module docstring)."""
        env = {CALLBACK_ENV: CALLBACK, HOST_ENV: self.host}
        if self.tls:
            env |= {CERT_ENV: str(self.tls_cert_file), KEY_ENV: str(self.tls_key_file)}
        return env


def spec_from_env(environ: Mapping[str, str]) -> IngressSpec:
    return IngressSpec(host=environ.get(HOST_ENV) or LOOPBACK, tls_cert_file=environ.get(CERT_ENV) or None,
                       tls_key_file=environ.get(KEY_ENV) or None)


def bind_address(host: str, port: int | str) -> str:
    """A gRPC bind address: `bind_address("::", 9000) == "[::]:9000"`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def binder(spec: IngressSpec):
    """`add_grpc_address(server, "[::]:PORT")` as Serve calls it, binding `spec.host` and, with TLS, only TLS.
    The certificate and key are read now, so a bad path fails here rather than on the first connection."""
    import grpc

    credentials = None
    if spec.tls:
        chain = Path(spec.tls_cert_file).expanduser().read_bytes()
        key = Path(spec.tls_key_file).expanduser().read_bytes()
        credentials = grpc.ssl_server_credentials([(key, chain)])

    def add_grpc_address(server, server_address: str) -> int:
        address = bind_address(spec.host, server_address.rsplit(":", 1)[1])
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
        if port == 0:      # grpc's way of saying it could not bind
            raise RuntimeError(f"gRPC ingress could not bind {address}")
        return port

    return add_grpc_address


def install(spec: IngressSpec) -> None:
    """Make this process's Serve gRPC servers bind as `spec` says."""
    from ray.serve._private import default_impl

    if not callable(getattr(default_impl, "add_grpc_address", None)):
        import ray

        raise RuntimeError(f"Ray {ray.__version__} has no serve._private.default_impl.add_grpc_address: metaspec "
                           "cannot set the gRPC ingress's address and TLS (refusing to serve plaintext on [::])")
    default_impl.add_grpc_address = binder(spec)


def configure_ingress() -> list:
    """Serve's HTTP-proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): installs the gRPC binding from the
    environment; adds no HTTP middleware."""
    install(spec_from_env(os.environ))
    return []
