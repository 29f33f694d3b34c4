"""Per-call policy around every RPC: request id, authentication, query budget, metrics, access log.

`CallInterceptor` decides in the server's dispatch thread, from metadata only, whether a
call may run. A refused call gets a stream-stream handler that fails it before its
request is read, so an unauthenticated client cannot make the server parse a message.
An admitted call runs wrapped: the wrapper binds a `CallInfo` (request id, caller) to the
worker thread, where the servicer (`current_caller()`) and the log formatter find it,
echoes the request id in the initial metadata, and on the way out records status,
latency and message bytes, and writes one access log line (sizes and codes only).

Health checks need no token and are never charged; a query budget charges Score calls.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from heserve.transport.auth import ANONYMOUS, Authenticator, Caller, QueryBudget
from heserve.transport.context import REQUEST_ID_KEY, CallInfo, bind_call, request_id_of
from heserve.transport.metrics import Metrics
from heserve.v1 import scoring_pb2 as pb

log = logging.getLogger("heserve.access")

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
SCORE_METHOD = "/heserve.v1.ScoringService/Score"
_NO_DEADLINE_SECONDS = 1e8  # gRPC reports "no deadline" as a remaining time of centuries


if TYPE_CHECKING:  # generic in grpc-stubs only
    _ServerInterceptor = grpc.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.ServerInterceptor


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def _size(message: Any) -> int:
    size = getattr(message, "ByteSize", None)
    return int(size()) if callable(size) else 0


class _Call:
    """One admitted or refused RPC: its bookkeeping from start to status."""

    def __init__(self, info: CallInfo, metrics: Metrics | None, quiet: bool) -> None:
        self.info = info
        self.metrics = metrics
        self.quiet = quiet
        self.labels = _split(info.method)
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = 0.0
        self.deadline_ms: float | None = None
        self.catalog = ""  # Score's, for the items-scored counter

    def begin(self, context: grpc.ServicerContext) -> None:
        bind_call(self.info)
        self.started = time.perf_counter()
        remaining = context.time_remaining()  # huge, or None, without a deadline
        if remaining is not None and remaining < _NO_DEADLINE_SECONDS:
            self.deadline_ms = round(remaining * 1000, 1)
        log.debug(
            "%s started",
            self.labels[1],
            extra={
                "fields": {
                    "method": self.labels[1],
                    "request_id": self.info.request_id,
                    "caller": self.info.caller.name,
                    "peer": context.peer(),
                    "deadline_ms": self.deadline_ms,
                }
            },
        )
        if self.metrics is not None:
            self.metrics.requests.labels(*self.labels).inc()
            self.metrics.in_flight.inc()
        with contextlib.suppress(ValueError, grpc.RpcError):  # the client is already gone
            context.send_initial_metadata(((REQUEST_ID_KEY, self.info.request_id),))

    def received(self, message: Any) -> Any:
        self.bytes_in += _size(message)
        return message

    def sent(self, message: Any) -> Any:
        self.bytes_out += _size(message)
        if isinstance(message, pb.ScoreResponse) and self.metrics is not None:
            self.metrics.items_scored.labels(self.catalog).inc(message.count)
        return message

    def end(self, context: grpc.ServicerContext, error: BaseException | None) -> None:
        seconds = time.perf_counter() - self.started
        code = self._code(context, error)
        service, method = self.labels
        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight.dec()
            metrics.latency.labels(service, method).observe(seconds)
            metrics.bytes_received.labels(service, method).inc(self.bytes_in)
            metrics.bytes_sent.labels(service, method).inc(self.bytes_out)
            if code != "OK":
                metrics.errors.labels(service, method, code).inc()
        level = logging.DEBUG if self.quiet and code == "OK" else logging.INFO
        log.log(
            level,
            "%s %s %.1f ms",
            method,
            code,
            seconds * 1000,
            extra={
                "fields": {
                    "service": service,
                    "method": method,
                    "code": code,
                    "request_id": self.info.request_id,
                    "duration_ms": round(seconds * 1000, 1),
                    "deadline_ms": self.deadline_ms,
                    "caller": self.info.caller.name,
                    "bytes_in": self.bytes_in,
                    "bytes_out": self.bytes_out,
                }
            },
        )

    @staticmethod
    def _code(context: grpc.ServicerContext, error: BaseException | None) -> str:
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

    # --- behaviours -----------------------------------------------------------------

    def refuse(self, code: grpc.StatusCode, message: str) -> Callable[..., Iterator[Any]]:
        def behaviour(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            self.begin(context)
            try:
                context.abort(code, message)
            except BaseException as error:
                self.end(context, error)
                raise
            raise AssertionError("ServicerContext.abort returned")

        return behaviour

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, streaming_in=False), **serializers
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, streaming_in=True), **serializers
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, streaming_in=False), **serializers
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self._stream(handler.stream_stream, streaming_in=True), **serializers
        )

    def _request(self, request: Any, streaming_in: bool) -> Any:
        if streaming_in:
            return (self.received(message) for message in request)
        if isinstance(request, pb.ScoreRequest):
            self.catalog = request.catalog
        return self.received(request)

    def _unary(self, behaviour: Callable[..., Any], streaming_in: bool) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            self.begin(context)
            error: BaseException | None = None
            try:
                return self.sent(behaviour(self._request(request, streaming_in), context))
            except BaseException as exc:
                error = exc
                raise
            finally:
                self.end(context, error)

        return wrapped

    def _stream(
        self, behaviour: Callable[..., Iterator[Any]], streaming_in: bool
    ) -> Callable[..., Iterator[Any]]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            self.begin(context)
            error: BaseException | None = None
            try:
                for response in behaviour(self._request(request, streaming_in), context):
                    yield self.sent(response)
            except GeneratorExit:  # gRPC stopped reading: the client went away
                raise
            except BaseException as exc:
                error = exc
                raise
            finally:
                self.end(context, error)

        return wrapped


class CallInterceptor(_ServerInterceptor):
    """Request ids, authentication, query budgets, metrics and access logs for every call."""

    def __init__(
        self,
        authenticator: Authenticator | None = None,
        budget: QueryBudget | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.budget = budget
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # gRPC answers UNIMPLEMENTED
        method: str = handler_call_details.method
        metadata: dict[str, str] = {}
        for key, value in handler_call_details.invocation_metadata or ():
            if isinstance(value, str):
                metadata.setdefault(key, value)
        is_open = method.startswith(OPEN_METHOD_PREFIXES)
        caller: Caller | None = ANONYMOUS
        if self.authenticator is not None and not is_open:
            caller = self.authenticator.authenticate(metadata)
        call = _Call(
            CallInfo(request_id_of(metadata), method, caller or ANONYMOUS), self.metrics, is_open
        )
        if caller is None:
            return grpc.stream_stream_rpc_method_handler(
                call.refuse(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing or unknown API token: send metadata 'authorization: Bearer <token>'",
                )
            )
        if self.budget is not None and method == SCORE_METHOD:
            wait = self.budget.charge(caller.name)
            if wait is not None:
                budget = self.budget
                return grpc.stream_stream_rpc_method_handler(
                    call.refuse(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"query budget spent: {budget.limit} Score calls per "
                        f"{budget.window_seconds:g} s; it renews in {wait:.0f} s",
                    )
                )
        return call.wrap(handler)
