"""Domain errors of the scoring service, each naming the gRPC status it maps to.

The domain raises these without knowing gRPC; the transport layer maps `status`
(a grpc.StatusCode name) onto the wire, so the code and the reason travel together.
"""

from __future__ import annotations

ECHO_CHARS = 64
"""The most of a caller's string that a message or a log line repeats."""


def clip(value: str, limit: int = ECHO_CHARS) -> str:
    """`value` as an error message or log line may echo it: its repr, cut to `limit`
    characters with the length it had. A caller's name, id or version can be as long as
    a message allows; echoed whole, a 10 KB value made the status trailer too large for
    the client's gRPC (it saw RESOURCE_EXHAUSTED "Stream removed") and a log line of
    megabytes (issue 9, finding 2)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class ServiceError(Exception):
    """A request the service refuses.

    `status` is the gRPC status code name; `reason`, when set, is an UPPER_SNAKE
    ErrorInfo reason a client can act on (e.g. KEY_NOT_FOUND: register again).
    """

    status = "INTERNAL"

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class InvalidArgumentError(ServiceError):
    status = "INVALID_ARGUMENT"


class NotFoundError(ServiceError):
    status = "NOT_FOUND"


class ResourceExhaustedError(ServiceError):
    status = "RESOURCE_EXHAUSTED"


class FailedPreconditionError(ServiceError):
    status = "FAILED_PRECONDITION"


class DeadlineExceededError(ServiceError):
    """The call's deadline passed before its work took effect; nothing changed."""

    status = "DEADLINE_EXCEEDED"


class InternalError(ServiceError):
    """The server failed, not the request: the caller learns no more than that."""

    status = "INTERNAL"


class UnavailableError(ServiceError):
    """Transient: retrying may work (e.g. a worker process died mid-query)."""

    status = "UNAVAILABLE"
