"""Request-level errors, importable without torch (the router and the protocol layer map them to statuses)."""


class RequestError(ValueError):
    """A request the service cannot serve as asked (bad parameter, unknown method, prompt too long...).

    The gRPC edge maps it to INVALID_ARGUMENT with `str(error)` as the message.
    """


class QueueFull(Exception):
    """The replica's queue of requests waiting for a KV slot is full (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""
