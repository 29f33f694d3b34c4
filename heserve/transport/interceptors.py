"""Per-call policy around every RPC, one interceptor per concern.

- `RequestIdInterceptor`: names the call (the client's x-request-id, or a fresh one),
  binds its `CallInfo` (heserve.transport.context) for the servicer and the logs,
  and echoes the id in the initial metadata.
- `AccessLogInterceptor`: one line per call with its status, duration, deadline,
  caller and message sizes (never the messages).
- `MetricsInterceptor`: counts, latency, bytes and status codes (heserve.transport.metrics).
- `MetadataLimitInterceptor`: more than `MAX_METADATA_BYTES` of metadata, RESOURCE_EXHAUSTED.
- `AdminAuthenticationInterceptor`: a call of the admin service (heserve.admin.v1)
  without a known admin token, UNAUTHENTICATED; only when admin tokens are configured.
- `AuthenticationInterceptor`: who is calling; no known token, UNAUTHENTICATED.
- `QueryBudgetInterceptor`: a caller past their Score budget, RESOURCE_EXHAUSTED.

heserve.transport.server composes them in that order, outermost first. Refusals are
decided in gRPC's dispatch thread from metadata alone: a refused call gets a handler
that fails it before its request is read, so an unauthenticated client cannot make the
server parse a message. A refused call is still a call, with an id, a log line and a
count: that is why the request id, the log and the metrics sit outside the refusals.
Health checks need no token and are never charged. A method the server does not
serve is answered UNIMPLEMENTED by gRPC, and neither logged nor counted: its name is
the caller's input, and would otherwise become a metric label.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from heserve.protocol.reasons import KEY_NOT_FOUND
from heserve.transport.auth import ADMIN_PREFIX, ANONYMOUS, Authenticator, QueryBudget
from heserve.transport.context import (
    REQUEST_ID_KEY,
    CallInfo,
    bind_call,
    bind_caller,
    current_call,
    refusal_reason,
    request_id_of,
)
from heserve.transport.metrics import Metrics
from heserve.v1 import scoring_pb2 as pb

log = logging.getLogger("heserve.access")

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
ADMIN_METHOD_PREFIX = "/heserve.admin.v1."
"""Every method of the admin package: refused without an admin token."""
SCORE_METHOD = "/heserve.v1.ScoringService/Score"
MAX_METADATA_BYTES = 16 << 10
"""The most request metadata a call may carry, counted as HTTP/2 does (name, value and
32 bytes per entry). The server also sets it as gRPC's own limit, but gRPC applies that
only once the client has acknowledged the server's HTTP/2 settings: a client that sends
its headers first gets up to 16 MiB past it, hence this check."""
_METADATA_ENTRY_OVERHEAD = 32  # RFC 7541 section 4.1
_NO_DEADLINE_SECONDS = 1e8  # gRPC reports "no deadline" as a remaining time of centuries

if TYPE_CHECKING:  # generic in grpc-stubs only
    ServerInterceptor = grpc.ServerInterceptor[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Handler | None]
else:
    ServerInterceptor = grpc.ServerInterceptor


def split_method(method: str) -> tuple[str, str]:
    """('heserve.v1.ScoringService', 'Score') of '/heserve.v1.ScoringService/Score'."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def is_open(method: str) -> bool:
    """Whether `method` is served without a token (health checks)."""
    return method.startswith(OPEN_METHOD_PREFIXES)


def is_admin(method: str) -> bool:
    """Whether `method` is one of the admin service's (heserve.admin.v1): admin tokens only."""
    return method.startswith(ADMIN_METHOD_PREFIX)


def _size(message: Any) -> int:
    size = getattr(message, "ByteSize", None)
    return int(size()) if callable(size) else 0


def status_name(context: grpc.ServicerContext, error: BaseException | None) -> str:
    """How a call ended, as a status code name: what the access log and metrics report."""
    code_of = getattr(context, "code", None)  # grpcio has it; the stubs do not
    code = code_of() if callable(code_of) else None
    if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        return code.name
    # The call ended early: the handler returned, or failed reading a stream the
    # client had abandoned (grpc raises a bare RpcError); either way, not a server bug.
    if not context.is_active():
        return "DEADLINE_EXCEEDED" if context.time_remaining() <= 0 else "CANCELLED"
    if error is not None:
        return "UNKNOWN"
    return "OK"


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    """The call's text metadata, the first value of each key."""
    metadata: dict[str, str] = {}
    for key, value in details.invocation_metadata or ():
        if isinstance(value, str):
            metadata.setdefault(key, value)
    return metadata


def refusal(code: grpc.StatusCode, message: str) -> Handler:
    """A handler that fails its call with `code` without reading (or parsing) a request."""

    def refuse(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(refuse)


# --- watching a call from start to status ---------------------------------------------


class CallObserver:
    """Hooks around one call, run in the thread that serves it; override what you need.

    `started` runs before the handler, `received` and `sent` for each message,
    `ended` once with the error the handler raised (None if it returned, or if the
    client went away while a stream was being sent).
    """

    def started(self, context: grpc.ServicerContext) -> None:
        pass

    def received(self, message: Any) -> None:
        pass

    def sent(self, message: Any) -> None:
        pass

    def ended(self, context: grpc.ServicerContext, error: BaseException | None) -> None:
        pass


def observed(handler: Handler, observer: CallObserver) -> Handler:
    """`handler` with `observer` called around its behaviour, for all four kinds of RPC."""
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary(handler.unary_unary, observer, streaming_in=False), **serializers
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _unary(handler.stream_unary, observer, streaming_in=True), **serializers
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _stream(handler.unary_stream, observer, streaming_in=False), **serializers
        )
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(
        _stream(handler.stream_stream, observer, streaming_in=True), **serializers
    )


def _requests(request: Any, observer: CallObserver, streaming_in: bool) -> Any:
    """The request, or a stream that shows each message to the observer as it is read."""
    if not streaming_in:
        observer.received(request)
        return request

    def stream() -> Iterator[Any]:
        for message in request:
            observer.received(message)
            yield message

    return stream()


def _unary(
    behaviour: Callable[..., Any], observer: CallObserver, streaming_in: bool
) -> Callable[..., Any]:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        observer.started(context)
        error: BaseException | None = None
        try:
            response = behaviour(_requests(request, observer, streaming_in), context)
            observer.sent(response)
            return response
        except BaseException as exc:
            error = exc
            raise
        finally:
            observer.ended(context, error)

    return wrapped


def _stream(
    behaviour: Callable[..., Iterator[Any]], observer: CallObserver, streaming_in: bool
) -> Callable[..., Iterator[Any]]:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        observer.started(context)
        error: BaseException | None = None
        responses: Iterator[Any] | None = None
        try:
            responses = behaviour(_requests(request, observer, streaming_in), context)
            for response in responses:
                observer.sent(response)
                yield response
        except GeneratorExit:  # gRPC stopped reading: the client went away
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            # Stop the behaviour now (a Score stops computing), not when it is collected.
            close = getattr(responses, "close", None)
            if callable(close):
                close()
            observer.ended(context, error)

    return wrapped


# --- the interceptors -------------------------------------------------------------------


class _ServedMethodInterceptor(ServerInterceptor):
    """An interceptor that acts on the handler of a method the server serves; for any
    other method it steps aside and gRPC answers UNIMPLEMENTED."""

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        return None if handler is None else self.intercept(handler, handler_call_details.method)

    def intercept(self, handler: Handler, method: str) -> Handler:
        """The handler to run for a call of `method` (the one found, wrapped, or a refusal)."""
        raise NotImplementedError


class RequestIdInterceptor(_ServedMethodInterceptor):
    """Names every call and binds its CallInfo, for the interceptors within, the servicer
    and the logs; echoes the request id to the client in the initial metadata."""

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        request_id = request_id_of(_metadata(handler_call_details))
        bind_call(CallInfo(request_id, handler_call_details.method))
        return super().intercept_service(continuation, handler_call_details)

    def intercept(self, handler: Handler, method: str) -> Handler:
        info = current_call()  # with what the interceptors within learnt: the caller
        assert info is not None
        return observed(handler, _Named(info))


class _Named(CallObserver):
    def __init__(self, info: CallInfo) -> None:
        self.info = info

    def started(self, context: grpc.ServicerContext) -> None:
        bind_call(self.info)  # in the thread that serves the call
        with contextlib.suppress(ValueError, grpc.RpcError):  # the client is already gone
            context.send_initial_metadata(((REQUEST_ID_KEY, self.info.request_id),))


class AccessLogInterceptor(_ServedMethodInterceptor):
    """Logs each call to 'heserve.access': a DEBUG line as it starts, and one line as it
    ends with its code, duration, deadline, caller and message bytes (sizes only).
    Successful health checks are logged at DEBUG, everything else at INFO."""

    def intercept(self, handler: Handler, method: str) -> Handler:
        return observed(handler, _Logged())


class _Logged(CallObserver):
    def __init__(self) -> None:
        self.info = CallInfo("", "")
        self.started_at = 0.0
        self.deadline_ms: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.score: dict[str, Any] = {}  # a Score's catalog, queries and items scored

    def started(self, context: grpc.ServicerContext) -> None:
        self.info = current_call() or self.info
        self.started_at = time.perf_counter()
        remaining = context.time_remaining()  # huge, or None, without a deadline
        if remaining is not None and remaining < _NO_DEADLINE_SECONDS:
            self.deadline_ms = round(remaining * 1000, 1)
        method = split_method(self.info.method)[1]
        log.debug(
            "%s started",
            method,
            extra={
                "fields": {
                    "method": method,
                    "request_id": self.info.request_id,
                    "caller": self.info.caller_name,
                    "peer": context.peer(),
                    "deadline_ms": self.deadline_ms,
                }
            },
        )

    def received(self, message: Any) -> None:
        self.bytes_in += _size(message)
        if isinstance(message, pb.ScoreRequest):  # names, counts: never the query itself
            self.score = {
                "catalog": message.catalog[:_LOGGED_NAME_CHARS],
                "queries": 1 + len(message.more_queries),
                "items": 0,
            }

    def sent(self, message: Any) -> None:
        self.bytes_out += _size(message)
        if isinstance(message, pb.ScoreResponse) and self.score:
            self.score["items"] += message.count

    def ended(self, context: grpc.ServicerContext, error: BaseException | None) -> None:
        milliseconds = (time.perf_counter() - self.started_at) * 1000
        code = status_name(context, error)
        service, method = split_method(self.info.method)
        quiet = is_open(self.info.method) and code == "OK"
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "%s %s %.1f ms",
            method,
            code,
            milliseconds,
            extra={
                "fields": {
                    "service": service,
                    "method": method,
                    "code": code,
                    "request_id": self.info.request_id,
                    "duration_ms": round(milliseconds, 1),
                    "deadline_ms": self.deadline_ms,
                    "caller": self.info.caller_name,
                    "bytes_in": self.bytes_in,
                    "bytes_out": self.bytes_out,
                    **self.score,
                }
            },
        )


_LOGGED_NAME_CHARS = 64
"""A catalog name in an access line is cut here: it is the caller's input."""


class MetricsInterceptor(_ServedMethodInterceptor):
    """Counts each call in `metrics`: started, in flight, latency, message bytes, the
    status of failures, and for Score the items scored per catalog."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def intercept(self, handler: Handler, method: str) -> Handler:
        return observed(handler, _Counted(self.metrics, split_method(method)))


class _Counted(CallObserver):
    def __init__(self, metrics: Metrics, labels: tuple[str, str]) -> None:
        self.metrics = metrics
        self.labels = labels
        self.started_at = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.catalog = ""  # Score's, for the items-scored counter

    def started(self, context: grpc.ServicerContext) -> None:
        self.started_at = time.perf_counter()
        self.metrics.requests.labels(*self.labels).inc()
        self.metrics.in_flight.inc()

    def received(self, message: Any) -> None:
        self.bytes_in += _size(message)
        if isinstance(message, pb.ScoreRequest):
            self.catalog = message.catalog

    def sent(self, message: Any) -> None:
        self.bytes_out += _size(message)
        if isinstance(message, pb.ScoreResponse):
            self.metrics.items_scored.labels(self.catalog).inc(message.count)

    def ended(self, context: grpc.ServicerContext, error: BaseException | None) -> None:
        metrics, labels = self.metrics, self.labels
        metrics.in_flight.dec()
        metrics.latency.labels(*labels).observe(time.perf_counter() - self.started_at)
        metrics.bytes_received.labels(*labels).inc(self.bytes_in)
        metrics.bytes_sent.labels(*labels).inc(self.bytes_out)
        code = status_name(context, error)
        if code != "OK":
            metrics.errors.labels(*labels, code).inc()


def metadata_bytes(details: grpc.HandlerCallDetails) -> int:
    """The size of a call's metadata as HTTP/2 counts a header list (RFC 7541 4.1)."""
    total = 0
    for key, value in details.invocation_metadata or ():
        total += len(key) + len(value) + _METADATA_ENTRY_OVERHEAD
    return total


class _CallDetails(grpc.HandlerCallDetails):
    """A call's method with other metadata than it came with."""

    def __init__(self, method: str, invocation_metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


class MetadataLimitInterceptor(ServerInterceptor):
    """Refuses a call with more than `max_bytes` of metadata with RESOURCE_EXHAUSTED
    (health checks included). The interceptors within see such a call without its
    metadata and with nobody known to make it: they neither read the metadata nor
    charge anyone's budget."""

    def __init__(self, max_bytes: int = MAX_METADATA_BYTES) -> None:
        self.max_bytes = max_bytes

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        if metadata_bytes(handler_call_details) <= self.max_bytes:
            return continuation(handler_call_details)
        bind_caller(None)
        handler = continuation(_CallDetails(handler_call_details.method, ()))
        if handler is None:  # not a method served here: UNIMPLEMENTED, as for any call
            return None
        return refusal(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"call metadata larger than {self.max_bytes} bytes"
        )


def _is_admin_caller() -> bool:
    """Whether this call was made with an admin token (its caller is `admin:NAME`)."""
    info = current_call()
    caller = None if info is None else info.caller
    return caller is not None and caller.name.startswith(ADMIN_PREFIX)


class AdminAuthenticationInterceptor(_ServedMethodInterceptor):
    """Binds the caller of an admin token to a call of the admin service
    (heserve.admin.v1); refuses one without a known admin token with UNAUTHENTICATED,
    before its request is read. An API token is no admin token: it is refused here.
    Calls of other services it leaves to `AuthenticationInterceptor`."""

    MESSAGE = (
        "missing or unknown admin token: the admin service needs metadata "
        "'authorization: Bearer <admin token>' (an API token does not open it)"
    )

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        if is_admin(handler_call_details.method):
            bind_caller(self.authenticator.authenticate(_metadata(handler_call_details)))
        return super().intercept_service(continuation, handler_call_details)

    def intercept(self, handler: Handler, method: str) -> Handler:
        if not is_admin(method) or _is_admin_caller():
            return handler
        return refusal(grpc.StatusCode.UNAUTHENTICATED, self.MESSAGE)


class AuthenticationInterceptor(_ServedMethodInterceptor):
    """Binds the caller of a token (`authorization: Bearer ...`) to the call; refuses a
    call without a known one with UNAUTHENTICATED. Health checks need no token. A call
    of the admin service is `AdminAuthenticationInterceptor`'s (which runs first): it
    passes here only with the admin caller that one bound."""

    MESSAGE = "missing or unknown API token: send metadata 'authorization: Bearer <token>'"

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        method: str = handler_call_details.method
        if not is_admin(method):  # an admin call keeps the admin caller bound before
            metadata = _metadata(handler_call_details)
            # Bound before the interceptors within run: the budget charges this caller.
            bind_caller(ANONYMOUS if is_open(method) else self.authenticator.authenticate(metadata))
        return super().intercept_service(continuation, handler_call_details)

    def intercept(self, handler: Handler, method: str) -> Handler:
        info = current_call()
        if is_admin(method):
            known = _is_admin_caller()
        else:
            known = info is not None and info.caller is not None
        if known:
            return handler
        return refusal(grpc.StatusCode.UNAUTHENTICATED, self.MESSAGE)


class QueryBudgetInterceptor(_ServedMethodInterceptor):
    """Charges each query of a Score call to its caller's budget; refuses a call past it
    with RESOURCE_EXHAUSTED. Nothing else is charged, nor a call nobody is known to make.

    The first query is charged from the metadata, before the request is read; the
    request's `more_queries` once it is read. A call that fails because the server no
    longer holds its keys (KEY_NOT_FOUND: expired, evicted, a restart) is refunded:
    the client registers again and retries, and one answer must not cost two.
    """

    def __init__(self, budget: QueryBudget) -> None:
        self.budget = budget

    def intercept(self, handler: Handler, method: str) -> Handler:
        info = current_call()
        caller = ANONYMOUS if info is None else info.caller
        if caller is None or method != SCORE_METHOD:
            return handler
        wait = self.budget.charge(caller.name)
        if wait is None:
            return observed(handler, _ChargedScore(self.budget, caller.name))
        return refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, _spent(self.budget, wait))


def _spent(budget: QueryBudget, wait: float) -> str:
    return (
        f"query budget spent: {budget.limit} Score calls per "
        f"{budget.window_seconds:g} s; it renews in {wait:.0f} s"
    )


class _ChargedScore(CallObserver):
    """One admitted Score call: charges its further queries, refunds a call that failed
    on missing keys."""

    def __init__(self, budget: QueryBudget, name: str) -> None:
        self.budget, self.name = budget, name
        self.charged = 1
        self.context: grpc.ServicerContext | None = None

    def started(self, context: grpc.ServicerContext) -> None:
        self.context = context

    def received(self, message: Any) -> None:
        more = len(getattr(message, "more_queries", ()))
        if more and self.context is not None:
            wait = self.budget.charge(self.name, more)
            if wait is not None:  # refused whole: give back the first query's charge too
                self.budget.refund(self.name, self.charged)
                self.charged = 0
                self.context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _spent(self.budget, wait))
            self.charged += more

    def ended(self, context: grpc.ServicerContext, error: BaseException | None) -> None:
        if refusal_reason() == KEY_NOT_FOUND:
            self.budget.refund(self.name, self.charged)
