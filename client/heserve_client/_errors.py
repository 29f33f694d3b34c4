"""Python exceptions for the statuses a heserve server returns.

A status code says what kind of failure it was; the ErrorInfo reason (see
heserve.protocol.reasons), when the server gives one, says which: each reason the
client knows has an exception class of its own, a subclass of its code's class, so
`except NotFoundError` still catches `KeyNotFoundError`.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from heserve.protocol.reasons import (
    CATALOG_VERSION_CHANGED,
    CONJUGATION_KEY_MISSING,
    KEY_NOT_FOUND,
)


class HeserveError(Exception):
    """A call to the heserve server failed; `code` is the gRPC status, `reason` its ErrorInfo."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class ClientClosedError(HeserveError):
    """The Client was closed (`close`, the end of its `with` block, `forget_me`)."""


class InvalidRequestError(HeserveError):
    """The server refused the request as malformed (INVALID_ARGUMENT)."""


class NotFoundError(HeserveError):
    """A catalog, item or key the server does not know (NOT_FOUND)."""


class KeyNotFoundError(NotFoundError):
    """The server does not hold the keys of this key_id (expired, evicted, restarted).

    The client registers its keys again by itself; this reaches a caller only when the
    registration just made is gone again."""


class LimitExceededError(HeserveError):
    """A request over one of the server's size limits or budgets (RESOURCE_EXHAUSTED)."""


class PreconditionError(HeserveError):
    """The server is not in the state the request needs (FAILED_PRECONDITION)."""


class StaleCatalogError(PreconditionError):
    """The catalog changed version since the client looked (FAILED_PRECONDITION,
    CATALOG_VERSION_CHANGED). The client refreshes and retries once by itself; this
    reaches a caller only if the catalog changed again meanwhile."""


class ConjugationKeyMissingError(PreconditionError):
    """Real-slot scores were asked of keys without the conjugation key (FAILED_PRECONDITION,
    CONJUGATION_KEY_MISSING)."""


class PermissionDeniedError(HeserveError):
    """The caller's token may not do this, e.g. use another token's key_id (PERMISSION_DENIED)."""


class UnauthenticatedError(HeserveError):
    """No API token, or one the server does not know (UNAUTHENTICATED)."""


class ServerUnavailableError(HeserveError):
    """The server cannot be reached or timed out (UNAVAILABLE, DEADLINE_EXCEEDED)."""


class PolicyError(HeserveError):
    """The server does not meet the client's privacy policy (heserve_client.Policy); the
    client refused it before sending anything derived from the user. `requirements`
    names each failed requirement (a Policy field, e.g. "require_tls"), and the message
    says why each failed."""

    def __init__(self, message: str, requirements: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.requirements = requirements


class ParameterMismatchError(HeserveError):
    """The client's saved key pair was made under other parameters than the server's."""


_BY_CODE: dict[grpc.StatusCode, type[HeserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceededError,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.UNAVAILABLE: ServerUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServerUnavailableError,
}
_BY_REASON: dict[tuple[grpc.StatusCode, str], type[HeserveError]] = {
    (grpc.StatusCode.NOT_FOUND, KEY_NOT_FOUND): KeyNotFoundError,
    (grpc.StatusCode.FAILED_PRECONDITION, CATALOG_VERSION_CHANGED): StaleCatalogError,
    (grpc.StatusCode.FAILED_PRECONDITION, CONJUGATION_KEY_MISSING): ConjugationKeyMissingError,
}
# Servers before the reasons above refused a stale version with FAILED_PRECONDITION, no
# reason, and this message ("catalog 'x' is at version A, not B"): still understood.
_STALE_VERSION_TEXT = "is at version"


def _reason_of(call: grpc.Call) -> str:
    status = rpc_status.from_call(call)
    if status is None:
        return ""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def error_class(code: grpc.StatusCode | None, reason: str, details: str) -> type[HeserveError]:
    """The exception class for a status: by its reason if the client knows it, else by code."""
    if code is None:
        return HeserveError
    known = _BY_REASON.get((code, reason))
    if known is not None:
        return known
    stale = code == grpc.StatusCode.FAILED_PRECONDITION and _STALE_VERSION_TEXT in details
    if stale and not reason:
        return StaleCatalogError
    return _BY_CODE.get(code, HeserveError)


def from_rpc_error(error: grpc.RpcError) -> HeserveError:
    """The HeserveError subclass for a failed call, with its ErrorInfo reason if any."""
    call = error if isinstance(error, grpc.Call) else None
    code = call.code() if call is not None else None
    details = (call.details() if call is not None else None) or str(error)
    reason = _reason_of(call) if call is not None else ""
    kind = error_class(code, reason, details)
    label = code.name if code is not None else "ERROR"
    return kind(f"{label}: {details}", code=code, reason=reason)
