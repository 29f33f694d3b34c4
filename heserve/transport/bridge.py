"""The synchronous servicer and interceptors served on grpc.aio: a waiting call holds no thread.

grpcio's threaded server gives each call a pool thread from its first byte to its
status: eight uploads that send one chunk and go quiet, eight Score streams nobody
reads, or eight health Watch streams take all eight threads, and every other call
waits (issue 9, finding 1). Here the server is `grpc.aio`: reading requests, writing
responses and waiting for either happen on one event loop, and a thread is taken only
for computing: the per-call policy (heserve.transport.interceptors) and the servicer
run unchanged, step by step, in a bounded pool.

- `SyncBridge` serves the ScoringService: it runs the interceptor chain on the call's
  metadata, reads the request (a streamed upload whole, within idle and total time
  limits and a byte bound), parses it (unreadable bytes: INVALID_ARGUMENT, one log
  line), runs the handler in the pool, and writes each response, closing a stream
  whose client reads nothing for `CallLimits.send_stall_seconds`.
- `CallAdmission` (an aio interceptor, on every service, health included) refuses
  with RESOURCE_EXHAUSTED, before anything runs, a caller's call past its share:
  `max_calls_per_caller` calls at once, `max_streams_per_caller` of them streams. A
  caller is its token's name; a call without a known token (health checks, or a
  server without tokens) is its peer's address.

Each call's context variables (heserve.transport.context) live in one
`contextvars.Context`, entered by each of its steps in turn, whichever thread runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from heserve.transport.auth import Authenticator
from heserve.transport.context import current_call
from heserve.transport.interceptors import (
    ADMIN_METHOD_PREFIX,
    MAX_METADATA_BYTES,
    is_open,
    metadata_bytes,
    split_method,
)
from heserve.transport.metrics import Metrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("heserve.access")

if TYPE_CHECKING:  # generic in grpc-stubs only
    ServerInterceptor = grpc.ServerInterceptor[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
    AioInterceptor = aio.ServerInterceptor[Any, Any]
    GenericHandler = grpc.GenericRpcHandler[Any, Any]
else:
    ServerInterceptor = grpc.ServerInterceptor
    Handler = grpc.RpcMethodHandler
    AioInterceptor = aio.ServerInterceptor
    GenericHandler = grpc.GenericRpcHandler


@dataclass(frozen=True)
class CallLimits:
    """How much of the server one caller may hold, and for how long a call may wait."""

    max_calls_per_caller: int = 32
    """Calls of one caller (token, or address without one) running at once."""
    max_streams_per_caller: int = 8
    """Of those, streaming calls (RegisterKeys, Score, health Watch)."""
    upload_idle_seconds: float = 30.0
    """A RegisterKeys upload that sends nothing for this long is ended (DEADLINE_EXCEEDED)."""
    upload_total_seconds: float = 300.0
    """A RegisterKeys upload not complete after this long is ended (DEADLINE_EXCEEDED)."""
    send_stall_seconds: float = 60.0
    """A response the client has not taken after this long ends its call."""

    def __post_init__(self) -> None:
        for name in ("max_calls_per_caller", "max_streams_per_caller"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("upload_idle_seconds", "upload_total_seconds", "send_stall_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


class _Aborted(Exception):
    """Raised in a handler's thread by `SyncContext.abort`, as grpcio's own abort does."""


class SyncContext:
    """The part of `grpc.ServicerContext` the interceptors and servicer use, for a call
    served by the event loop and computed in a pool thread.

    What must reach the wire (initial metadata, an abort) is recorded here and sent by
    the loop between steps; what the handler reads (deadline, peer, whether the call is
    still on) was taken when the call began or is set by the loop.
    """

    def __init__(
        self,
        context: aio.ServicerContext[Any, Any],
        metadata: Sequence[tuple[str, str | bytes]],
    ) -> None:
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining
        self._peer = context.peer()
        self._metadata = tuple(metadata)  # the call's, as read once (grpc logs bad bytes)
        self._finished = threading.Event()
        context.add_done_callback(lambda _: self._finished.set())  # type: ignore[arg-type]
        self.initial_metadata: tuple[tuple[str, str], ...] | None = None
        self.status_code: grpc.StatusCode | None = None
        self.status_details = ""
        self.trailing_metadata: Sequence[tuple[str, str | bytes]] = ()

    def is_active(self) -> bool:
        return not self._finished.is_set()

    def finish(self) -> None:
        """Mark the call over (the loop stopped serving it: cancelled, stalled)."""
        self._finished.set()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def send_initial_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        if self.initial_metadata is not None:
            raise ValueError("initial metadata already sent")
        self.initial_metadata = tuple(metadata)

    def code(self) -> grpc.StatusCode | None:
        return self.status_code

    def set_code(self, code: grpc.StatusCode) -> None:
        self.status_code = code

    def set_details(self, details: str) -> None:
        self.status_details = details

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status_code, self.status_details = code, details
        raise _Aborted(details)

    def abort_with_status(self, status: grpc.Status) -> None:
        self.trailing_metadata = tuple(status.trailing_metadata or ())
        self.abort(status.code, status.details)


_END = object()


def _next(responses: Iterator[Any]) -> Any:
    return next(responses, _END)


class _Unreadable(Exception):
    """Request bytes that do not parse as the method's request message."""


class _UploadTimeout(Exception):
    pass


def _thunk_for(handler: Handler) -> Callable[[grpc.HandlerCallDetails], Handler | None]:
    return lambda details: handler


class SyncBridge(GenericHandler):
    """Serves synchronous method handlers (a generated `add_*Servicer_to_server` adds
    them through `add_generic_rpc_handlers`) behind a chain of synchronous
    interceptors, on an aio server; see the module docstring."""

    def __init__(
        self,
        chain: Sequence[ServerInterceptor],
        executor: futures.ThreadPoolExecutor,
        limits: CallLimits,
        metrics: Metrics,
        max_upload_bytes: int,
    ) -> None:
        self._chain = list(chain)
        self._executor = executor
        self._limits = limits
        self._metrics = metrics
        self._max_upload_bytes = max_upload_bytes
        self._generic: list[GenericHandler] = []

    # what a generated add_*_to_server calls
    def add_generic_rpc_handlers(self, handlers: Sequence[GenericHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        """The same handlers again, by name: the generic ones already serve them."""

    def _lookup(self, details: grpc.HandlerCallDetails) -> Handler | None:
        for generic in self._generic:
            handler = generic.service(details)
            if handler is not None:
                return handler
        return None

    def _resolve(self, details: grpc.HandlerCallDetails, handler: Handler) -> Handler:
        """The handler the interceptor chain makes of `handler`, as grpcio composes it:
        the first interceptor outermost."""

        def at(index: int) -> Callable[[grpc.HandlerCallDetails], Handler | None]:
            if index == len(self._chain):
                return _thunk_for(handler)
            return lambda d: self._chain[index].intercept_service(at(index + 1), d)

        resolved = at(0)(details)
        assert resolved is not None  # the method is served: the chain steps aside or wraps
        return resolved

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        details = handler_call_details
        handler = self._lookup(details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            raise TypeError("bidirectional streams are not bridged")

        if handler.request_streaming:

            async def upload(requests: AsyncIterator[bytes], context: Any) -> bytes:
                result: bytes = await self._serve(details, handler, None, context)
                return result

            return grpc.stream_unary_rpc_method_handler(upload)

        if handler.response_streaming:

            async def stream(request: bytes, context: Any) -> None:
                await self._serve(details, handler, request, context)

            return grpc.unary_stream_rpc_method_handler(stream)

        async def unary(request: bytes, context: Any) -> bytes:
            result: bytes = await self._serve(details, handler, request, context)
            return result

        return grpc.unary_unary_rpc_method_handler(unary)

    async def _serve(
        self,
        details: grpc.HandlerCallDetails,
        handler: Handler,
        raw: bytes | None,
        context: aio.ServicerContext[Any, Any],
    ) -> Any:
        loop = asyncio.get_running_loop()
        call_context = contextvars.copy_context()
        resolved = call_context.run(self._resolve, details, handler)
        sync = SyncContext(context, details.invocation_metadata or ())

        def step(function: Callable[..., Any], *args: Any) -> Awaitable[Any]:
            return loop.run_in_executor(self._executor, call_context.run, function, *args)

        received: list[bytes] = []  # an upload's messages, as they arrive
        try:
            request = await self._request(resolved, handler, raw, context, received)
        except _Unreadable as exc:
            await self._refuse_unreadable(call_context, details.method, context, str(exc))
            raise AssertionError("unreachable: abort raises") from None
        except (_UploadTimeout, asyncio.CancelledError) as exc:
            # The upload was cut (the client hung up, or it timed out): the handler
            # still runs, on what arrived and with the call over, so that it stores
            # nothing and says so, and the call is logged and counted like any other.
            sync.finish()
            if isinstance(exc, _UploadTimeout):
                sync.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
            self._executor.submit(call_context.run, _run_cut_upload, resolved, received, sync)
            if isinstance(exc, _UploadTimeout):
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
            raise

        if not resolved.response_streaming:
            behaviour = resolved.unary_unary or resolved.stream_unary
            assert behaviour is not None
            try:
                response = await step(behaviour, request, sync)
            except _Aborted:
                await self._abort(context, sync)
            except Exception:
                await self._fail(context, sync, details.method)
            await self._send_initial_metadata(context, sync)
            serialize = resolved.response_serializer
            return serialize(response) if serialize is not None else response

        behaviour = resolved.unary_stream or resolved.stream_stream
        assert behaviour is not None
        serialize = resolved.response_serializer
        pending: asyncio.Future[Any] | None = None
        responses: Iterator[Any] | None = None
        finished = False
        try:
            while True:
                try:
                    if responses is None:
                        responses = call_context.run(behaviour, request, sync)  # type: ignore[arg-type]
                        if responses is None:  # a refusal that returned
                            finished = True
                            break
                    pending = asyncio.ensure_future(step(_next, responses))
                    response = await pending
                    pending = None
                except _Aborted:
                    finished = True
                    await self._abort(context, sync)
                except Exception:
                    finished = True
                    await self._fail(context, sync, details.method)
                if response is _END:
                    finished = True
                    break
                await self._send_initial_metadata(context, sync)
                data = serialize(response) if serialize is not None else response
                try:
                    await asyncio.wait_for(context.write(data), self._limits.send_stall_seconds)
                except TimeoutError:
                    log.info(
                        "%s: the client took no response for %g s; call ended",
                        split_method(details.method)[1],
                        self._limits.send_stall_seconds,
                    )
                    sync.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
                    break
            await self._send_initial_metadata(context, sync)
        finally:
            if responses is not None and not finished:
                sync.finish()
                self._close_later(call_context, responses, pending)
        if sync.status_code == grpc.StatusCode.DEADLINE_EXCEEDED:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no response taken for {self._limits.send_stall_seconds:g} s",
            )
        return None

    def _close_later(
        self,
        call_context: contextvars.Context,
        responses: Iterator[Any],
        pending: asyncio.Future[Any] | None,
    ) -> None:
        """Close the handler's generator (it stops computing and its observers log the
        call), in the pool, once the step it may be running has returned."""
        close = getattr(responses, "close", None)
        if not callable(close):
            return

        def run_close(_: object = None) -> None:
            self._executor.submit(call_context.run, close)

        if pending is not None and not pending.done():
            pending.add_done_callback(run_close)
        else:
            run_close()

    async def _request(
        self,
        resolved: Handler,
        handler: Handler,
        raw: bytes | None,
        context: aio.ServicerContext[Any, Any],
        received: list[bytes],
    ) -> Any:
        """The request as the resolved handler takes it: parsed, unless it is a refusal
        (no deserializer), which is given the raw bytes or, for an upload, no message
        read at all."""
        parse = resolved.request_deserializer
        if raw is not None:
            message = raw if parse is None else _parsed(parse, raw)
            return iter((message,)) if resolved.request_streaming else message
        if parse is None:
            return iter(())
        await self._upload(context, received)
        messages = [_parsed(parse, data) for data in received]
        return iter(messages) if resolved.request_streaming else messages[0]

    async def _upload(self, context: aio.ServicerContext[Any, Any], messages: list[bytes]) -> None:
        """Every message of a streamed upload, each within `upload_idle_seconds` of the
        last and all within `upload_total_seconds`; reading stops once the bytes pass
        `max_upload_bytes` (the handler then refuses the upload for its size)."""
        limits = self._limits
        ends_by = time.monotonic() + limits.upload_total_seconds
        received = 0
        while received <= self._max_upload_bytes:
            left = ends_by - time.monotonic()
            wait = min(limits.upload_idle_seconds, left)
            try:
                message = await asyncio.wait_for(context.read(), max(wait, 0.0))
            except TimeoutError:
                raise _UploadTimeout(
                    f"upload idle for {limits.upload_idle_seconds:g} s"
                    if wait < left
                    else f"upload not complete within {limits.upload_total_seconds:g} s"
                ) from None
            if message is aio.EOF:  # type: ignore[attr-defined]
                break
            data = bytes(message)
            received += len(data)
            messages.append(data)

    async def _send_initial_metadata(
        self, context: aio.ServicerContext[Any, Any], sync: SyncContext
    ) -> None:
        metadata, sync.initial_metadata = sync.initial_metadata, ()
        if metadata:
            with contextlib.suppress(Exception):  # the call already ended
                await context.send_initial_metadata(metadata)

    async def _abort(self, context: aio.ServicerContext[Any, Any], sync: SyncContext) -> None:
        await self._send_initial_metadata(context, sync)
        code = sync.status_code or grpc.StatusCode.UNKNOWN
        await context.abort(code, sync.status_details, sync.trailing_metadata)

    async def _fail(
        self, context: aio.ServicerContext[Any, Any], sync: SyncContext, method: str
    ) -> None:
        """A handler's unexpected exception: logged here with its traceback (a server
        fault for the operator), INTERNAL with no internals for the client."""
        info = current_call()
        log.exception("%s failed", split_method(method)[1])
        await self._send_initial_metadata(context, sync)
        request_id = "" if info is None else f" (request id {info.request_id})"
        await context.abort(grpc.StatusCode.INTERNAL, f"internal server error{request_id}")

    async def _refuse_unreadable(
        self,
        call_context: contextvars.Context,
        method: str,
        context: aio.ServicerContext[Any, Any],
        reason: str,
    ) -> None:
        """INVALID_ARGUMENT for a request that does not parse: the client's fault, one
        access log line and a counted error, no traceback."""
        service, name = split_method(method)
        info = call_context.run(current_call)
        access_log.info(
            "%s INVALID_ARGUMENT (unreadable request)",
            name,
            extra={
                "fields": {
                    "service": service,
                    "method": name,
                    "code": "INVALID_ARGUMENT",
                    "request_id": "" if info is None else info.request_id,
                    "caller": "" if info is None else info.caller_name,
                }
            },
        )
        self._metrics.requests.labels(service, name).inc()
        self._metrics.errors.labels(service, name, "INVALID_ARGUMENT").inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)


def _run_cut_upload(resolved: Handler, received: list[bytes], sync: SyncContext) -> None:
    """Run an upload's handler on the messages that arrived before the upload was cut
    (those that parse), with its call over; whatever it raises is already logged."""
    behaviour = resolved.stream_unary
    parse = resolved.request_deserializer
    if behaviour is None or parse is None:
        return
    messages = []
    for data in received:
        with contextlib.suppress(_Unreadable):
            messages.append(_parsed(parse, data))
    with contextlib.suppress(Exception):
        behaviour(iter(messages), sync)  # type: ignore[arg-type]


def _parsed(parse: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return parse(data)
    except Exception:  # DecodeError, or invalid UTF-8 in a string field
        raise _Unreadable("request bytes are not a valid message of this method") from None


# --- admission ----------------------------------------------------------------------------


def caller_key(
    authenticator: Authenticator | None, method: str, metadata: dict[str, str], peer: str
) -> str:
    """Whose share a call counts against: its token's caller, or its peer's address (a
    health check, an unknown token, a server without tokens)."""
    if authenticator is not None and not is_open(method):
        caller = authenticator.authenticate(metadata)
        if caller is not None:
            return f"caller:{caller.name}"
    scheme, _, address = peer.partition(":")  # "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000"
    host = address.rsplit(":", 1)[0] if scheme in ("ipv4", "ipv6") else peer
    return f"address:{host}"


_BRIDGED_PREFIXES = ("/heserve.v1.ScoringService/", ADMIN_METHOD_PREFIX)
"""The services run through the bridge's interceptor chain, which refuses, logs and
counts their oversized metadata itself."""


class CallAdmission(AioInterceptor):
    """Refuses a call past its caller's share of the server (`CallLimits`) with
    RESOURCE_EXHAUSTED, before its handler runs; counts it while it runs. Every
    service, health and reflection included; it also refuses their calls with metadata
    past `MAX_METADATA_BYTES` (the ScoringService's and the admin service's are refused,
    logged and counted by their own interceptor chain)."""

    def __init__(self, limits: CallLimits, authenticator: Authenticator | None) -> None:
        self.limits = limits
        self.authenticator = authenticator
        self._calls: dict[str, int] = {}
        self._streams: dict[str, int] = {}
        self._changed = threading.Condition()

    def held(self, key: str) -> tuple[int, int]:
        """(calls, streams) `key` holds now."""
        with self._changed:
            return self._calls.get(key, 0), self._streams.get(key, 0)

    def wait_held(self, key: str, streams: int, timeout: float, calls: int | None = None) -> bool:
        """Wait until `key` holds `streams` streams (and `calls` calls, if given);
        False if `timeout` seconds pass first. For operators' probes and tests."""

        def reached() -> bool:
            held_calls, held_streams = self._calls.get(key, 0), self._streams.get(key, 0)
            return held_streams == streams and (calls is None or held_calls == calls)

        with self._changed:
            return self._changed.wait_for(reached, timeout)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # type: ignore[return-value]  # not served: UNIMPLEMENTED
        method: str = handler_call_details.method
        oversized = metadata_bytes(handler_call_details) > MAX_METADATA_BYTES
        metadata = {
            key: value
            for key, value in handler_call_details.invocation_metadata or ()
            if isinstance(value, str)
        }
        streaming = bool(handler.request_streaming or handler.response_streaming)

        @contextlib.asynccontextmanager
        async def admitted(context: aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
            if oversized and not method.startswith(_BRIDGED_PREFIXES):
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"call metadata larger than {MAX_METADATA_BYTES} bytes",
                )
            key = caller_key(self.authenticator, method, metadata, context.peer())
            refusal = self._admit(key, streaming)
            if refusal:
                log.info("%s refused: %s", split_method(method)[1], refusal)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            try:
                yield
            finally:
                self._release(key, streaming)

        return _wrapped(handler, admitted)

    def _admit(self, key: str, streaming: bool) -> str:
        with self._changed:
            calls, streams = self._calls.get(key, 0), self._streams.get(key, 0)
            if calls >= self.limits.max_calls_per_caller:
                return f"too many calls at once: {self.limits.max_calls_per_caller} per caller"
            if streaming and streams >= self.limits.max_streams_per_caller:
                return f"too many streams at once: {self.limits.max_streams_per_caller} per caller"
            self._calls[key] = calls + 1
            if streaming:
                self._streams[key] = streams + 1
            self._changed.notify_all()
        return ""

    def _release(self, key: str, streaming: bool) -> None:
        with self._changed:
            for counts, counted in ((self._calls, True), (self._streams, streaming)):
                if counted:
                    left = counts[key] - 1
                    if left:
                        counts[key] = left
                    else:
                        del counts[key]
            self._changed.notify_all()


def _wrapped(
    handler: Handler,
    admitted: Callable[[Any], contextlib.AbstractAsyncContextManager[None]],
) -> Handler:
    """`handler` (async behaviours) with each call run inside `admitted(context)`."""

    def wrap(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behaviour):

            async def generating(request: Any, context: Any) -> AsyncIterator[Any]:
                async with admitted(context):
                    async for response in behaviour(request, context):
                        yield response

            return generating

        async def running(request: Any, context: Any) -> Any:
            async with admitted(context):
                return await behaviour(request, context)

        return running

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **serializers)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **serializers)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **serializers)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **serializers)
