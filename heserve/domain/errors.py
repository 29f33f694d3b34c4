"""Domain errors of the scoring service, each naming the gRPC status it maps to.

The domain raises these without knowing gRPC; the transport layer maps `status`
(a grpc.StatusCode name) onto the wire, so the code and the reason travel together.
"""

from __future__ import annotations


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


class UnavailableError(ServiceError):
    """Transient: retrying may work (e.g. a worker process died mid-query)."""

    status = "UNAVAILABLE"
