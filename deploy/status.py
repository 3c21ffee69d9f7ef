"""Every failure as the gRPC status the client sees (the HTTP API maps these codes onto HTTP statuses)."""

from __future__ import annotations

import logging

import grpc

from metaspec.workers.errors import QueueFull, RequestError

from .pool_watch import PoolDown

logger = logging.getLogger("ray.serve")


class Status(Exception):
    """A gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.counted = False                     # True once an outcome recorded it (else a rejection is counted)


def status_of(exc: BaseException) -> Status:
    """Map an exception from checks or from a worker call to the status the client sees."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, Status):
        return exc
    exc = _cause(exc)
    if isinstance(exc, RequestError):
        return Status(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, PoolDown):
        return Status(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, TimeoutError):
        return Status(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline (timeout_s) passed")
    if isinstance(exc, (BackPressureError, QueueFull)):
        return Status(grpc.StatusCode.RESOURCE_EXHAUSTED, "the pool's queue is full; retry later")
    if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError)):
        return Status(grpc.StatusCode.UNAVAILABLE, f"the worker serving this request is unavailable: {type(exc).__name__}")
    logger.error("internal error answered as INTERNAL: %s: %s", type(exc).__name__, exc)
    return Status(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the service log has details")


def _replica_lost(exc: BaseException) -> bool:
    """The worker replica died or became unreachable (as opposed to the request failing on it)."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(exc, (RayActorError, ActorUnavailableError))


def _cause(exc: BaseException) -> BaseException:
    """The user exception inside a RayTaskError (whose str() is a whole remote traceback)."""
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and exc.cause is not None and exc.cause is not exc:
        exc = exc.cause
    return exc
