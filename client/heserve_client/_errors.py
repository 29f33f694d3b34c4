"""Python exceptions for the statuses a heserve server returns."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class HeserveError(Exception):
    """A call to the heserve server failed; `code` is the gRPC status, `reason` its ErrorInfo."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class InvalidRequestError(HeserveError):
    """The server refused the request as malformed (INVALID_ARGUMENT)."""


class NotFoundError(HeserveError):
    """A catalog, item or key the server does not know (NOT_FOUND)."""


class LimitExceededError(HeserveError):
    """A request over one of the server's size limits (RESOURCE_EXHAUSTED)."""


class StaleCatalogError(HeserveError):
    """The catalog changed version since the client looked (FAILED_PRECONDITION)."""


class ServerUnavailableError(HeserveError):
    """The server cannot be reached or timed out (UNAVAILABLE, DEADLINE_EXCEEDED)."""


class ParameterMismatchError(HeserveError):
    """The client's saved key pair was made under other parameters than the server's."""


_BY_CODE: dict[grpc.StatusCode, type[HeserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceededError,
    grpc.StatusCode.FAILED_PRECONDITION: StaleCatalogError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServerUnavailableError,
}


def from_rpc_error(error: grpc.RpcError) -> HeserveError:
    """The HeserveError subclass for a failed call, with its ErrorInfo reason if any."""
    call = error if isinstance(error, grpc.Call) else None
    code = call.code() if call is not None else None
    details = (call.details() if call is not None else None) or str(error)
    reason = ""
    status = rpc_status.from_call(call) if call is not None else None
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = str(info.reason)
    kind = _BY_CODE.get(code, HeserveError) if code is not None else HeserveError
    label = code.name if code is not None else "ERROR"
    return kind(f"{label}: {details}", code=code, reason=reason)
