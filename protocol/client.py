"""A small Python client for the metaspec gRPC service.

>>> with Client("127.0.0.1:9000") as client:
...     reply = client.generate("def add(a, b):", max_tokens=32)
...     print(reply.method, reply.pool, reply.text)
...     for chunk in client.stream("Once upon a time", max_tokens=32):
...         print(chunk.text, end="")
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import grpc

from . import convert
from .metaspec_pb2_grpc import MetaSpecStub
from .types import Constraint, Health, Reply, ServiceInfo

API_KEY_HEADER = "x-api-key"   # gRPC metadata key carrying the client's API key
API_KEY_ENV = "METASPEC_API_KEY"   # where the CLI looks for a key when no --api-key-file is given


class ServiceError(Exception):
    """A non-OK gRPC status from the service: `code` is the status name ("INVALID_ARGUMENT"...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Client:
    """`application` names the Serve application when one Ray Serve instance runs several (Serve's gRPC proxy
    routes on the `application` metadata key); None = the only one. `tls=True` (or a `ca_cert`) speaks TLS and
    verifies the server's certificate against `ca_cert` (PEM bytes) or, without one, the system's roots, for the
    name in `address` or `server_name`."""

    def __init__(self, address: str, api_key: str | None = None, timeout_s: float | None = None,
                 max_message_bytes: int = 64 << 20, application: str | None = None, tls: bool = False,
                 ca_cert: bytes | None = None, server_name: str | None = None) -> None:
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if server_name:                  # the name the certificate is for, when `address` is an IP or other name
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls or ca_cert is not None:   # ca_cert: PEM roots to verify the server by; None = the system's
            credentials = grpc.ssl_channel_credentials(root_certificates=ca_cert)
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = MetaSpecStub(self.channel)
        self.metadata = (((API_KEY_HEADER, api_key),) if api_key else ()) + \
            ((("application", application),) if application else ())
        self.timeout_s = timeout_s

    def generate(self, prompt: str | Sequence[int], *, timeout_s: float | None = None, **fields) -> Reply:
        """One request, the whole answer. `fields`: see `convert.make_request` (max_tokens, temperature, ...)."""
        msg = convert.make_request(prompt, **fields)
        try:
            return convert.reply_from_proto(self.stub.Generate(msg, timeout=self._timeout(timeout_s),
                                                               metadata=self.metadata))
        except grpc.RpcError as err:
            raise _service_error(err) from None

    def stream(self, prompt: str | Sequence[int], *, timeout_s: float | None = None, **fields) -> Iterator[Reply]:
        """Yield one Reply per emitted chunk; the last has `finish_reason` set and the final statistics."""
        call = self.stub.GenerateStream(convert.make_request(prompt, **fields), timeout=self._timeout(timeout_s),
                                        metadata=self.metadata)
        try:
            for msg in call:
                yield convert.reply_from_proto(msg)
        except grpc.RpcError as err:
            raise _service_error(err) from None
        finally:
            call.cancel()   # no-op when the stream finished; stops the generation when the caller breaks out

    def health(self, timeout_s: float | None = None) -> Health:
        try:
            return convert.health_from_proto(self.stub.Health(convert.health_request(),
                                                              timeout=self._timeout(timeout_s), metadata=self.metadata))
        except grpc.RpcError as err:
            raise _service_error(err) from None

    def list_methods(self, timeout_s: float | None = None) -> ServiceInfo:
        try:
            msg = self.stub.ListMethods(convert.list_methods_request(), timeout=self._timeout(timeout_s),
                                        metadata=self.metadata)
            return convert.service_info_from_proto(msg)
        except grpc.RpcError as err:
            raise _service_error(err) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return timeout_s if timeout_s is not None else self.timeout_s


def read_api_key(path: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The client's API key: the first line of the file at `path`, else $METASPEC_API_KEY, else None. (Never a
    command-line argument: those show in `ps` and shell history.)"""
    if path:
        lines = Path(path).expanduser().read_text().splitlines()
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"API key file {path} is empty")
        return key
    environ = os.environ if environ is None else environ
    return environ.get(API_KEY_ENV) or None


def _service_error(err: grpc.RpcError) -> ServiceError:
    code = err.code() if hasattr(err, "code") else None
    return ServiceError(code.name if code is not None else "UNKNOWN", err.details() if hasattr(err, "details") else str(err))


__all__ = ["API_KEY_ENV", "API_KEY_HEADER", "Client", "Constraint", "ServiceError", "read_api_key"]
